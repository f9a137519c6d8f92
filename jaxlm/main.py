"""Entry point: flags -> config -> (distributed init) -> run.

    python -m jaxlm.main --config=configs/tiny.py --workdir=runs/tiny [--config.train.steps=100]
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from jaxlm import config as config_lib  # also puts the repo root on sys.path for configs/
from jaxlm.errors import CheckpointError, ConfigError, DataError

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file, e.g. configs/gpt2_small.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: metrics, checkpoints, data cache.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-process: HOST:PORT of process 0 (automatic on TPU VMs and SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes in all.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")


def main(argv):
    del argv
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required, e.g. "
                             "python -m jaxlm.main --config=configs/tiny.py --workdir=runs/tiny")
    import logging

    config_lib.set_xla_flags(_CONFIG.value)  # before the backend starts

    import jax

    from jaxlm import distributed, train

    try:
        how = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as e:
        sys.exit(f"error: {e}")
    log_file = distributed.process_log(_WORKDIR.value)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO)  # INFO reaches the per-process log file ...
    absl_logging.get_absl_handler().setLevel(logging.WARNING)  # ... the console shows warnings and up
    logger = logging.getLogger("jaxlm")
    logger.info("process %d of %d (%s), %d local / %d global devices", jax.process_index(), jax.process_count(),
                how, jax.local_device_count(), jax.device_count())
    is_main = jax.process_index() == 0

    def say(text):
        logger.info(text)
        if is_main:
            print(text, flush=True)

    try:
        result = train.run(_CONFIG.value, _WORKDIR.value, log=say)
    except (ConfigError, DataError, CheckpointError) as e:
        logger.error("%s", e)
        sys.exit(f"error: {e}")
    except BaseException:
        logger.exception("the run failed; see %s", log_file)
        raise
    if result.stopped and not result.preempted:
        sys.exit(2)  # e.g. a non-finite loss outside fp16; a preempted run exits 0 and resumes


if __name__ == "__main__":
    app.run(main)
