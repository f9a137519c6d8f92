"""A Weights & Biases sink (``log.wandb_mode``: offline by default, so nothing needs a network).

``telemetry.Telemetry`` feeds it every record. Starting a W&B run takes seconds (importing wandb,
starting its service process), so it starts on a thread while the run compiles and trains; records
wait in order until it has started, and only the end of the run waits for it. An error in the start
is raised at the first record after it, or at the end.
"""

from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from jaxlm import budget as budget_lib
from jaxlm import files, paths


class WandB:
    """One W&B run per workdir, of `config` (the run's config, flat keys added for W&B's grouping): its id
    is kept in ``WORKDIR/wandb_id``, so a resumed run continues it."""

    def __init__(self, workdir: Path, cfg, config: dict):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wandb-start")
        self._run = self._pool.submit(_start, workdir, cfg, config)
        self._waiting: list[tuple[int, dict]] = []  # records logged before the run had started

    def log(self, step: int, rec: dict[str, Any]) -> None:
        """A record's numbers, a list's as ``name/<index>`` (a per-layer list: one chart per layer)."""
        flat = {}
        for k, v in rec.items():
            if isinstance(v, list):
                flat.update({f"{k}/{i}": float(x) for i, x in enumerate(v) if not isinstance(x, str)})
            elif isinstance(v, (int, float)):
                flat[k] = v
        self._waiting.append((int(step), flat))
        if self._run.done():
            self._send()

    def _send(self) -> None:
        run = self._run.result()  # blocks only at the end of the run
        for step, flat in self._waiting:
            run.log(flat, step=step)
        self._waiting.clear()

    def finish(self) -> None:
        try:
            self._send()
            self._run.result().finish()
        finally:
            self._pool.shutdown()


def grouping(cfg) -> tuple[str | None, str | None]:
    """(group, job_type) of a run's W&B run: log.wandb_group / log.wandb_job_type where set (jaxlm.ablate
    sets them per cell); a budgeted run without them is grouped by its budget, 'budget-90s', of job
    type its regime, so the runs of one budget (seeds, regimes, learning rates) compare in one group."""
    group, job = cfg.log.wandb_group or None, cfg.log.wandb_job_type or None
    if budget_lib.parse(cfg.train.budget) is not None:
        group = group or f"budget-{str(cfg.train.budget).strip().replace(' ', '')}"
        job = job or cfg.precision.regime
    return group, job


def _start(workdir: Path, cfg, config: dict):
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb  # heavy (starts a service); only when a run logs to it

    run_id_file = workdir / "wandb_id"
    local = paths.mirror(workdir) if paths.is_remote(workdir) else workdir  # wandb writes local files
    run_id = run_id_file.read_text().strip() if run_id_file.exists() else uuid.uuid4().hex[:8]
    files.atomic_write(run_id_file, run_id)
    local.mkdir(parents=True, exist_ok=True)
    group, job = grouping(cfg)
    return wandb.init(project=cfg.log.wandb_project, dir=str(local), mode=cfg.log.wandb_mode, id=run_id,
                      resume="allow", name=workdir.name, config=config, group=group, job_type=job,
                      settings=wandb.Settings(console="off", x_disable_stats=True))
