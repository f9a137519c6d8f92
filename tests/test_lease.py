"""One run per workdir (jaxlm/lease.py): a second run on a workdir in use ends at once with one error line
naming the holder; a holder killed with kill -9 never blocks the next run (locally the kernel drops
its flock; on gs:// its lease goes stale); the read-only tools take no lease."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_gcs import BUCKET, gcs  # noqa: F401 (the GCS emulator fixture)

from jaxlm import lease, paths, telemetry

from conftest import ROOT, write_word_corpus
from helpers import pods

STEPS = 12  # checkpoints at 0, 3, 6, 9, 12
HOLD_AT = 5  # a held run waits after this step while its hold file exists (the lease held, mid-training)

# jaxlm.main, made to wait after step JAXLM_TEST_HOLD_AT while the file $JAXLM_TEST_HOLD exists (it writes
# its pid to $JAXLM_TEST_HOLD.reached first): a run that certainly holds its lease while another starts;
# with $JAXLM_TEST_HOSTNAME, under that host name. Test-only; what it trains is unchanged.
HOLD = """
import os, runpy, socket, sys, time
from jaxlm import checkpoint
if os.environ.get("JAXLM_TEST_HOSTNAME"):  # a run that looks as if on another machine
    socket.gethostname = lambda: os.environ["JAXLM_TEST_HOSTNAME"]
real, at, hold = checkpoint.Checkpointer.on_step, int(os.environ["JAXLM_TEST_HOLD_AT"]), os.environ["JAXLM_TEST_HOLD"]
def on_step(self, step, state, data_state):
    out = real(self, step, state, data_state)
    if step == at and os.path.exists(hold):
        open(hold + ".reached", "w").write(str(os.getpid()))
        while os.path.exists(hold):
            time.sleep(0.05)
    return out
checkpoint.Checkpointer.on_step = on_step
sys.argv = ["jaxlm.main"] + sys.argv[1:]
runpy.run_module("jaxlm.main", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("leasecorpus"), 30)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("leasecache")


def _env(hold: Path, **extra):
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "JAXLM_TEST_HOLD": str(hold),
            "JAXLM_TEST_HOLD_AT": str(HOLD_AT), "JAX_COMPILATION_CACHE_DIR": str(pods.compile_cache()),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
            **extra}


def _start(workdir, corpus, cache, env, log: Path) -> subprocess.Popen:
    """The run's command (jaxlm.main through HOLD), its output in `log`."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-c", HOLD, *pods.tiny_args(workdir, corpus, cache, STEPS)], cwd=ROOT,
                                env=env, stdout=f, stderr=subprocess.STDOUT)


def _wait_for(cond, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _errors(log: Path) -> list[str]:
    return [x for x in log.read_text(errors="replace").splitlines() if x.startswith("error:")]


def _refused(log: Path, holder_pid: int, host: str | None = None) -> str:
    """The refused run's output: one error line, naming the holder's pid and host, no traceback."""
    text = log.read_text(errors="replace")
    errors = _errors(log)
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert f"process {holder_pid} on {host or socket.gethostname()} (since " in errors[0], errors
    assert "in use by another run" in errors[0], errors
    return errors[0]


def _losses(workdir) -> dict[int, list[float]]:
    records, bad = telemetry.read_metrics(paths.path(workdir) / "metrics.jsonl")
    assert bad == 0
    return {r["step"]: r[telemetry.STEP_LOSSES] for r in records if telemetry.STEP_LOSSES in r}


# --- the lease itself ------------------------------------------------------------------------------

def test_a_local_lease_refuses_a_second_holder_in_one_line_and_is_removed_at_release(tmp_path):
    work = tmp_path / "w"
    with lease.Lease(work, holder=True):
        held = json.loads((work / lease.NAME).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["since"].endswith("UTC")
        assert "command" in held
        with pytest.raises(lease.LeaseError) as e:
            lease.Lease(work, holder=True).__enter__()
        msg = str(e.value)
        assert "\n" not in msg and f"process {os.getpid()} on {socket.gethostname()} (since {held['since']})" in msg
        assert f"kill {os.getpid()}" in msg and "run this command again to resume" in msg
    assert not (work / lease.NAME).exists()
    with lease.Lease(work, holder=True):  # free again
        pass


def test_a_process_that_is_not_the_holder_takes_no_lease(tmp_path):
    with lease.Lease(tmp_path / "w", holder=False):
        assert not (tmp_path / "w").exists()


def test_a_lease_is_released_on_an_error(tmp_path):
    with pytest.raises(RuntimeError):
        with lease.Lease(tmp_path, holder=True):
            raise RuntimeError("boom")
    with lease.Lease(tmp_path, holder=True):
        pass


def test_the_read_only_tools_take_no_lease():
    """Only jaxlm.run.run (training) takes it; eval, generate, export, probe and the batch viewer read
    checkpoints through saved_run's load_run / load_params, which do not."""
    for name in ("eval", "generate", "export", "probe/__main__", "probe/study", "data/viewer", "data/__main__",
                 "saved_run"):
        src = (ROOT / "jaxlm" / f"{name}.py").read_text()
        assert not re.search(r"\blease\b", src), name


