"""Config holes closed: every numeric field's range from one table (NaN and infinities never pass), a
model vocabulary smaller than the tokenizer's and a model too large for the machine refused before
anything is built, and a --config flag given twice: the last one wins."""

import os
import subprocess
import sys

import pytest

from jaxlm import config, config_rules
from jaxlm import run as run_lib
from jaxlm.errors import ConfigError

from conftest import ROOT, write_word_corpus

TINY = ROOT / "jaxlm" / "configs" / "tiny.py"


def _numeric_fields(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _numeric_fields(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield f"{prefix}{k}"


def test_every_numeric_field_of_the_schema_has_a_range():
    assert sorted(set(_numeric_fields(config.schema().to_dict())) - set(config_rules.RANGES)) == []
    assert sorted(set(config_rules.RANGES) - set(_numeric_fields(config.schema().to_dict()))) == []


@pytest.mark.parametrize("key, value, says", [
    ("optim.lr", float("nan"), "optim.lr=nan: must be a finite number > 0"),
    ("optim.lr", 0.0, "optim.lr=0.0: must be a number > 0"),
    ("optim.eps", -1e-8, "optim.eps=-1e-08: must be a number > 0"),
    ("optim.clip_norm", float("inf"), "optim.clip_norm=inf: must be a finite number >= 0"),
    ("optim.b2", 1.0, "optim.b2=1.0: must be a number in [0, 1)"),
    ("model.attn_pdrop", 1.0, "model.attn_pdrop=1.0: must be a number in [0, 1)"),
    ("data.val_fraction", -0.1, "data.val_fraction=-0.1: must be a number in [0, 1)"),
    ("train.steps", 0, "train.steps=0: must be a number >= 1"),
    ("precision.loss_scale_init", float("nan"), "precision.loss_scale_init=nan: must be a finite number >= 1"),
    ("data.seed", -2, "data.seed=-2: must be a number >= -1"),
])
def test_a_value_out_of_its_range_is_one_line_naming_the_field(key, value, says):
    with pytest.raises(ConfigError) as e:
        config.load(TINY, {key: value})
    assert str(e.value) == "--config." + says  # the shape of every config error


def test_a_model_too_large_for_the_machine_is_refused_from_its_shape_alone():
    cfg = config.load(TINY, {"model.n_layer": 100_000})
    with pytest.raises(ConfigError, match=r"model.n_layer=100000, model.n_embd=64 .*about 5e\+09 parameters.* more "
                                          r"than the 8.0 GiB of this host"):
        config.check_size(cfg, 1024, 8 * 2**30, "this host")
    config.check_size(config.load(TINY), 1024, 8 * 2**30, "this host")  # the tiny model fits


@pytest.mark.slow  # builds a cache
def test_a_model_vocabulary_below_the_tokenizers_is_refused_before_anything_is_written(tmp_path):
    corpus = write_word_corpus(tmp_path / "corpus", 20)
    cfg = config.load(TINY, {"data.source": f"files:{corpus}/*.txt", "data.vocab_size": 300, "model.vocab_size": 200,
                             "log.wandb_mode": "disabled"})
    with pytest.raises(ConfigError, match="model.vocab_size=200 is smaller than the tokenizer's vocabulary of 300"):
        run_lib.run(cfg, tmp_path / "w", log=lambda s: None)
    assert not (tmp_path / "w" / "checkpoints").exists() and not (tmp_path / "w" / "done.json").exists()


PRINT_OVERRIDES = """
from jaxlm import cli
def main(argv):
    print(cli.FLAGS.config.checkpoint.stages, cli.FLAGS.config.train.steps)
cli.run(main, lambda: cli.define_config())
"""


@pytest.mark.slow  # a subprocess
def test_a_config_flag_given_twice_the_last_one_wins():
    res = subprocess.run([sys.executable, "-c", PRINT_OVERRIDES, "--config=configs/tiny.py",
                          "--config.checkpoint.stages=((1, 10),)", "--config.train.steps=5",
                          "--config.checkpoint.stages=((2, 20),)", "--config.train.steps=7"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["((2,", "20),)", "7"]
