"""train.eval_sets: named evaluation sets scored during training (eval/NAME/<metric>) give what
``python -m jaxlm.eval`` gives for the same checkpoint; bad entries and missing files are one error line
before anything is built; train.eval_batches=0 evaluates the whole validation split."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxlm import evalsets, telemetry
from jaxlm.errors import ConfigError, DataError

from conftest import ROOT, write_word_corpus

quiet = lambda s: None  # noqa: E731


# --- entries ------------------------------------------------------------------------------------

def test_entries_parse_into_named_sets():
    sets = evalsets.parse_eval_sets(("wiki=wikitext:/d/wiki.valid.raw", "lam_1=lambada:/d/l.jsonl",
                                     "web-2=files:/d/*.txt", "std=stdlib", "owt=tfds:openwebtext:train"))
    assert [(s.name, s.kind) for s in sets] == [("wiki", "wikitext"), ("lam_1", "lambada"), ("web-2", "files"),
                                                ("std", "stdlib"), ("owt", "tfds")]
    assert sets[0].where == "train.eval_sets: 'wiki=wikitext:/d/wiki.valid.raw'"
    assert evalsets.parse_eval_sets(()) == []


@pytest.mark.parametrize("entries, fragment", [
    (("wikitext:/d/w.raw",), "expected 'NAME=SPEC'"),
    (("w=wikitxt:/d/w.raw",), "unknown kind 'wikitxt'"),
    (("w=tokens:/d/*.bin",), "unknown kind 'tokens'"),
    (("w=mix:1*stdlib",), "unknown kind 'mix'"),
    (("w=wikitext:/a", "w=lambada:/b"), "the name 'w' is used twice"),
    (("my set=wikitext:/a",), "the name 'my set' must be letters"),
    (("a/b=wikitext:/a",), "the name 'a/b' must be letters"),
    (("=wikitext:/a",), "the name '' must be letters"),
    (("mix0=wikitext:/a",), "not mix<i>"),
    (("w=wikitext:",), "wikitext: needs what it reads"),
    (("w=files",), "files: needs what it reads"),
    (("w=stdlib:x",), "stdlib takes nothing"),
    ("w=wikitext:/a", "must be a tuple"),
    ((3,), "expected 'NAME=SPEC'"),
])
def test_bad_entries_are_one_line_config_errors(entries, fragment):
    with pytest.raises(ConfigError) as e:
        evalsets.parse_eval_sets(entries)
    assert str(e.value).startswith("train.eval_sets") and fragment in str(e.value) and "\n" not in str(e.value)


def test_a_run_with_a_bad_entry_fails_before_writing_anything(tmp_path):
    from jaxlm import config
    from jaxlm import run as run_lib

    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {
        "log.wandb_mode": "disabled", "train.eval_sets": ("w=wikitext:/a", "w=lambada:/b")})
    with pytest.raises(ConfigError, match=r"^train.eval_sets: 'w=lambada:/b': the name 'w' is used twice"):
        run_lib.run(cfg, tmp_path / "run", log=quiet)
    assert not (tmp_path / "run").exists()


def test_missing_files_name_the_field_and_the_path(tmp_path):
    from jaxlm import config

    data_cfg = config.schema().data
    for entry, fragment in [("w=wikitext:/x/wiki.valid.raw", "no such file /x/wiki.valid.raw"),
                            ("l=lambada:/x/lambada.jsonl", "no such file /x/lambada.jsonl"),
                            (f"f=files:{tmp_path}/*.txt", "matched no files")]:
        with pytest.raises(DataError) as e:
            evalsets.check_files(evalsets.parse_eval_sets((entry,)), data_cfg)
        assert str(e.value).startswith(f"train.eval_sets: {entry!r}: ") and fragment in str(e.value), str(e.value)
        assert "data.source" not in str(e.value) and "\n" not in str(e.value)
    bad = tmp_path / "l.jsonl"
    bad.write_text('{"text": "a fine passage"}\n{"txt": "no"}\n')
    s = evalsets.parse_eval_sets((f"l=lambada:{bad}",))[0]
    evalsets.check_files([s], data_cfg)
    with pytest.raises(DataError, match=r"^train.eval_sets: 'l=lambada:.*l.jsonl':2: expected a JSON object"):
        evalsets.lambada_examples(str(bad), where=s.where)


def test_no_sets_are_prepared_when_evaluation_is_off():
    from jaxlm import config

    cfg = config.schema()
    cfg.train.eval_every = 0
    said = []
    sets = evalsets.parse_eval_sets(("w=wikitext:/a",))
    assert evalsets.callbacks(sets, cfg, tokenizer=None, trainer=None, log=said.append) == {}
    assert said == ["warning: train.eval_sets (w) are not evaluated: train.eval_every=0"]


# --- a run with three sets ----------------------------------------------------------------------

def _wikitext(words: list[str]) -> str:
    """WikiText's raw format: headings with spaced '=', punctuation and @-@ split off by spaces."""
    out = []
    for k in range(0, len(words), 60):
        para = words[k:k + 60]
        out.append(f" = = {para[0]} {para[1]} = = \n \n")
        for j in range(2, len(para), 12):
            sentence = " , ".join(" ".join(para[j:j + 12][i:i + 4]) for i in range(0, 12, 4))
            out.append(f" {sentence} @-@ {para[j]} . \n")
    return "".join(out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-step tiny run evaluated at steps 1 and 2 on a wikitext file, a LAMBADA jsonl and a files: set,
    and on the whole of its validation split (train.eval_batches=0)."""
    from jaxlm import config
    from jaxlm import run as run_lib

    root = tmp_path_factory.mktemp("evalsets")
    corpus = write_word_corpus(root / "corpus", 30)
    words = " ".join(p.read_text() for p in sorted(corpus.glob("doc00*.txt"))).split()
    wiki, lam = root / "wiki.valid.raw", root / "lambada.jsonl"
    wiki.write_text(_wikitext(words[:1200]))
    lam.write_text("".join(json.dumps({"text": " ".join(words[i:i + 25 + i % 7])}) + "\n" for i in range(0, 480, 40)))
    specs = {"wiki": f"wikitext:{wiki}", "lam": f"lambada:{lam}", "web": f"files:{corpus}/doc01*.txt"}
    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {
        "data.source": f"files:{corpus}/*.txt", "data.vocab_size": 300, "data.val_fraction": 0.2, "train.steps": 2,
        "train.batch_size": 4, "train.seq_len": 32, "train.eval_every": 1, "train.eval_batches": 0,
        "train.eval_sets": tuple(f"{k}={v}" for k, v in specs.items()), "log.wandb_mode": "disabled",
        "log.stats_every": 0, "checkpoint.stages": ((1, 10),)})
    said = []
    run_lib.run(cfg, root / "run", log=said.append)
    return root / "run", specs, said


@pytest.mark.slow  # trains a tiny run and evaluates it again with the CLI's library
def test_eval_sets_are_logged_and_equal_the_cli_on_the_final_checkpoint(trained):
    from test_tensorboard import read_scalars

    from jaxlm import eval as eval_lib

    run, specs, said = trained
    for name, kind in [("wiki", "wikitext"), ("lam", "lambada"), ("web", "files")]:
        line = next(s for s in said if s.startswith(f"eval set {name} ({kind}): "))
        assert ("passages" if kind == "lambada" else "document") in line and "tokens" in line, line
    records = {r[telemetry.STEP]: r for r in telemetry.read_metrics(run / "metrics.jsonl")[0]}
    names = {"wiki": telemetry.EVAL_SET_METRICS["stream"], "web": telemetry.EVAL_SET_METRICS["stream"],
             "lam": telemetry.EVAL_SET_METRICS["lambada"]}
    tags = {telemetry.EVAL_SET.format(n, k) for n, keys in names.items() for k in keys}
    assert tags == {"eval/wiki/loss", "eval/wiki/perplexity", "eval/wiki/bits_per_byte", "eval/web/loss",
                    "eval/web/perplexity", "eval/web/bits_per_byte", "eval/lam/accuracy", "eval/lam/perplexity"}
    for step in (1, 2):
        assert tags <= set(records[step]), sorted(records[step])
    windows = {"wiki": {}, "lam": {}, "web": {"context": 32, "stride": 32}}  # the CLI's default for wikitext is Mistral's
    for name, keys in names.items():
        cli = eval_lib.evaluate_run(run, data_spec=specs[name], log=quiet, **windows[name])[-1]
        assert cli["step"] == 2
        for k in keys:
            assert records[2][telemetry.EVAL_SET.format(name, k)] == pytest.approx(cli[k], rel=1e-5), (name, k)
    tb = read_scalars(run / telemetry.TENSORBOARD_DIR)
    for tag in tags:
        assert sorted(tb[tag]) == [1, 2], tag
        assert tb[tag][2] == pytest.approx(records[2][tag], rel=1e-6), tag


@pytest.mark.slow  # (the run above)
def test_eval_batches_zero_evaluates_the_whole_validation_split(trained):
    from jaxlm import data, saved_run, train
    from jaxlm import run as run_lib

    run, _, said = trained
    cfg, trainer, state, _, step = saved_run.load_run(run)
    assert step == 2 and cfg.train.eval_batches == 0
    cache = data.prepare(cfg, run, log=quiet)
    lines = []
    batches = run_lib._validation_batches(cache, cfg, trainer, lines.append)
    n = sum(1 for _ in batches())
    assert n == len(data.eval_loader(cache, cfg, batch_size=trainer.micro)) and n > 4
    assert f"mean loss over all {n} validation batches" in lines[0] and lines[0] in said
    logged = {r[telemetry.STEP]: r for r in telemetry.read_metrics(run / "metrics.jsonl")[0]}[2]
    assert logged[telemetry.EVAL_LOSS] == pytest.approx(
        train.validation_metrics(trainer, state.params, batches())[telemetry.EVAL_LOSS], rel=1e-5)
    cfg.train.eval_batches = 3
    assert sum(1 for _ in run_lib._validation_batches(cache, cfg, trainer, quiet)()) == 3
    first3 = train.validation_metrics(trainer, state.params, run_lib._validation_batches(cache, cfg, trainer, quiet)())
    assert not np.isclose(first3[telemetry.EVAL_LOSS], logged[telemetry.EVAL_LOSS], rtol=1e-7)


@pytest.mark.slow  # starts a python process
def test_a_missing_eval_set_file_is_one_error_line_and_writes_no_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", WANDB_MODE="disabled")
    res = subprocess.run([sys.executable, "-m", "jaxlm.main", "--config=configs/tiny.py", f"--workdir={workdir}",
                          "--config.train.eval_sets=('wiki=wikitext:/nonexistent/wiki.valid.raw',)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode != 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: train.eval_sets: 'wiki=wikitext:/nonexistent/wiki.valid.raw': no such file "
                     "/nonexistent/wiki.valid.raw"], res.stderr[-3000:]
    assert not (workdir / "checkpoints").exists()


_MESH_CHECK = """
import numpy as np, jax
from jaxlm import config, evalsets, sharding, train
cfg = config.load("jaxlm/configs/tiny.py", {"mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 2, "train.batch_size": 4,
                                            "log.wandb_mode": "disabled"})
trainer = train.Trainer(cfg, sharding.make_mesh(cfg.mesh), 300)
params = trainer.init(np.uint32(0)).params
host = jax.device_get(params)
sc = evalsets.sharded_scorer(trainer.graphdef, trainer.state_sharding.params, trainer.mesh)
rng = np.random.RandomState(0)
text = evalsets.Text(rng.randint(0, 300, size=700), 1000, 1)
items = [(rng.randint(1, 300, size=10 + 9 * i).astype(np.int32), 1 + i % 2) for i in range(5)]
a, b = (evalsets.evaluate(trainer.graphdef, p, text, 127, 63, s) for p, s in ((params, sc), (host, None)))
c, d = (evalsets.score_lambada(trainer.graphdef, p, items, 128, s) for p, s in ((params, sc), (host, None)))
print(jax.device_count(), a["loss"], b["loss"], c["perplexity"], d["perplexity"], c["accuracy"], d["accuracy"])
"""


@pytest.mark.slow  # starts a python process with 4 CPU devices
def test_the_sharded_scorer_works_on_a_data_and_tensor_parallel_mesh():
    """On a 2 x 2 (data, tensor) mesh the run's scorer, on its sharded parameters, gives what the CLI's
    unsharded one gives on the same parameters gathered to the host."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    res = subprocess.run([sys.executable, "-c", _MESH_CHECK], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    n, loss, want, ppl, want_ppl, acc, want_acc = res.stdout.split()[-7:]
    assert n == "4" and float(loss) == pytest.approx(float(want), rel=1e-5) and acc == want_acc
    assert float(ppl) == pytest.approx(float(want_ppl), rel=1e-5)
