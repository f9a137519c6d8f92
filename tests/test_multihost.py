"""Multi-process training on CPU: N local processes joined by jax.distributed (gloo collectives)
train the same global batches as one process; their checkpoints restore in one process."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxlm import saved_run, telemetry

from conftest import ROOT, once_per_session, write_word_corpus

STEPS = 6
GLOBAL_DEVICES = 4

pytestmark = pytest.mark.slow  # every test trains in jaxlm.main subprocesses (the `runs` fixture)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return once_per_session(tmp_path_factory, "mh-corpus", lambda d: write_word_corpus(d, 30))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(workdir, corpus, cache, n_proc, steps=STEPS, extra=()):
    args = [sys.executable, "-m", "jaxlm.main", "--config=configs/tiny.py", f"--workdir={workdir}",
            f"--config.data.source=files:{corpus}/*.txt", "--config.data.vocab_size=300",
            f"--config.data.cache_dir={cache}", "--config.data.val_fraction=0.0", f"--config.train.steps={steps}",
            "--config.train.batch_size=8", "--config.train.seq_len=32", "--config.model.n_positions=32",
            "--config.log.every=1", "--config.log.stats_every=0", "--config.log.wandb_mode=disabled",
            "--config.train.eval_every=0", "--config.checkpoint.stages=((3, 1000),)", "--config.optim.warmup_steps=2",
            # Adam's update lr·m/(sqrt(v)+eps) turns summation-order differences in a near-zero gradient
            # into lr-sized parameter differences when eps is tiny; 1e-3 keeps the comparison about the
            # distributed computation (as in tests/helpers/sharded_step.py)
            "--config.optim.eps=1e-3",
            *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={GLOBAL_DEVICES // n_proc}"}
    if n_proc == 1:
        procs = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    else:
        port = _free_port()
        procs = [subprocess.Popen(args + [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n_proc}",
                                          f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(n_proc)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    return outs


def _losses(workdir):
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if telemetry.STEP_LOSSES in r:
            out[r["step"]] = r[telemetry.STEP_LOSSES][-1]
    return out


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    def build(root):
        cache = root / "cache"
        _train(root / "p1", corpus, cache, 1)  # builds the shared cache first
        _train(root / "p2", corpus, cache, 2)
        return root, cache

    return once_per_session(tmp_path_factory, "mh-runs", build)


def test_two_processes_train_like_one(runs):
    root, _ = runs
    one, two = _losses(root / "p1"), _losses(root / "p2")
    assert sorted(one) == list(range(1, STEPS + 1)) == sorted(two)
    for s in one:
        assert abs(one[s] - two[s]) <= 1e-5 * abs(one[s]), (s, one[s], two[s])
    run = json.loads((root / "p2" / "run.json").read_text())
    assert run["environment"]["process_count"] == 2 and run["environment"]["device_count"] == GLOBAL_DEVICES
    # every process logs to its own file; only process 0 writes metrics
    assert (root / "p2" / "logs" / "process-0.log").exists() and (root / "p2" / "logs" / "process-1.log").exists()
    assert "process 1 of 2 (explicit)" in (root / "p2" / "logs" / "process-1.log").read_text()


def test_four_processes_train_like_one(runs, corpus, tmp_path):
    root, cache = runs
    _train(tmp_path / "p4", corpus, cache, 4)
    one, four = _losses(root / "p1"), _losses(tmp_path / "p4")
    for s in one:
        assert abs(one[s] - four[s]) <= 1e-5 * abs(one[s]), (s, one[s], four[s])


def test_two_process_checkpoint_restores_and_resumes_in_one_process(runs, corpus, tmp_path):
    root, cache = runs
    one_dev = jax.devices()[:1]
    import ml_collections

    from jaxlm import sharding as sharding_lib

    mesh = sharding_lib.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), devices=one_dev)
    _, _, s2, _, step = saved_run.load_run(root / "p2", mesh=mesh)
    _, _, s1, _, _ = saved_run.load_run(root / "p1", mesh=mesh)
    assert step == STEPS
    for a, b in zip(jax.tree.leaves(s2.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    shutil.copytree(root / "p2", tmp_path / "p2")  # (the shared run stays as it is)
    (out, err), = _train(tmp_path / "p2", corpus, cache, 1, steps=STEPS + 3,
                         extra=["--config.checkpoint.allow_config_change=True"])
    assert f"resumed from the checkpoint at step {STEPS}" in out + err
    assert sorted(_losses(tmp_path / "p2"))[-1] == STEPS + 3


def test_a_single_process_prints_every_failure_of_repeated_runs():
    """One error line per process is for multi-process runs (watchdog vs main thread); a single process
    that runs again after a failure (a notebook, a sweep) must print and raise each time, not wait."""
    from jaxlm import distributed

    assert distributed.claim_error_line() and distributed.claim_error_line()
