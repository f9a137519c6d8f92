"""Checkpoints: Mistral's schedule, bit-identical repeats, SIGKILL/SIGTERM resume, corruption, export."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlm import checkpoint, config, saved_run, telemetry
from jaxlm.errors import CheckpointError

from conftest import ROOT, once_per_session, write_word_corpus

STEPS = 40
HELPERS = ROOT / "tests" / "helpers"


def test_mistral_schedule():
    steps = checkpoint.schedule(checkpoint.MISTRAL_STAGES, 400_000)
    assert len(steps) == 609  # 10 + 38 + 180 + 380, plus step 0
    assert steps[:3] == [0, 10, 20] and steps[-1] == 400_000
    for s in (100, 2000, 20000, 150, 2100, 21000):
        assert s in steps
    for s in (110, 2050, 20500, 399_999):
        assert s not in steps
    # past the last stage: its interval; plus the final step whatever it is
    assert checkpoint.schedule(((10, 20),), 45) == [0, 10, 20, 30, 40, 45]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return once_per_session(tmp_path_factory, "ck-corpus", lambda d: write_word_corpus(d, 40))


def _args(workdir, corpus, cache, **over):
    o = {"data.source": f"files:{corpus}/*.txt", "data.vocab_size": 300, "data.cache_dir": str(cache),
         "data.val_fraction": 0.0, "train.steps": STEPS, "train.batch_size": 8, "train.seq_len": 32,
         "model.n_positions": 32, "model.embd_pdrop": 0.1, "model.attn_pdrop": 0.1, "model.resid_pdrop": 0.1,
         "optim.warmup_steps": 5, "log.every": 1, "log.stats_every": 0, "log.wandb_mode": "disabled",
         "train.eval_every": 0, "checkpoint.stages": "((5, 1000),)", "checkpoint.latest_every_minutes": 0.0}
    o.update(over)
    return [sys.executable, "-m", "jaxlm.main", "--config=configs/tiny.py", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in o.items()]


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def _run(args, timeout=300):
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_env())
    return out


def _losses(workdir) -> dict[int, float]:
    """step -> that step's loss (log.every=1), the final record of each step."""
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if telemetry.STEP_LOSSES in r:
            out[r["step"]] = r[telemetry.STEP_LOSSES][-1]
    return out


