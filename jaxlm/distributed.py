"""Multi-process initialisation: one JAX process per host (or per GPU), all running the same command.

* Explicit: ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or the
  environment variables JAXLM_COORDINATOR_ADDRESS, JAXLM_NUM_PROCESSES, JAXLM_PROCESS_ID).
* Automatic: on a TPU VM pod slice and under SLURM with more than one task, where
  ``jax.distributed.initialize()`` finds everything itself.
* Otherwise (one process): nothing to do.

After it, ``jax.devices()`` spans every process; the mesh, the loader (each process reads its
own block of every batch) and Orbax (every process writes its own shards) work across them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

from jaxlm import paths
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
               process_id: int | None = None, local_device_ids: list[int] | None = None) -> str:
    """Initialises jax.distributed if this is a multi-process run; returns how ('explicit', 'tpu',
    'slurm' or 'single')."""
    coordinator_address = coordinator_address or os.environ.get("JAXLM_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAXLM_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAXLM_PROCESS_ID")
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ConfigError("--coordinator_address needs --num_processes and --process_id too "
                             "(or JAXLM_NUM_PROCESSES / JAXLM_PROCESS_ID)")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids)
        return "explicit"
    how = detect()
    if how:
        jax.distributed.initialize()
        return how
    return "single"


def process_log(workdir) -> Path:
    """Every process appends its own log file, WORKDIR/logs/process-<i>.log (absl and Python logging).
    For a workdir on an object store (no appends there) the file is local to each host:
    ``paths.mirror(WORKDIR)/logs/process-<i>.log`` (``jaxlm.main`` prints where)."""
    base = paths.mirror(workdir) if paths.is_remote(workdir) else Path(workdir)
    path = base / "logs" / f"process-{jax.process_index()}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir}: cannot write {path} ({e.strerror}); give a writable directory") from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    return path
