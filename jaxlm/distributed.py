"""Multi-process initialisation: one JAX process per host (or per GPU), all running the same command.

* Explicit: ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or the
  environment variables JAXLM_COORDINATOR_ADDRESS, JAXLM_NUM_PROCESSES, JAXLM_PROCESS_ID).
* Automatic: on a TPU VM pod slice and under SLURM with more than one task, where
  ``jax.distributed.initialize()`` finds everything itself.
* Otherwise (one process): nothing to do.

After it, ``jax.devices()`` spans every process; the mesh, the loader (each process reads its
own block of every batch) and Orbax (every process writes its own shards) work across them.

What one process sees, every process learns (``distributed.*`` in the config):

* A lost peer (killed -9, crashed, unreachable): each process's :class:`Watchdog` thread posts a
  heartbeat counter in the coordination service's key-value store every second and reads the
  others'; a counter that has not moved for ``lost_after_s`` ends this process at once with one
  ``error:`` line naming the lost process and the checkpoint the rerun resumes from. The
  coordination service's own heartbeat (``heartbeat_timeout_s``, longer) is the backstop.
* A failed peer: a process that fails posts its one error line (:func:`publish_failure`); the
  others print that same line and exit non-zero, so nobody waits at a barrier for it.
* A preempted peer: ``jaxlm.preemption.StopVote`` stops every process at the same step.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import jax
from jax._src import distributed as jax_distributed  # the coordination service's client (no public API)

from jaxlm import paths, preemption
from jaxlm.errors import ConfigError


def _env_int(name):
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def detect() -> str | None:
    """'tpu' or 'slurm' when jax.distributed.initialize() can configure itself; else None."""
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None, timeouts=None) -> str:
    """Initialises jax.distributed if this is a multi-process run, and starts the :class:`Watchdog`;
    returns how ('explicit', 'tpu', 'slurm' or 'single'). `timeouts`: the config's ``distributed``
    section (lost_after_s, heartbeat_timeout_s, shutdown_timeout_s, init_timeout_s); None: the defaults."""
    t = {**DEFAULT_TIMEOUTS, **(dict(timeouts) if timeouts is not None else {})}
    kw = {"heartbeat_timeout_seconds": int(t["heartbeat_timeout_s"]),
          "shutdown_timeout_seconds": int(t["shutdown_timeout_s"]),
          "initialization_timeout": int(t["init_timeout_s"])}
    coordinator_address = coordinator_address or os.environ.get("JAXLM_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAXLM_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAXLM_PROCESS_ID")
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ConfigError("--coordinator_address needs --num_processes and --process_id too "
                             "(or JAXLM_NUM_PROCESSES / JAXLM_PROCESS_ID)")
        _join(t, coordinator_address=coordinator_address, num_processes=num_processes,
              process_id=process_id, local_device_ids=local_device_ids, **kw)
        _watch(float(t["lost_after_s"]))
        return "explicit"
    how = detect()
    if how:
        _join(t, **kw)
        _watch(float(t["lost_after_s"]))
        return how
    return "single"


def _join(t: dict, **kw) -> None:
    """jax.distributed.initialize, bounded: a process that does not join within init_timeout_s (killed
    or preempted before it joined, never started) ends every other with one error line (JAX's own
    timeout, a little later, is the backstop: it aborts the process with a C++ stack trace). A signal
    meanwhile is recorded (preemption.record_early) and stops the run at its first step."""
    preemption.record_early()
    who = f"process {kw['process_id']} of {kw['num_processes']}: " if kw.get("process_id") is not None else ""
    message = (f"{who}not every process joined jax.distributed within distributed.init_timeout_s="
               f"{t['init_timeout_s']} s (one was killed or preempted before it joined, or never started); "
               "run the same command again on every host")
    timer = threading.Timer(float(t["init_timeout_s"]), _not_joined, args=(message,))
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(**{**kw, "initialization_timeout": int(kw["initialization_timeout"]) + 10})
    finally:
        timer.cancel()


def _not_joined(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(1)


# The defaults of configs/base.py's ``distributed`` section. lost_after_s bounds how long the
# survivors of a killed process hold their devices; it must exceed the longest time a live
# process's watchdog thread can go without running (a GIL held by one long C call).
DEFAULT_TIMEOUTS = {"lost_after_s": 10.0, "heartbeat_timeout_s": 30, "shutdown_timeout_s": 30, "init_timeout_s": 120}
_KEY = "jaxlm/alive/"
_state: dict = {"watchdog": None, "failed": False, "resume_hint": None, "told": False}
_posting = threading.Lock()  # this process's key: a heartbeat never overwrites its posted failure
_telling = threading.Lock()  # one error line per process: the watchdog's or the main thread's


def claim_error_line() -> bool:
    """True once per process: for whichever thread prints this process's one ``error:`` line. The
    other (the main thread, failing at a collective the watchdog already explained) then calls
    :func:`await_exit`."""
    if jax.process_count() == 1:  # no watchdog: the main thread always prints (and a process may run again)
        return True
    with _telling:
        told, _state["told"] = _state["told"], True
        return not told


def await_exit() -> None:
    """Blocks while the watchdog thread, which printed this process's line, ends the process."""
    while True:
        time.sleep(1.0)


