"""jaxlm.hf_import: a series of Hugging Face checkpoints (here: a tiny run's, exported step by step as
checkpoint-<step> directories) becomes a read-only run that eval, probe, generate, harness and export read
unchanged, with the numbers of the run it came from; the attention flags are never guessed silently; an
import killed midway completes identically; and jaxlm.ablate seeds draws runs as a band."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlm import checkpoint, config, export, generate, hf, hf_import, saved_run
from jaxlm import eval as eval_lib
from jaxlm import run as run_lib
from jaxlm.ablate import seeds
from jaxlm.data import cache as cache_lib
from jaxlm.data import tokenizer as tok_lib
from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.probe import mdl, study
from jaxlm.probe import tasks as tasks_lib

from conftest import ROOT, once_per_session, train_tiny_run

STEPS = 20  # checkpoints 0..19
SMALL = {"train.seq_len": 32, "train.batch_size": 4}  # small steps: the point is the checkpoints
PROBE = tasks_lib.TaskSettings(window=32, rows=40, tokens_per_row=10, pairs_per_row=4)
FAST = mdl.ProbeSettings(max_steps=40)  # equal or not: the probes need not be good
quiet = lambda s: None  # noqa: E731


def base_config(run_dir):
    """The imported runs' config beside the model: the data and sequence length the run trained with."""
    return config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {
        "data.source": f"files:{run_dir.parent / 'corpus'}/*.txt", "data.val_fraction": 0.2, **SMALL})


def export_series(run_dir, out, steps):
    for s in steps:
        export.export(run_dir, out / f"checkpoint-{s}", step=s)
    return out


def drop_flags(series, out):
    """The series as transformers 4.5 wrote it: config.json without the two attention flags."""
    shutil.copytree(series, out)
    for c in out.glob("checkpoint-*/config.json"):
        cfg = json.loads(c.read_text())
        for f in hf.ATTENTION_FLAGS:
            del cfg[f]
        c.write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A tiny run with layer-index scaling, 20 checkpoints, and their export. Its weights start 10x larger than
    GPT-2's (initializer_range 0.2), so its attention scores are too and their scale changes the loss by 2e-3 or
    more; at 0.02 the tiny model's scores stay so small that the flag moves its loss by 1e-7."""
    def build(root):
        run = train_tiny_run(root, **{"model.scale_attn_by_inverse_layer_idx": True, "model.initializer_range": 0.2,
                                      "train.steps": STEPS - 1, **SMALL})
        return run, export_series(run, root / "series", range(STEPS))

    return once_per_session(tmp_path_factory, "hf-import-original", build)


@pytest.fixture(scope="module")
def imported(original, tmp_path_factory):
    def build(root):
        run, series = original
        result = hf_import.import_hf(str(series), root / "run", base_config(run), log=quiet, progress=False)
        assert result == {"imported": list(range(STEPS)), "skipped": []}
        return root / "run"

    return once_per_session(tmp_path_factory, "hf-import-imported", build)


def _losses(rows):
    return {r["step"]: r["loss"] for r in rows}


def _probe(run, steps=None):
    src = study.run_source(run, all_steps=steps is None, steps=steps, out=run / "probe")
    return study.probe_source(src, ["position", "bm25"], settings=PROBE, hp=FAST, log=quiet)


# --- fast: sources and flags --------------------------------------------------------------------------

def _model_dir(d, **extra):
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"n_embd": 8, "n_layer": 1, "n_head": 2, "vocab_size": 10, **extra}))
    return d


def test_sources_are_found_by_step_and_bad_ones_named(tmp_path):
    for s in (100, 20, 3):
        _model_dir(tmp_path / "s" / f"checkpoint-{s}")
    (tmp_path / "s" / "other").mkdir()
    assert [s for s, _ in hf_import.find_sources(str(tmp_path / "s"))] == [3, 20, 100]
    assert [s for s, _ in hf_import.find_sources(str(tmp_path / "s" / "checkpoint-[12]*"))] == [20, 100]
    assert hf_import.find_sources(str(tmp_path / "s" / "checkpoint-20")) == [(20, tmp_path / "s" / "checkpoint-20")]
    one = _model_dir(tmp_path / "final")
    assert hf_import.find_sources(str(one), step=400000) == [(400000, one)]
    (tmp_path / "s" / "checkpoint-7").mkdir()  # a download cut short
    for spec, step, fragment in ((str(one), None, "pass --step=N"), (str(tmp_path / "s"), None, "no config.json"),
                                 (str(tmp_path / "nope"), None, "no such directory"),
                                 (str(tmp_path / "x*"), None, "matches no directory"),
                                 (str(tmp_path / "s" / "checkpoint-*"), 5, "names the step of one model directory"),
                                 (str(tmp_path), None, "neither a Hugging Face model directory")):
        with pytest.raises((ConfigError, CheckpointError), match=fragment):
            hf_import.find_sources(spec, step)