def _holder_in_another_process(workdir: str) -> subprocess.Popen:
    """A process that takes the lease on `workdir` and sleeps holding it (returned once it holds it)."""
    code = (f"from jaxlm import lease; import time; lease.Lease({workdir!r}, holder=True).__enter__(); "
            "print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.mark.slow  # a subprocess
def test_a_local_holder_killed_with_kill_9_never_blocks_the_next(tmp_path):
    p = _holder_in_another_process(str(tmp_path))
    with pytest.raises(lease.LeaseError, match=f"process {p.pid} on"):
        lease.Lease(tmp_path, holder=True).__enter__()
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (tmp_path / lease.NAME).exists()  # its file stays; its lock is gone
    with lease.Lease(tmp_path, holder=True):
        assert json.loads((tmp_path / lease.NAME).read_text())["pid"] == os.getpid()


@pytest.mark.slow  # about 3 s of waiting for renewals and the stale timeout
def test_a_gs_lease_is_refused_taken_over_when_stale_lost_by_its_paused_holder_and_released(gcs, monkeypatch):  # noqa: F811
    monkeypatch.setenv("JAXLM_LEASE_STALE_S", "1.2")
    url = f"gs://{BUCKET}/lease-unit"
    lost, said = [], []
    a = lease.Lease(url, holder=True, on_lost=lost.append).__enter__()
    with pytest.raises(lease.LeaseError) as e:
        lease.Lease(url, holder=True).__enter__()
    msg = str(e.value)
    assert "\n" not in msg and f"process {os.getpid()} on {socket.gethostname()}" in msg and "goes stale" in msg
    time.sleep(1.0)  # renewed meanwhile (every 0.3 s): still held
    with pytest.raises(lease.LeaseError):
        lease.Lease(url, holder=True).__enter__()
    a._impl._stop.set()  # the holder pauses: no renewal
    a._impl._thread.join()
    time.sleep(1.5)
    b = lease.Lease(url, holder=True, log=said.append).__enter__()
    assert len(said) == 1 and said[0].startswith("warning:") and "took over the lease" in said[0], said
    a._impl._stop.clear()  # the paused holder wakes: its next renewal finds the lease taken
    a._impl._thread = threading.Thread(target=a._impl._renew)
    a._impl._thread.start()
    _wait_for(lambda: lost, "the lost lease", timeout=10)
    assert "taken over by" in lost[0] and "\n" not in lost[0]
    a.__exit__()  # its release does not touch the taker's lease
    with pytest.raises(lease.LeaseError):
        lease.Lease(url, holder=True).__enter__()
    b.__exit__()
    with lease.Lease(url, holder=True):  # released: free at once
        pass


# --- two runs on one workdir --------------------------------------------------------------------------

def _two_at_once(workdir, corpus, cache, logs: Path, env_extra=None):
    """Two identical runs started together: one holds the lease (held at step HOLD_AT until the other
    has exited); returns (the winner's Popen, its log, the refused one's log)."""
    logs.mkdir(parents=True, exist_ok=True)
    hold = logs / "hold"
    hold.touch()
    env = _env(hold, **(env_extra or {}))
    procs = [_start(workdir, corpus, cache, env, logs / f"run{i}.txt") for i in range(2)]
    try:
        _wait_for(lambda: any(p.poll() is not None for p in procs), "either run to end")
        loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
        winner = 1 - loser
        assert procs[winner].poll() is None and procs[loser].returncode == 1, (logs / f"run{loser}.txt").read_text()
        hold.unlink()
        assert procs[winner].wait(timeout=600) == 0, (logs / f"run{winner}.txt").read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return procs[winner], logs / f"run{winner}.txt", logs / f"run{loser}.txt"


@pytest.fixture(scope="module")
def together(corpus, cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("together")
    t0 = time.monotonic()
    winner, won, refused = _two_at_once(root / "w", corpus, cache, root / "logs")
    return root / "w", winner, won, refused, time.monotonic() - t0


@pytest.mark.slow
def test_two_runs_started_together_one_trains_and_the_other_is_refused_in_one_line(together):
    workdir, winner, won, refused, _ = together
    _refused(refused, winner.pid)
    assert not _errors(won) and f"done: step {STEPS} of {STEPS}" in won.read_text()
    assert sorted(_losses(workdir)) == list(range(1, STEPS + 1))
    assert not (workdir / lease.NAME).exists()  # released at the end


@pytest.mark.slow
def test_a_run_started_while_another_trains_is_refused_and_a_kill_9_of_the_holder_frees_the_workdir(
        together, corpus, cache, tmp_path):
    reference = _losses(together[0])
    work, hold = tmp_path / "w", tmp_path / "hold"
    hold.touch()
    first = _start(work, corpus, cache, _env(hold), tmp_path / "first.txt")
    try:
        _wait_for(lambda: Path(str(hold) + ".reached").exists() or first.poll() is not None, "the first run's step 5")
        assert first.poll() is None, (tmp_path / "first.txt").read_text()[-3000:]
        t0 = time.monotonic()
        second = _start(work, corpus, cache, _env(hold), tmp_path / "second.txt")
        assert second.wait(timeout=300) == 1
        refused_s = time.monotonic() - t0
        assert first.poll() is None  # the holder trains on, untouched
        _refused(tmp_path / "second.txt", first.pid)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    hold.unlink()
    out = subprocess.run([sys.executable, "-m", "jaxlm.main", *pods.tiny_args(work, corpus, cache, STEPS)], cwd=ROOT,
                         env=_env(hold), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from the checkpoint at step" in out.stdout and "error:" not in out.stderr
    assert _losses(work) == reference  # bit for bit
    print(f"refused in {refused_s:.1f} s (the whole second command)")


@pytest.mark.slow
def test_a_two_process_run_on_a_workdir_in_use_is_refused_on_every_process(corpus, cache, tmp_path):
    """Process 0 takes the lease for the run; refused, every process prints its one line and exits."""
    work = tmp_path / "w"
    with lease.Lease(work, holder=True):
        job = pods.Job(pods.tiny_args(work, corpus, cache, STEPS), 2, 4, tmp_path / "logs")
        codes = job.wait(300)
    assert codes[0] not in (0, None) and codes[1] not in (0, None), codes
    for i in range(2):
        errors = [x for x in job.out(i).splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and f"process {os.getpid()} on" in errors[0], job.out(i)[-3000:]
    assert not (work / "checkpoints").exists()


@pytest.mark.slow
def test_on_gs_a_second_run_is_refused_and_a_kill_9_holder_on_another_machine_goes_stale(
        gcs, together, corpus, cache, tmp_path):  # noqa: F811
    """The same on the GCS emulator, the holder under another host name (its pid cannot be checked from
    here) with a 4 s stale timeout: refused while the holder renews; after its kill -9 and the timeout
    the rerun takes the lease over and resumes, bit for bit."""
    reference = _losses(together[0])
    work, hold = f"gs://{BUCKET}/lease-run", tmp_path / "hold"
    hold.touch()
    env = _env(hold, **gcs, JAXLM_LEASE_STALE_S="4")
    first = _start(work, corpus, cache, {**env, "JAXLM_TEST_HOSTNAME": "other-host"}, tmp_path / "first.txt")
    try:
        _wait_for(lambda: Path(str(hold) + ".reached").exists() or first.poll() is not None, "the first run's step 5")
        assert first.poll() is None, (tmp_path / "first.txt").read_text()[-3000:]
        time.sleep(5)  # past one stale timeout: renewals keep the lease
        second = _start(work, corpus, cache, env, tmp_path / "second.txt")
        assert second.wait(timeout=300) == 1
        assert "goes stale" in _refused(tmp_path / "second.txt", first.pid, "other-host")
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    hold.unlink()
    time.sleep(4.5)  # the dead holder's lease goes stale
    out = subprocess.run([sys.executable, "-m", "jaxlm.main", *pods.tiny_args(work, corpus, cache, STEPS)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    took = [x for x in (out.stdout + out.stderr).splitlines() if "took over the lease" in x]
    assert len(took) == 1 and f"process {first.pid} on other-host" in took[0] and "not renewed for" in took[0], took
    assert "resumed from the checkpoint at step" in out.stdout
    assert _losses(work) == reference  # bit for bit
    released = json.loads(paths.path(work).joinpath(lease.NAME).read_text())
    assert "released" in released and released["pid"] != first.pid


@pytest.mark.slow  # a subprocess
def test_on_gs_a_lease_whose_holder_on_this_machine_is_gone_is_taken_over_at_once(gcs, tmp_path):  # noqa: F811
    """A kill -9, or an exit that skipped the release (a lost peer ends a process at once): a rerun on the
    holder's machine finds its pid gone and does not wait for the timeout."""
    url = f"gs://{BUCKET}/lease-dead-here"
    p = _holder_in_another_process(url)
    with pytest.raises(lease.LeaseError, match=f"process {p.pid} on"):
        lease.Lease(url, holder=True).__enter__()
    p.send_signal(signal.SIGKILL)
    p.wait()
    said = []
    with lease.Lease(url, holder=True, log=said.append):
        assert len(said) == 1 and f"process {p.pid} on" in said[0] and "its process is gone" in said[0], said