def _client():
    return jax_distributed.global_state.client


def joined() -> bool:
    """Whether this process is one of a multi-process run (jax.distributed initialised)."""
    return _client() is not None


def set_resume_hint(hint: Callable[[], str]) -> None:
    """What the lost-peer line says the rerun resumes from (the run sets it once checkpoints exist)."""
    _state["resume_hint"] = hint


def publish_failure(message: str) -> None:
    """Tells every peer that this process failed with `message` (one line): they print it and exit."""
    with _posting:
        _state["failed"] = True
        if jax.process_count() > 1 and _client() is not None:
            try:
                _client().key_value_set(f"{_KEY}{jax.process_index()}", "failed:" + message, allow_overwrite=True)
            except Exception:  # the coordinator is gone: the peers' watchdogs find this process lost instead
                pass


def peer_failure(wait_s: float = 3.0) -> str | None:
    """The error line a failed peer posted, if one did within `wait_s` (this process failing too, at a
    barrier or a collective, is then most likely its consequence, not a cause of its own)."""
    if jax.process_count() == 1 or _client() is None:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            for key, v in _client().key_value_dir_get(_KEY):
                if v.startswith("failed:") and int(key.rsplit("/", 1)[-1]) != jax.process_index():
                    return v[len("failed:"):]
        except Exception:
            return None
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)


def publish_done() -> None:
    """This process finished (or stopped at an agreed step): peers stop watching it."""
    w = _state["watchdog"]
    if w is not None:
        w.finish()


def process_prefix() -> str:
    """'process I of N: ' on a multi-process run (every process prints a failed peer's line as is)."""
    return f"process {jax.process_index()} of {jax.process_count()}: " if jax.process_count() > 1 else ""


def _watch(lost_after_s: float) -> None:
    if jax.process_count() == 1 or lost_after_s <= 0:
        return
    _state["watchdog"] = Watchdog(lost_after_s)
    _state["watchdog"].start()
    # atexit runs last-registered first, so this runs before jax.distributed.shutdown (registered at
    # its initialize): a failed process does not wait at the shutdown barrier for peers that will
    # never come (they exit on seeing its failure, without that barrier).
    atexit.register(_exit_now_if_failed)


def _exit_now_if_failed() -> None:
    if _state["failed"]:
        _leave()


def _leave(grace_s: float = 5.0) -> None:
    """Exits with status 1 now; process 0 first gives the others up to `grace_s` to post that they
    are leaving too: the coordination service lives in process 0, and a client that loses it aborts
    (a C++ fatal error) before it can print its line."""
    sys.stdout.flush()
    sys.stderr.flush()
    if jax.process_index() == 0 and jax.process_count() > 1:
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                values = dict(_client().key_value_dir_get(_KEY))
            except Exception:
                break
            others = [v for k, v in values.items() if not k.endswith(f"/{jax.process_index()}")]
            if len(others) >= jax.process_count() - 1 and all(
                    v == "done" or v.startswith("failed:") for v in others):
                break
            time.sleep(0.1)
    os._exit(1)