def _final_params(workdir, step=STEPS):
    _, _, state, _, _ = saved_run.load_run(workdir, step)
    return jax.tree.map(np.asarray, jax.device_get(state.params))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One uninterrupted run, and a second identical one: per-step losses must be bit-identical."""
    def build(root):
        runs = []
        for name in ("a", "b"):
            out = _run(_args(root / name, corpus, root / "cache"))
            assert out.returncode == 0, out.stderr[-3000:]
            runs.append(_losses(root / name))
        assert sorted(runs[0]) == list(range(1, STEPS + 1))
        return root / "a", runs

    return once_per_session(tmp_path_factory, "ck-reference", build)


@pytest.mark.slow
def test_same_config_twice_gives_bit_identical_losses(reference):
    _, (a, b) = reference
    assert a == b  # exact float equality, every step


def _wait_for(pred, timeout, poll=0.002):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(poll)
    return False


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(reference, corpus, tmp_path):
    """First a SIGKILL while the save of step 10 is provably in flight (tests/helpers/blocking_save.py
    holds it in Orbax's temporary directory, uncommitted), then two at random moments; the resumed
    run must never use the half-saved step and must reproduce the reference bit for bit."""
    ref_dir, (ref, _) = reference
    work = tmp_path / "killed"
    ckdir = work / "checkpoints"
    args = _args(work, corpus, ref_dir.parent / "cache")
    rnd = random.Random(1234)
    marker = tmp_path / "save-in-flight"
    for attempt in range(3):
        if attempt == 0:
            # the save of step 10 blocks before its commit; the run stops at the next save (15)
            cmd = [sys.executable, str(HELPERS / "blocking_save.py"), "jaxlm.main"] + args[3:]
            env = {**_env(), "JAXLM_TEST_BLOCK_STEP": "10", "JAXLM_TEST_BLOCK_MARKER": str(marker)}
        else:
            cmd, env = args, _env()
        log = tmp_path / f"stderr-{attempt}.txt"  # a file, not a pipe: a full pipe would stall the run
        with open(log, "w") as err:
            p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            if attempt == 0:
                assert _wait_for(lambda: marker.exists() or p.poll() is not None, 240, poll=0.05)
                assert p.poll() is None, log.read_text()[-3000:]
                tmp = Path(marker.read_text())
                assert tmp.parent == ckdir.resolve() and tmp.is_dir()  # the save is in flight, uncommitted
                assert not (ckdir / "10").exists()
            else:
                _wait_for(lambda: (work / "metrics.jsonl").exists() and max(_losses(work) or {0: 0}) >= 2, 120)
                time.sleep(rnd.uniform(0.05, 1.0))  # a random moment of training
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait(60)
        if attempt == 0:
            assert tmp.is_dir() and checkpoint.saved_steps(work) == [0, 5]  # the killed save is not listed
    out = _run(args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from the checkpoint at step" in out.stderr + out.stdout
    assert _losses(work) == ref  # every step after each resume, bit for bit
    for a, b in zip(jax.tree.leaves(_final_params(work)), jax.tree.leaves(_final_params(ref_dir))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_exits_0_and_resumes_exactly(reference, corpus, tmp_path):
    ref_dir, (ref, _) = reference
    work = tmp_path / "term"
    args = _args(work, corpus, ref_dir.parent / "cache", **{"checkpoint.stages": "((1000, 1000),)"})
    p = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: (work / "metrics.jsonl").exists() and max(_losses(work) or {0: 0}) >= 7, 120)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    assert "preempted by SIGTERM" in err
    saved = checkpoint.saved_steps(work)
    last = max(_losses(work))
    assert saved == [0, last]  # only the initial and the preemption save (schedule: every 1000)
    out = _run(args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from the checkpoint at step {last}" in out.stderr + out.stdout
    assert _losses(work) == ref


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(reference, corpus, tmp_path):
    import shutil

    ref_dir, (ref, _) = reference
    work = tmp_path / "corrupt"
    shutil.copytree(ref_dir, work)  # a finished run: checkpoints 0, 5, ..., 40
    newest = work / "checkpoints" / str(STEPS)
    for f in (newest / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])  # truncated files
    out = _run(_args(work, corpus, ref_dir.parent / "cache"))
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stderr + out.stdout
    warned = [line for line in out.stderr.splitlines() if f"checkpoint {newest} cannot be restored" in line]
    assert len(warned) == 1 and "Error" in warned[0].split("cannot be restored (")[1]  # one line, naming the cause
    assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr
    assert f"resumed from the checkpoint at step {STEPS - 5}" in log
    assert _losses(work) == ref  # the last steps were recomputed exactly
    assert list((work / "checkpoints").glob(f"{STEPS}.corrupt-*"))


@pytest.mark.slow
def test_changed_model_shape_on_resume_names_the_fields(reference, corpus, tmp_path):
    ref_dir, _ = reference
    work = tmp_path / "shape"
    cache = ref_dir.parent / "cache"
    assert _run(_args(work, corpus, cache, **{"train.steps": 5})).returncode == 0
    out = _run(_args(work, corpus, cache, **{"train.steps": 5, "model.n_embd": 96, "precision.regime": "bf16"}))
    assert out.returncode != 0
    assert "model.n_embd: 64 -> 96" in out.stderr and "precision.regime: 'fp32' -> 'bf16'" in out.stderr
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["0", "5"]  # nothing set aside


@pytest.mark.slow
def test_checkpoint_of_another_parameter_layout_names_the_jaxlm_that_wrote_it(reference, corpus, tmp_path):
    """A checkpoint whose recorded train-state signature differs (as one from a jaxlm with another
    parameter layout does) is refused up front with the writing commit, never set aside as corrupt."""
    import shutil

    ref_dir, _ = reference
    work = tmp_path / "other"
    shutil.copytree(ref_dir, work)
    for step_dir in (work / "checkpoints").iterdir():
        meta_file = step_dir / "meta" / "metadata"
        meta = json.loads(meta_file.read_text())
        meta.update(state_signature="0" * 16, jaxlm_commit="1234abc")
        meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"written by jaxlm 1234abc.*python -m jaxlm\.export"):
        saved_run.load_run(work)
    out = _run(_args(work, corpus, ref_dir.parent / "cache", **{"train.steps": 2 * STEPS,
                                                                 "checkpoint.allow_config_change": True}))
    assert out.returncode != 0
    assert f"train.steps: {STEPS} -> {2 * STEPS}" in out.stderr and "written by jaxlm 1234abc" in out.stderr, out.stderr[-2000:]
    assert not list((work / "checkpoints").glob("*.corrupt-*"))


@pytest.mark.slow
def test_export_to_hugging_face(reference, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxlm import export, model

    ref_dir, _ = reference
    out = export.export(ref_dir, tmp_path / "hf")
    assert (out / "tokenizer.model").exists()
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager").eval()
    _, trainer, state, _, _ = saved_run.load_run(ref_dir)
    tokens = np.random.RandomState(0).randint(0, 300, (2, 16))
    ours = np.asarray(model.logits(trainer.graphdef, state.params, tokens))
    with torch.no_grad():
        theirs = hf_model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4


def test_time_based_latest_is_replaced_by_the_next_save(tmp_path):
    import jax.numpy as jnp
    import ml_collections

    cfg = ml_collections.ConfigDict({"train": {"steps": 100}, "checkpoint": {
        "stages": ((5, 1000),), "keep": 0, "keep_every": 0, "async_save": True, "latest_every_minutes": 0.0}})
    state = {"w": jnp.arange(4.0)}
    ck = checkpoint.Checkpointer(tmp_path, cfg, abstract_state=jax.eval_shape(lambda: state))
    ck.cfg.checkpoint.latest_every_minutes = 1e-9  # every step is "due" by the clock
    for step in range(1, 8):
        assert ck.on_step(step, state, {"next_index": step, "epoch": 0}) is None
    ck.manager.wait_until_finished()
    assert ck.steps() == [5, 7]  # 5 is scheduled; 6 (time-based) was replaced by 7 (time-based)
    ck.close()


@pytest.mark.slow
def test_keep_the_last_n_plus_every_mth(reference, corpus, tmp_path):
    ref_dir, _ = reference
    out = _run(_args(tmp_path / "w", corpus, ref_dir.parent / "cache", **{
        "train.steps": 12, "checkpoint.stages": "((1, 1000),)", "checkpoint.keep": 2, "checkpoint.keep_every": 5}))
    assert out.returncode == 0, out.stderr[-2000:]
    assert checkpoint.saved_steps(tmp_path / "w") == [0, 5, 10, 11, 12]


def test_a_field_added_later_reads_as_what_older_configs_meant():
    """Configs saved before model.vocab_multiple existed had no padding: resuming one with
    vocab_multiple=1 is no change, with the default 128 a named one (the table's shape differs)."""
    old = {"model": {"n_embd": 64}}
    assert config.config_differences(old, {"model": {"n_embd": 64, "vocab_multiple": 1}}) == []
    assert config.config_differences(old, {"model": {"n_embd": 64, "vocab_multiple": 128}}) == [
        "model.vocab_multiple: 1 -> 128"]