def test_attention_flags_are_never_a_silent_guess():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert hf.attention_flags({}) == dict.fromkeys(hf.ATTENTION_FLAGS, False)
        assert hf.attention_flags({}, "mistral") == dict.fromkeys(hf.ATTENTION_FLAGS, True)
        assert hf.attention_flags(dict.fromkeys(hf.ATTENTION_FLAGS, True)) == dict.fromkeys(hf.ATTENTION_FLAGS, True)
    assert len(caught) == 1  # only the config without the flags warns, once, naming both and the fix
    message = str(caught[0].message)
    assert all(f in message for f in hf.ATTENTION_FLAGS) and "--attn_flags=mistral" in message, message
    with pytest.raises(ConfigError, match="unknown; one of mistral, gpt2"):
        hf.attention_flags({}, "openai")


# --- a series imported --------------------------------------------------------------------------------

@pytest.mark.slow
def test_an_imported_series_evaluates_and_probes_as_its_run(original, imported):
    run, series = original
    assert checkpoint.saved_steps(imported) == list(range(STEPS))
    for s in range(STEPS):  # the same parameters, bit for bit: the run's own fingerprints
        ours = {k: v for k, v in checkpoint.read_meta(run, s)["fingerprints"].items() if k.startswith("params.")}
        meta = checkpoint.read_meta(imported, s)
        assert meta["fingerprints"] == ours and meta[checkpoint.PARAMS_ONLY]
        assert meta["import_source"] == str((series / f"checkpoint-{s}").resolve())
    info = json.loads((imported / "run.json").read_text())["import"]
    assert info["attention_flags"] == {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": False}
    assert info["attention_flags_from"] == "config.json" and len(info["sources"]) == STEPS
    assert info["hf_config"]["scale_attn_by_inverse_layer_idx"] is True
    # eval --all-steps on the run's validation split (the import's config names the same corpus)
    a = eval_lib.evaluate_run(run, all_steps=True, log=quiet)
    b = eval_lib.evaluate_run(imported, all_steps=True, log=quiet)
    assert [r["step"] for r in b] == list(range(STEPS)) and (imported / "eval.csv").is_file()
    for x, y in zip(a, b):
        assert (x["tokens"], x["bytes"]) == (y["tokens"], y["bytes"])
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6, abs=0)
    assert len(set(_losses(a).values())) > STEPS // 2  # the steps differ from each other: the comparison means something
    # probe: the import's token cache holds the run's rows, so the probes see the same texts and features
    ca, cb = (cache_lib.TokenCache.open(Path(checkpoint.read_meta(r, 0)["data"]["cache"])) for r in (run, imported))
    for split in ("train", "validation"):
        assert np.array_equal(ca.split(split), cb.split(split))
    pa, pb = _probe(run), _probe(imported)  # --all-steps: every checkpoint of each
    for task in pa:
        assert len(pb[task]) == len(pa[task]) == 3 * STEPS  # (embedding + 2 blocks) x steps
        for x, y in zip(pa[task], pb[task]):
            assert (x["step"], x["layer"]) == (y["step"], y["layer"])
            for k in ("compression", "accuracy", "control_compression", "selectivity"):
                assert y[k] == pytest.approx(x[k], rel=1e-6, abs=1e-9), (task, x["step"], x["layer"], k)


