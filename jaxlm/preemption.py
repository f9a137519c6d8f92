"""Preemption: SIGTERM/SIGINT during a run, and on a multi-process run the step every process stops at.

* :class:`Signals` -- installed for a whole run: during startup a signal unwinds at once
  (:class:`Interrupted`; one process only), during training it is recorded and the loop saves the
  current step and stops.
* :func:`record_early` -- multi-process: installed before ``jax.distributed.initialize``, so a signal
  while the processes join is recorded (and acted on at the first step), not fatal.
* :class:`StopVote` -- multi-process: every process's "signal seen" flag, OR-ed by a tiny
  all-reduce after each step and read one step later, so every process stops at the same step
  (a signal reaches one host of a pod, not all: a TPU maintenance event, a SLURM node's preemption).
"""

from __future__ import annotations

import signal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived before training started (while data, model or checkpoint were prepared).
    A BaseException, like KeyboardInterrupt: no ``except Exception`` (a checkpoint thought corrupt, a
    failed read) may take it for an error of its own."""


_early: dict = {"received": None, "original": {}}  # record_early's signal, and the handlers it replaced


def record_early() -> None:
    """Records SIGTERM/SIGINT from now on (multi-process startup, before jax.distributed.initialize, when
    a signal would otherwise kill this process and leave its peers waiting for it to join);
    :class:`Signals` takes the recorded signal over when the run starts."""
    def handler(signum, frame):
        _early["received"] = signal.Signals(signum).name
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            _early["original"].setdefault(sig, signal.signal(sig, handler))
        except ValueError:  # not the main thread
            pass


class Signals:
    """SIGTERM and SIGINT handling for a whole run, installed before its first long operation.

    Until ``training()`` is called a signal raises :class:`Interrupted` where the program is, so
    startup unwinds at once (every temporary file it was writing is removed on the way out); after
    it, a signal is only recorded (``received``), and the loop saves the current step and stops.
    On a multi-process run a signal is only recorded from the start: one process unwinding alone
    would leave the others at a barrier; the step vote (``Checkpointer.vote``) stops them all at
    the same step once training starts.
    """

    def __init__(self):
        self.received: str | None = _early["received"]
        self._raise = jax.process_count() == 1
        self._old: dict = {}

    def __enter__(self) -> "Signals":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: signals are the caller's business
                pass
        return self

    def _handler(self, signum, frame):
        self.received = signal.Signals(signum).name
        if self._raise:
            raise Interrupted(self.received)

    def check(self) -> None:
        """Raises Interrupted if a signal came during startup: the handler's own raise can land where
        Python ignores exceptions (a garbage-collection callback), so startup also checks between steps."""
        if self._raise and self.received:
            raise Interrupted(self.received)

    def training(self) -> None:
        self.check()
        self._raise = False

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, _early["original"].get(sig, old))
        self._old.clear()
        return False


class StopVote:
    """Decisions every process must take at the same step, agreed by all: ``cast(*flags)`` after each
    step starts a tiny all-reduce (per flag, the max over every device of the value each process
    sets for its own devices: an OR); the result is read at the next ``cast``, when the step before
    has finished anyway, so the host never waits for the step in flight. Every process reads the
    same values for the same step."""

    def __init__(self, mesh, n_flags: int = 2):
        self.sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names, None))
        self.local = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
        self.size, self.n_flags = mesh.devices.size, n_flags
        self._any = jax.jit(lambda x: jnp.max(x, axis=0), out_shardings=NamedSharding(mesh, PartitionSpec()))
        self._pending = None

    def cast(self, *flags: bool) -> tuple[bool, ...]:
        """Votes `flags` for this step; returns the agreed votes of the previous step (all False at the first)."""
        local = np.tile(np.asarray([int(bool(f)) for f in flags], np.int32), (self.local, 1))
        ballot = self._any(jax.make_array_from_process_local_data(self.sharding, local, (self.size, len(flags))))
        previous, self._pending = self._pending, ballot
        if previous is None:
            return (False,) * len(flags)
        return tuple(bool(v) for v in jax.device_get(previous))
