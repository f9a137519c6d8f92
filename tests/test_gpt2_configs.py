"""The gpt2_* configs are Mistral's recipe: DeepSpeed 0.3.13's schedule and its lag, decay on every
parameter, and a run that either trains or says in one line what to set. (The step-for-step proof
against a PyTorch re-creation is tests/test_mistral_recipe.py.)"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm import config, optim
from jaxlm.errors import ConfigError

from conftest import ROOT, write_word_corpus

GPT2_SMALL = ROOT / "jaxlm" / "configs" / "gpt2_small.py"


def deepspeed_lr(update: int, lr: float, warmup: int, total: int) -> float:
    """The lr of applied update `update` (from 1) under DeepSpeed 0.3.13's engine and WarmupDecayLR, from
    its source: the optimizer's own lr until the scheduler first steps, after update 1."""
    if update == 1:
        return lr
    it = update - 2  # the scheduler's last_batch_iteration when this update runs
    w = max(2, warmup)
    if it < w:
        return lr * math.log(it + 1) / math.log(w)
    return lr * max(0.0, (total - it) / max(1.0, total - w))


def test_the_schedule_is_deepspeeds_warmup_decay_with_its_lag():
    cfg = config.load(GPT2_SMALL, {"train.steps": 60, "optim.warmup_steps": 16})
    sched = optim.schedule(cfg.optim, cfg.train.steps)
    for update in range(1, 61):
        want = deepspeed_lr(update, cfg.optim.lr, 16, 60)
        assert float(sched(update - 1)) == pytest.approx(want, rel=1e-6, abs=1e-12), update


def test_the_switches_off_give_jaxlms_linear_warmup_from_the_first_update():
    cfg = config.load(GPT2_SMALL, {"train.steps": 60, "optim.warmup_steps": 16, "optim.warmup": "linear",
                                   "optim.deepspeed_lag": False})
    sched = optim.schedule(cfg.optim, cfg.train.steps)
    assert [float(sched(k)) for k in (0, 8, 16)] == pytest.approx([0.0, cfg.optim.lr / 2, cfg.optim.lr])


@pytest.mark.parametrize("mask, decayed", [("all", True), ("matrices", False)])
def test_weight_decay_reaches_layernorm_gains_only_with_the_all_mask(mask, decayed):
    cfg = config.load(GPT2_SMALL, {"optim.decay_mask": mask, "optim.warmup_steps": 0, "optim.deepspeed_lag": False})
    tx, _ = optim.make(cfg.optim, 100)
    params = {"h": {"0": {"ln_1": {"scale": jnp.ones(4)}, "mlp": {"c_fc": {"kernel": jnp.ones((4, 4))}}}}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    new = optax.apply_updates(params, tx.update(zeros, tx.init(params), params)[0])
    shrink = 1 - cfg.optim.lr * cfg.optim.weight_decay
    np.testing.assert_allclose(new["h"]["0"]["mlp"]["c_fc"]["kernel"], shrink, rtol=1e-6)
    np.testing.assert_allclose(new["h"]["0"]["ln_1"]["scale"], shrink if decayed else 1.0, rtol=1e-6)


def test_a_gpt2_config_without_corpus_or_tokenizer_says_what_to_set():
    for overrides, names in [({}, ["data.source=", "data.tokenizer=hf:DIR"]),
                             ({"data.source": "stdlib"}, ["data.tokenizer=hf:DIR"]),
                             ({"data.tokenizer": "hf:/gpt2"}, ["data.source="])]:
        cfg = config.load(GPT2_SMALL, overrides)
        with pytest.raises(ConfigError) as e:
            config.check_corpus(cfg)
        message = str(e.value)
        assert all(f"--config.{n}" in message for n in names) and "Reproduce Mistral's numbers" in message
        assert "\n" not in message
    config.check_corpus(config.load(GPT2_SMALL, {"data.source": "stdlib", "data.tokenizer": "hf:/gpt2"}))


def test_mistrals_lag_and_log_warmup_are_refused_under_a_budget():
    with pytest.raises(ConfigError, match="optim.warmup=log and optim.deepspeed_lag"):
        config.load(GPT2_SMALL, {"train.budget": "10m"})


def _main(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "jaxlm.main", "--config=configs/gpt2_small.py", *args],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow  # a subprocess
def test_the_cards_command_alone_prints_one_error_line_naming_the_flags(tmp_path):
    res = _main(f"--workdir={tmp_path / 'w'}")
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert res.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), lines
    assert "--config.data.source=" in lines[0] and "--config.data.tokenizer=hf:DIR" in lines[0]
    assert not (tmp_path / "w").exists()  # nothing written


@pytest.mark.slow  # GPT-2 small (12 layers, d 768) on CPU: about a minute and a half
def test_gpt2_small_trains_two_steps_at_batch_2_with_a_corpus_and_a_gpt2_style_tokenizer(tmp_path):
    from jaxlm.data import tokenizer_train

    corpus = write_word_corpus(tmp_path / "corpus", 40, words_per_doc=0, seed=3)
    tok = tokenizer_train.train_byte_bpe([p.read_text() for p in sorted(corpus.glob("*.txt"))], 400)
    spec = tok.save(tmp_path / "gpt2_tokenizer")  # vocab.json + merges.txt, as GPT-2's files
    res = _main(f"--workdir={tmp_path / 'w'}", f"--config.data.source=files:{corpus}/*.txt",
                f"--config.data.tokenizer={spec}", "--config.train.batch_size=2", "--config.train.steps=2",
                "--config.log.wandb_mode=disabled")
    assert res.returncode == 0, res.stderr[-3000:]
    done = json.loads((tmp_path / "w" / "done.json").read_text())
    assert done["step"] == 2 and done["stopped"] is None
    records = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r.get("step") == 2 and "train/loss" in r][-1]
    assert last["train/loss_scale"] == 2.0**31  # 2^32 overflowed at step 1 and halved (DeepSpeed's start)