@pytest.mark.slow
def test_generate_harness_and_export_read_an_imported_run_and_training_does_not(original, imported, tmp_path):
    from jaxlm import harness

    run, series = original
    _, tr0, st0, meta0, _ = saved_run.load_run(run, 7)
    _, tr, st, meta, step = saved_run.load_run(imported, 7)  # a whole-state load: the parameters (all there is)
    assert step == 7 and st.opt_state is None
    tok = tok_lib.load(saved_run.tokenizer_spec(meta))
    assert tok.sha256 == tok_lib.load(saved_run.tokenizer_spec(meta0)).sha256
    ids = tok.encode(["ab cd ef"])[0]
    kw = dict(temperature=0.8, top_k=20, seed=3)
    assert (generate.generate(tr.graphdef, st.params, tr.model_cfg, tr.policy, ids, 12, **kw)
            == generate.generate(tr0.graphdef, st0.params, tr0.model_cfg, tr0.policy, ids, 12, **kw))
    assert harness.load_model(workdir=str(imported), step=7)[-1] == f"{imported}@7"
    out = export.export(imported, tmp_path / "again", step=7)  # back out: the tensors it came from
    assert {k: v.tolist() for k, v in hf.read_tensors(out).items()} == {
        k: v.tolist() for k, v in hf.read_tensors(series / "checkpoint-7").items()}
    cfg = config.from_dict(checkpoint.read_meta(imported, 19)["config"])
    with pytest.raises(CheckpointError, match="holds parameters only .* training cannot resume from it"):
        run_lib.run(cfg, imported, log=quiet)  # python -m jaxlm.main on it: this one error line
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ConfigError, match="a trained run, not an imported one"):
        hf_import.import_hf(str(series), run, base_config(run), log=quiet, progress=False)
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written into it


@pytest.mark.slow
@pytest.mark.parametrize("args, fragment", [
    (["--attn_flags=openai"], "--attn_flags='openai': one of mistral, gpt2"),
    (["--step=3"], "names the step of one model directory"),
])
def test_cli_errors_are_one_line(original, tmp_path, args, fragment):
    res = subprocess.run([sys.executable, "-m", "jaxlm.hf_import", f"--hf={original[1]}", f"--workdir={tmp_path}/w",
                          *args], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                         timeout=300)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 1 and len(errors) == 1 and fragment in errors[0] and "Traceback" not in res.stderr, res.stderr


@pytest.mark.slow
def test_a_config_without_the_attention_flags_warns_once_and_mistral_restores_the_run(original, tmp_path):
    run, series = original
    steps = [0, 10, 19]
    flagless = drop_flags(export_series(run, tmp_path / "with", steps), tmp_path / "without")
    base = base_config(run)
    want = _losses(eval_lib.evaluate_run(run, all_steps=True, log=quiet))

    def import_as(flags):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hf_import.import_hf(str(flagless), tmp_path / str(flags), base, attn_flags=flags, log=quiet, progress=False)
        info = json.loads((tmp_path / str(flags) / "run.json").read_text())["import"]
        return _losses(eval_lib.evaluate_run(tmp_path / str(flags), all_steps=True, log=quiet)), caught, info

    guessed, caught, info = import_as(None)
    assert len(caught) == 1 and "--attn_flags=mistral" in str(caught[0].message)  # three checkpoints, one warning
    assert info["attention_flags"] == dict.fromkeys(hf.ATTENTION_FLAGS, False) and "absent" in info["attention_flags_from"]
    mistral, caught, info = import_as("mistral")
    assert not caught and info["attention_flags"] == dict.fromkeys(hf.ATTENTION_FLAGS, True)
    assert info["attention_flags_from"] == "--attn_flags=mistral"
    gpt2, caught, _ = import_as("gpt2")
    assert not caught and gpt2 == guessed
    for s in steps:
        assert mistral[s] == pytest.approx(want[s], rel=1e-6, abs=0)  # the run's function again
        assert abs(gpt2[s] - want[s]) > 1e-3, s  # without the flag: another function
    with pytest.raises(ConfigError, match="imported with another config"):  # the flags are part of the run
        hf_import.import_hf(str(flagless), tmp_path / "gpt2", base, attn_flags="mistral", log=quiet, progress=False)
    # eval --hf on a flag-less directory: one warning, the flags False (what the gpt2 import computes)
    spec = f"files:{run.parent / 'corpus'}/doc00*.txt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        direct = eval_lib.evaluate_hf(flagless / "checkpoint-19", spec, context=32, stride=16, log=quiet)
    assert len(caught) == 1 and "hf_import --attn_flags=mistral|gpt2" in str(caught[0].message)
    via_run = eval_lib.evaluate_run(tmp_path / "gpt2", step=19, data_spec=spec, context=32, stride=16, log=quiet)
    assert direct["loss"] == pytest.approx(via_run[-1]["loss"], rel=1e-6)


