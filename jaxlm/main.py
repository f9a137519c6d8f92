"""Train (or resume) a run: flags -> config -> (distributed init) -> run.

    python -m jaxlm.main --config=configs/tiny.py --workdir=runs/tiny [--config.train.steps=100]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import jax
from absl import flags
from absl import logging as absl_logging

from jaxlm import cli, distributed, lease, paths
from jaxlm import config as config_lib
from jaxlm import run as run_lib
from jaxlm.errors import JaxlmError


def define_flags():
    cli.define_config("config", "A config file, e.g. configs/gpt2_small.py (found from any directory).")
    flags.DEFINE_string("workdir", None, "Run directory: metrics, checkpoints, data cache.")
    flags.DEFINE_string("coordinator_address", None,
                        "Multi-process: HOST:PORT of process 0 (automatic on TPU VMs and SLURM).")
    flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes in all.")
    flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")


def main(argv):
    F = cli.FLAGS
    cli.require(config=F.config, workdir=F.workdir)
    cfg = F.config
    config_lib.validate(cfg)  # before anything starts or is written
    config_lib.check_corpus(cfg)
    paths.check_url(F.workdir, "--workdir")
    paths.check_url(cfg.data.cache_dir, "data.cache_dir")
    config_lib.set_xla_flags(cfg)  # before the backend starts (at the first device use, below)

    how = distributed.initialize(F.coordinator_address, F.num_processes, F.process_id, timeouts=cfg.distributed)
    existed = paths.is_remote(F.workdir) or Path(F.workdir).exists()
    log_file = distributed.process_log(F.workdir)
    absl_logging.set_verbosity(absl_logging.INFO)  # INFO reaches the per-process log file ...
    absl_logging.get_absl_handler().setLevel(logging.WARNING)  # ... the console shows warnings and up
    logger = logging.getLogger("jaxlm")
    logger.info("process %d of %d (%s), %d local / %d global devices", jax.process_index(), jax.process_count(),
                how, jax.local_device_count(), jax.device_count())
    is_main = jax.process_index() == 0
    if is_main and paths.is_remote(F.workdir):
        print(f"per-process logs: {log_file.parent} (on each host; the workdir is an object store)", flush=True)

    def say(text):
        logger.info(text)
        if is_main:
            print(text, flush=True)

    try:
        result = run_lib.run(cfg, F.workdir, log=say)
    except JaxlmError as e:  # the console gets it once, from cli; the log file gets it at INFO
        logger.info("error: %s", e)
        if not paths.is_remote(F.workdir) and not isinstance(e, lease.LeaseError):  # (the holder's log stays)
            _forget_log(log_file, Path(F.workdir), existed)
        raise
    except Exception as e:
        if cli.no_space(e) is not None:  # one line on the console (cli), the traceback in the log file
            logger.info("the run failed", exc_info=True)
        else:
            logger.exception("the run failed; see %s", log_file)
        raise
    if result.stopped and not result.preempted:
        sys.exit(2)  # e.g. a non-finite loss outside fp16; a preempted run exits 0 and resumes


def _forget_log(log_file: Path, workdir: Path, existed: bool) -> None:
    """A run refused before its first checkpoint (bad data, a model that does not fit the vocabulary)
    leaves no log file behind, nor a workdir this command created and nothing else went into."""
    if (workdir / "checkpoints").exists():
        return  # a run that has started keeps its log
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)
              and Path(h.baseFilename) == log_file.resolve()]:
        root.removeHandler(h)
        h.close()
    log_file.unlink(missing_ok=True)
    for d in (log_file.parent, *(() if existed else (workdir,))):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


if __name__ == "__main__":
    cli.run(main, define_flags)
