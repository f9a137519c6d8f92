"""Nothing lost, nothing silent: metrics under kills, damaged checkpoints, early signals, clear messages."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jaxlm import config, data, files, telemetry
from jaxlm import run as run_lib
from jaxlm.ablate import grid, plots

from conftest import ROOT, once_per_session, write_word_corpus


def _cfg(corpus, cache, **over):
    o = {"data.source": f"files:{corpus}/*.txt", "data.vocab_size": 300, "data.cache_dir": str(cache),
         "data.val_fraction": 0.0, "train.steps": 12, "train.batch_size": 8, "train.seq_len": 32,
         "model.n_positions": 32, "optim.schedule": "constant", "optim.warmup_steps": 2, "log.every": 1,
         "log.stats_every": 0, "log.wandb_mode": "disabled", "train.eval_every": 0,
         "checkpoint.stages": ((3, 1000),), "checkpoint.latest_every_minutes": 0.0}
    o.update(over)
    return config.load(ROOT / "jaxlm" / "configs" / "tiny.py", o)


def _records(workdir):
    records, bad = telemetry.read_metrics(Path(workdir) / "metrics.jsonl")
    assert bad == 0
    return [r for r in records if telemetry.LOSS in r]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return once_per_session(tmp_path_factory, "fault-corpus", lambda d: write_word_corpus(d, 30))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """12 uninterrupted steps (a constant schedule, so a run extended from 9 to 12 steps is the same run)."""
    def build(root):
        run_lib.run(_cfg(corpus, root / "cache"), root / "ref", log=lambda s: None)
        recs = _records(root / "ref")
        assert [r["step"] for r in recs] == list(range(1, 13))
        return root, recs

    return once_per_session(tmp_path_factory, "fault-reference", build)


# --- metrics.jsonl --------------------------------------------------------------------------------

def test_torn_last_metrics_line_is_dropped_with_a_count(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, telemetry.LOSS: 1.0 / s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "tr')
    assert telemetry.trim_metrics(path, 2) == 1
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


def test_atomic_write_keeps_the_old_file_when_killed_before_the_switch(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    files.atomic_write(path, "old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(path, "new")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


KILL_IN_REWRITE = """
import os, signal, runpy, sys
from jaxlm import files
real = files.atomic_write
def dying(path, data):
    if str(path).endswith("metrics.jsonl"):  # the resume's rewrite: write the new file, die before the switch
        tmp = str(path) + ".partial"
        open(tmp, "w").write(str(data)[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, data)
files.atomic_write = dying
sys.argv = ["jaxlm.main"] + sys.argv[1:]
runpy.run_module("jaxlm.main", run_name="__main__")
"""


@pytest.mark.slow
def test_kill_during_the_metrics_rewrite_on_resume_loses_nothing(corpus, reference, tmp_path):
    root, ref = reference
    work = tmp_path / "w"
    run_lib.run(_cfg(corpus, root / "cache", **{"train.steps": 6}), work, log=lambda s: None)
    before = (work / "metrics.jsonl").read_text()
    args = ["--config=configs/tiny.py", f"--workdir={work}", "--config.checkpoint.allow_config_change=True"] + [
        f"--config.{k}={v}" for k, v in {**_flat_overrides(corpus, root / "cache"), "train.steps": 12}.items()]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    killed = subprocess.run([sys.executable, "-c", KILL_IN_REWRITE, *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (work / "metrics.jsonl").read_text() == before  # the history survived the kill
    again = subprocess.run([sys.executable, "-m", "jaxlm.main", *args], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    got = _records(work)
    assert [r["step"] for r in got] == list(range(1, 13))  # every step once
    assert [r[telemetry.STEP_LOSSES] for r in got] == [r[telemetry.STEP_LOSSES] for r in ref]


def _flat_overrides(corpus, cache):
    return {"data.source": f"files:{corpus}/*.txt", "data.vocab_size": 300, "data.cache_dir": str(cache),
            "data.val_fraction": 0.0, "train.batch_size": 8, "train.seq_len": 32, "model.n_positions": 32,
            "optim.schedule": "constant", "optim.warmup_steps": 2, "log.every": 1, "log.stats_every": 0,
            "log.wandb_mode": "disabled", "train.eval_every": 0, "checkpoint.stages": "((3, 1000),)",
            "checkpoint.latest_every_minutes": 0.0}


# --- damaged checkpoints ------------------------------------------------------------------------------

@pytest.mark.slow
def test_flipped_bytes_in_the_newest_checkpoint_fall_back_to_the_previous_one(corpus, reference, tmp_path):
    root, ref = reference
    work = tmp_path / "w"
    run_lib.run(_cfg(corpus, root / "cache", **{"train.steps": 9}), work, log=lambda s: None)
    newest = work / "checkpoints" / "9"
    biggest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(biggest.read_bytes())
    for i in range(len(raw) // 3, len(raw) // 3 + 64):  # same size, other bytes
        raw[i] ^= 0xFF
    biggest.write_bytes(bytes(raw))
    said = []
    with pytest.warns(UserWarning) as warned:
        result = run_lib.run(_cfg(corpus, root / "cache", **{"train.steps": 12, "checkpoint.allow_config_change": True}),
                             work, log=said.append)
    msgs = [str(w.message) for w in warned if "cannot be restored" in str(w.message)]
    assert len(msgs) == 1 and "\n" not in msgs[0] and str(newest) in msgs[0], msgs
    assert any("resumed from the checkpoint at step 6" in s for s in said), said
    assert result.step == 12 and not result.stopped
    assert list((work / "checkpoints").glob("9.corrupt-*"))
    got = _records(work)
    assert [r["step"] for r in got] == list(range(1, 13))
    assert [r[telemetry.STEP_LOSSES] for r in got] == [r[telemetry.STEP_LOSSES] for r in ref]


def test_fingerprints_change_with_any_damaged_value():
    import jax.numpy as jnp

    from jaxlm import checkpoint

    state = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "h": jnp.ones(5, jnp.bfloat16),
             "n": jnp.int32(7), "ok": jnp.bool_(True)}
    a = checkpoint.fingerprints(state)
    b = checkpoint.fingerprints({**state, "w": state["w"].at[1, 2].set(jnp.inf)})
    c = checkpoint.fingerprints({**state, "h": state["h"].at[0].set(2.0)})
    assert a != b and a["w"] != b["w"] and a["h"] == b["h"]
    assert a["h"] != c["h"] and a["w"] == c["w"]
    assert a == checkpoint.fingerprints(jax_tree_copy(state))  # deterministic


def jax_tree_copy(tree):
    import jax

    return jax.tree.map(lambda x: x + 0, tree)


# --- signals before training ---------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_during_data_preparation_exits_0_and_leaves_no_temporary_files(tmp_path):
    corpus = write_word_corpus(tmp_path / "corpus", 1500, words_per_doc=800)
    args = [sys.executable, "-m", "jaxlm.main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
            f"--config.data.source=files:{corpus}/*.txt", "--config.data.vocab_size=2000", "--config.train.steps=3",
            "--config.log.wandb_mode=disabled"]
    p = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:  # the cache build, the longest part of startup, has started
        if line.startswith("tokenizing "):
            break
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert "interrupted by SIGTERM" in out + err and "Traceback" not in err
    leftovers = [str(x) for x in (tmp_path / "w").rglob("*tmp*")]
    assert leftovers == []


# --- what the user is told -----------------------------------------------------------------------------

def test_non_utf8_documents_are_counted_aloud(tmp_path):
    d = write_word_corpus(tmp_path / "c", 20)
    (d / "bad.txt").write_bytes(b"caf\xe9 au lait \xff\xfe and more words here " * 20)
    said = []
    data.prepare(_cfg(d, tmp_path / "cache"), tmp_path / "w", log=said.append)
    assert any("1 documents had bytes that are not UTF-8" in s for s in said), said


def test_a_diverged_cell_is_not_finished(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 5, telemetry.LOSS: 2.0}) + "\n" + json.dumps({"step": 10, telemetry.LOSS: "nan"}) + "\n")
    assert grid.outcome(tmp_path) == "diverged (non-finite training loss at step 10)"
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 5, telemetry.LOSS: 2.0}) + "\n")
    assert grid.outcome(tmp_path) == "finished"


def test_report_lines_differ_so_coincident_curves_show():
    styles = [plots._line_style(i, 100) for i in range(4)]
    assert len({s["marker"] for s in styles}) == 4 and len({s["markevery"] for s in styles}) == 4
    assert [s["lw"] for s in styles] == sorted((s["lw"] for s in styles), reverse=True)


def test_non_finite_parameter_norm_stops_a_non_fp16_run():
    from jaxlm import precision, train

    rec = {telemetry.NONFINITE: 0, telemetry.PARAM_NORM: float("inf")}
    assert "parameter norm" in train._nonfinite_stop(rec, 7, precision.policy("bf16"))
    assert train._nonfinite_stop(rec, 7, precision.policy("fp16")) is None  # loss scaling handles fp16
    assert train._nonfinite_stop({telemetry.PARAM_NORM: 3.0, telemetry.NONFINITE: 0}, 7,
                                 precision.policy("fp32")) is None
