"""``python tests/helpers/kill_at_step.py CONFIG OVERRIDES WORKDIR STEP``: trains CONFIG with OVERRIDES
(a dict's repr) in WORKDIR, and kill -9s itself after step STEP, once the saves in flight are done
(the checkpoints before STEP are whole): a kill between checkpoints, for the resume tests."""

import os
import signal
import sys

from jaxlm import checkpoint, config, run

real = checkpoint.Checkpointer.on_step
KILL_AT = int(sys.argv[4])


def on_step(self, step, state, data_state):
    out = real(self, step, state, data_state)
    if step == KILL_AT:
        self.manager.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)
    return out


checkpoint.Checkpointer.on_step = on_step
run.run(config.load(sys.argv[1], eval(sys.argv[2])), sys.argv[3], log=lambda s: None)
