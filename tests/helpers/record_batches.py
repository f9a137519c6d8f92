"""What the train step really consumed, recorded for the batch viewer's tests (tests/test_batch_viewer.py).

``recording_init(sink)`` is a ``Trainer.__init__`` whose trainer's jitted train step first hands
``sink(step, batch)`` the global batch it is called with (gathered from every process with
``process_allgather``, so every process must call it: they do, in lockstep), numbered from 1 as in
metrics.jsonl (a fresh run without train.budget: the count of calls; a budget's startup
timing calls the step too). ``lower`` stays the jitted step's own, which
``jaxlm.run`` compiles ahead of the first step.

``python tests/helpers/record_batches.py ARGS...`` runs ``jaxlm.main ARGS`` so recorded, process 0
saving each step's global batch as ``step-NNNN.npy`` into ``$JAXLM_TEST_BATCHES`` (test-only; jaxlm
itself is not changed).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm import train


class Recording:
    """A jitted train step that records each batch before it trains on it."""

    def __init__(self, step_fn, sink: Callable[[int, np.ndarray], None]):
        self.step_fn, self.sink, self.calls = step_fn, sink, 0

    def __call__(self, state, batch, *rest):
        self.calls += 1
        self.sink(self.calls, np.asarray(multihost_utils.process_allgather(batch, tiled=True)))
        return self.step_fn(state, batch, *rest)

    def lower(self, *args, **kwargs):
        return self.step_fn.lower(*args, **kwargs)


def recording_init(sink: Callable[[int, np.ndarray], None]):
    """``Trainer.__init__`` (the current one) with its train step wrapped in a Recording."""
    real = train.Trainer.__init__

    def __init__(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.train_step = Recording(self.train_step, sink)

    return __init__


def _save_into(directory: Path) -> Callable[[int, np.ndarray], None]:
    def sink(step: int, batch: np.ndarray) -> None:
        if jax.process_index() == 0:
            np.save(directory / f"step-{step:04d}.npy", batch)
    return sink


if __name__ == "__main__":
    import runpy

    out = Path(os.environ["JAXLM_TEST_BATCHES"])
    out.mkdir(parents=True, exist_ok=True)
    train.Trainer.__init__ = recording_init(_save_into(out))
    sys.argv = ["jaxlm.main"] + sys.argv[1:]
    runpy.run_module("jaxlm.main", run_name="__main__", alter_sys=True)