def _committed(workdir):
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.mark.slow
def test_a_killed_import_resumes_complete_and_identical(original, imported, tmp_path):
    run, series = original
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxlm.hf_import", f"--hf={series}", f"--workdir={out}", "--config=configs/tiny.py",
           f"--config.data.source=files:{run.parent / 'corpus'}/*.txt", "--config.data.val_fraction=0.2",
           *(f"--config.{k}={v}" for k, v in SMALL.items())]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while len(_committed(out)) < 4 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    _, err = p.communicate()
    done = _committed(out)
    assert p.returncode == -signal.SIGKILL and 4 <= len(done) < STEPS, (p.returncode, done, err[-2000:])
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"imported {STEPS - len(done)} step(s)" in res.stderr and f"skipped {len(done)} already there" in res.stderr
    assert _committed(out) == list(range(STEPS)) and not list((out / "checkpoints").glob("*tmp*"))
    _, trainer, _, _, _ = saved_run.load_run(imported, params_only=True)
    for s in range(STEPS):  # as the uninterrupted import: fingerprints and parameters
        assert checkpoint.read_meta(out, s)["fingerprints"] == checkpoint.read_meta(imported, s)["fingerprints"]
        a, b = saved_run.load_params(out, s, trainer), saved_run.load_params(imported, s, trainer)
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"imported 0 step(s) into {out / 'checkpoints'}; skipped {STEPS}" in again.stderr


# --- across seeds -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_seed_band_report_over_two_runs_and_an_import(original, imported, tmp_path):
    # copies: evaluating and probing write into a run, and the fixture's runs are the session's
    run, imported = (Path(shutil.copytree(r, tmp_path / name)) for r, name in ((original[0], "run"), (imported, "imp")))
    other = train_tiny_run(tmp_path / "s49", **{"model.scale_attn_by_inverse_layer_idx": True, "train.seed": 49,
                                                "model.initializer_range": 0.2, **SMALL})  # steps 0, 1, 2
    runs = [run, other, imported]
    losses = [_losses(eval_lib.evaluate_run(r, all_steps=True, log=quiet)) for r in runs]
    probes = [_probe(r, steps=[0, 1, 2]) for r in runs]
    for i, r in enumerate(runs):  # what harness --step=N --output=RUN/harness/N.json writes (lm_eval's results)
        (r / "harness").mkdir(exist_ok=True)
        for s in (1, 2):
            (r / "harness" / f"{s}.json").write_text(json.dumps({"results": {"my_mc": {
                "alias": "my_mc", "acc,none": 0.25 * i + 0.1 * s, "acc_stderr,none": 0.01}}}))
    written = seeds.seeds_report(runs, tmp_path / "report")
    names = sorted(p.name for p in written)
    assert names == ["eval.png", "harness_my_mc.png", "probe_bm25.png", "probe_position.png", "seeds.csv", "seeds.md"]
    for p in written:
        if p.suffix == ".png":
            assert p.read_bytes().startswith(b"\x89PNG")
    rows = {(r["metric"], int(r["step"])): r for r in _csv(tmp_path / "report" / "seeds.csv")}
    assert {s for m, s in rows if m == "eval/loss"} == {0, 1, 2}  # the steps every run has
    for s in (0, 1, 2):
        v = [losses[i][s] for i in range(3)]
        r = rows[("eval/loss", s)]
        assert float(r["mean"]) == pytest.approx(np.mean(v), rel=1e-7) and float(r["std"]) == pytest.approx(np.std(v), rel=1e-6)
        assert (float(r["min"]), float(r["max"]), int(r["runs"])) == pytest.approx((min(v), max(v), 3), rel=1e-7)
        comp = [next(x["compression"] for x in p["bm25"] if (x["step"], x["layer"]) == (s, 2)) for p in probes]
        assert float(rows[("probe/bm25/layer2", s)]["mean"]) == pytest.approx(np.mean(comp), rel=1e-6)
    assert float(rows[("harness/my_mc/acc", 2)]["mean"]) == pytest.approx(np.mean([0.2, 0.45, 0.7]))
    assert ("harness/my_mc/acc_stderr", 2) not in rows
    assert losses[0][1] != losses[1][1]  # two seeds: a band with a width
    md = (tmp_path / "report" / "seeds.md").read_text()
    assert "| eval/loss | 2 |" in md and "![eval](eval.png)" in md
    res = subprocess.run([sys.executable, "-m", "jaxlm.ablate", "seeds", *map(str, runs), f"--out={tmp_path / 'cli'}"],
                         cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "seeds: wrote eval.png" in res.stdout, res.stderr[-2000:]
    one = subprocess.run([sys.executable, "-m", "jaxlm.ablate", "seeds", str(run), f"--out={tmp_path / 'x'}"],
                         cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
    errors = [line for line in one.stderr.splitlines() if line.startswith("error:")]
    assert one.returncode == 1 and len(errors) == 1 and "two or more run directories" in errors[0], one.stderr


def _csv(path):
    import csv

    return list(csv.DictReader(path.read_text().splitlines()))