class Watchdog(threading.Thread):
    """Heartbeats through the coordination service's key-value store; ends this process with one
    ``error:`` line when a peer has failed (it posted its error) or is lost (its counter stopped)."""

    def __init__(self, lost_after_s: float, every_s: float = 1.0):
        super().__init__(name="jaxlm-watchdog", daemon=True)
        self.lost_after_s, self.every_s = lost_after_s, every_s
        self.me, self.n = jax.process_index(), jax.process_count()
        self._done = threading.Event()
        self._beat = 0

    def finish(self) -> None:
        self._done.set()
        with _posting:
            try:
                _client().key_value_set(f"{_KEY}{self.me}", "done", allow_overwrite=True)
            except Exception:
                pass

    def run(self) -> None:
        client = _client()
        start = time.monotonic()
        last: dict[int, str] = {}
        seen: dict[int, float] = {p: start for p in range(self.n)}
        while not self._done.is_set():
            self._beat += 1
            now = time.monotonic()
            try:
                with _posting:
                    if not _state["failed"]:
                        client.key_value_set(f"{_KEY}{self.me}", str(self._beat), allow_overwrite=True)
                values = {int(k.rsplit("/", 1)[-1]): v for k, v in client.key_value_dir_get(_KEY)}
            except Exception as e:
                if now - seen[0] > self.lost_after_s and not self._done.is_set():
                    self._lost(0, f"the coordination service does not answer ({type(e).__name__})")
                time.sleep(self.every_s)
                continue
            for p, v in values.items():
                if v.startswith("failed:") and p != self.me and not self._done.is_set():
                    self._exit(v[len("failed:"):])
                if v != last.get(p):
                    last[p], seen[p] = v, now
            for p in range(self.n):
                if p != self.me and last.get(p, "") != "done" and not last.get(p, "").startswith("failed:") \
                        and now - seen[p] > self.lost_after_s:
                    if not self._done.is_set():
                        self._lost(p, f"no heartbeat for {now - seen[p]:.0f} s: killed, crashed or unreachable")
            self._done.wait(self.every_s)

    def _lost(self, p: int, why: str) -> None:
        hint = _state["resume_hint"]
        try:
            resume = hint() if hint is not None else "start again (no checkpoint yet)"
        except Exception:
            resume = "resume from the newest complete checkpoint"
        self._exit(f"process {p} of {self.n} is lost ({why}); every process stops; run the same command "
                   f"again to {resume}")

    def _exit(self, message: str) -> None:
        if not claim_error_line():  # the main thread is printing this process's own failure
            return
        logging.getLogger("jaxlm").info("error: %s", message)  # the log file; the console gets it below
        print(f"error: {message}", file=sys.stderr, flush=True)
        if not _state["failed"]:
            publish_failure(message)  # (the others print the same line, should they not have seen it yet)
        _leave()


class _ProcessLog(logging.FileHandler):
    """A process's log file. A record it cannot write (the disk is full) is dropped, not reported on
    stderr with logging's stack dump (hundreds of lines for one failed save): the run's error line
    says what failed and where."""

    def handleError(self, record):
        pass


def process_log(workdir) -> Path:
    """Every process appends its own log file, WORKDIR/logs/process-<i>.log (absl and Python logging).
    For a workdir on an object store (no appends there) the file is local to each host:
    ``paths.mirror(WORKDIR)/logs/process-<i>.log`` (``jaxlm.main`` prints where)."""
    base = paths.mirror(workdir) if paths.is_remote(workdir) else Path(workdir)
    path = base / "logs" / f"process-{jax.process_index()}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = _ProcessLog(path)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir}: cannot write {path} ({e.strerror}); give a writable directory") from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    return path
