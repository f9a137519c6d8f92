"""Pods: a signal to one process stops every process at the same step; a dead or failed process ends
the job at once with one line everyone prints; nothing committed is lost; reruns continue exactly.

Each test is a chain of multi-process runs (tests/helpers/pods.py) on one run directory, each run
with one injected fault, checked against an uninterrupted run of the same processes and devices.
The runs share one XLA compilation cache (pods.compile_cache): only the first of each program compiles."""

import json
import re
import time
from pathlib import Path

import pytest

from conftest import write_word_corpus
from helpers import pods

pytestmark = pytest.mark.slow  # every test starts several jaxlm.main processes

STEPS = 15  # checkpoints on schedule at 0, 3, ..., 15; each signal stops a run two steps after it


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("podscorpus"), 30)


def _losses(workdir) -> dict[int, list[float]]:
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "train/step_losses" in r:
            out[r["step"]] = r["train/step_losses"]
    return out


def _steps(workdir) -> list[int]:
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def _stopped_at(workdir, n_proc) -> set[int]:
    """The step each process's log file says it stopped and saved at (one entry if they agree)."""
    found = set()
    for i in range(n_proc):
        text = (Path(workdir) / "logs" / f"process-{i}.log").read_text()
        steps = re.findall(r"stopped: preempted by .*?checkpoint for step (\d+) saved", text)
        assert steps, f"process {i} did not log a preemption stop:\n{text[-2000:]}"
        found.add(int(steps[-1]))
    return found


def _run(tmp, workdir, corpus, cache, n_proc, devices, fault=None, tag="run"):
    job = pods.Job(pods.tiny_args(workdir, corpus, cache, STEPS), n_proc, devices, tmp / f"logs-{tag}", fault=fault)
    codes = job.wait(600)
    return job, codes


def test_sigterm_to_one_of_two_processes_saves_one_step_on_all_and_resumes_bit_identically(corpus, tmp_path):
    """A process killed before it joined jax.distributed ends its peer within init_timeout_s with one
    line. Then a SIGTERM lands in the cache build, while a process joins jax.distributed, in the first
    compile, a save and a step, one run each; every process exits 0 with one checkpoint at the same
    step; the finished curve is the uninterrupted run's, bit for bit."""
    cache, work = tmp_path / "cache", tmp_path / "w"
    job = pods.Job(pods.tiny_args(work, corpus, cache, STEPS, ["--config.distributed.init_timeout_s=5"]), 2, 4,
                   tmp_path / "logs-init-kill", fault="init:1:SIGKILL")
    t0 = time.monotonic()
    codes = job.wait(60)
    waited = time.monotonic() - t0  # (from the launch: python and jax imports, then the 5 s)
    assert codes == [1, -9], (codes, job.out(0)[-3000:])
    errs = re.findall(r"error: .*", job.out(0))
    assert errs == ["error: process 0 of 2: not every process joined jax.distributed within "
                    "distributed.init_timeout_s=5 s (one was killed or preempted before it joined, or never "
                    "started); run the same command again on every host"], job.out(0)[-3000:]
    print(f"the peer of a process killed before it joined exited {waited:.1f} s after the launch")
    seen = []
    for fault in ("build:0:SIGTERM", "init:1:SIGTERM", "compile:1:SIGTERM", "save=9:1:SIGTERM", "step=12:0:SIGTERM"):
        before = _steps(work) if (work / "checkpoints").exists() else []
        job, codes = _run(tmp_path, work, corpus, cache, 2, 4, fault=fault, tag=fault.split(":")[0])
        assert codes == [0, 0], (fault, codes, job.out(0)[-3000:], job.out(1)[-3000:])
        (stop,) = _stopped_at(work, 2)  # both processes, one step
        new = [s for s in _steps(work) if s not in before]
        assert new[-1] == stop and all(s % 3 == 0 for s in new[:-1]), (fault, before, _steps(work))
        seen.append(stop)
    assert seen == sorted(seen) and seen[-1] < STEPS, seen
    job, codes = _run(tmp_path, work, corpus, cache, 2, 4, tag="finish")
    assert codes == [0, 0], job.out(0)[-3000:]
    ref, ref_codes = _run(tmp_path, tmp_path / "ref", corpus, cache, 2, 4, tag="ref")
    assert ref_codes == [0, 0]
    got, want = _losses(work), _losses(tmp_path / "ref")
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
    assert got == want  # bit-identical, every step once


def test_four_processes_one_error_one_signal_one_kill(corpus, tmp_path):
    """Four processes on 8 simulated devices: (1) process 2's cache build fails: all four print the same
    error line and exit non-zero; (2) SIGTERM to process 3: all save one step and exit 0; (3) kill -9 of
    process 1: the other three exit non-zero within the bound, naming it and the step the rerun resumes
    from; (4) the rerun finishes with the uninterrupted run's curve."""
    cache, work = tmp_path / "cache", tmp_path / "w"
    job, codes = _run(tmp_path, work, corpus, cache, 4, 8, fault="error-build:2:SIGTERM", tag="error")
    assert all(c not in (0, None) for c in codes), codes
    lines = [re.findall(r"error: .*", job.out(i)) for i in range(4)]
    assert all(len(x) == 1 for x in lines) and len({x[0] for x in lines}) == 1, (lines, [job.out(i) for i in range(4)])
    assert lines[0][0].startswith("error: process 2 of 4: data.source: injected failure"), lines[0]

    job, codes = _run(tmp_path, work, corpus, cache, 4, 8, fault="step=2:3:SIGTERM", tag="term")
    assert codes == [0, 0, 0, 0], (codes, job.out(3)[-3000:])
    (stop,) = _stopped_at(work, 4)
    assert _steps(work) == [0, stop] and stop < STEPS

    job = pods.Job(pods.tiny_args(work, corpus, cache, STEPS, ["--config.distributed.lost_after_s=5"]), 4, 8,
                   tmp_path / "logs-kill", fault=f"step={stop + 1}:1:SIGKILL")
    died, t_died = None, None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        codes = [p.poll() for p in job.procs]
        if t_died is None and codes[1] is not None:
            t_died = time.monotonic()
        if t_died is not None and all(c is not None for c in codes):
            died = time.monotonic() - t_died
            break
        if t_died is not None and time.monotonic() - t_died > 60:
            break
        time.sleep(0.2)
    codes = job.wait(1)  # kills any survivor
    assert died is not None, f"a process was still alive 60 s after process 1 was killed: {codes}"
    assert codes[1] == -9 and all(c not in (0, None) for i, c in enumerate(codes) if i != 1), codes
    resume = _steps(work)[-1]
    for i in (0, 2, 3):
        errs = re.findall(r"error: .*", job.out(i))
        assert len(errs) == 1 and "process 1 of 4 is lost" in errs[0], (i, errs, job.out(i)[-2000:])
        assert f"resume from the checkpoint at step {resume}" in errs[0], (resume, errs)
    print(f"survivors of the kill -9 exited {died:.1f} s after it")  # (the bound is lost_after_s)

    job, codes = _run(tmp_path, work, corpus, cache, 4, 8, tag="finish")
    assert codes == [0, 0, 0, 0], job.out(0)[-3000:]
    assert f"resumed from the checkpoint at step {resume}" in job.out(0)
    ref, ref_codes = _run(tmp_path, tmp_path / "ref", corpus, cache, 4, 8, tag="ref")
    assert ref_codes == [0, 0, 0, 0]
    got, want = _losses(work), _losses(tmp_path / "ref")
    assert sorted(got) == list(range(1, STEPS + 1))
    assert {s: got[s] for s in want} == want  # bit-identical, every step once
