"""A TensorBoard sink: scalars, a run's config as text and hparams, resumes without duplicated steps.

``telemetry.Telemetry`` feeds it every record (``log.tensorboard``, on by default); it lives apart
from the metric names so that it knows nothing of them but the few it is handed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from jaxlm.errors import ConfigError


class TensorBoard:
    """Event files in `directory` (WORKDIR/tensorboard): every number of every record as a scalar (a
    per-layer list as ``name/<layer>``; a list named in `per_step` one value per step, the record at
    step s holding steps s-n+1 .. s), and on a fresh run the config as text and as hparams (section.key).

    A resumed run (from the checkpoint at `start_step`) opens a new event file with
    ``purge_step=start_step + 1``: TensorBoard drops the earlier files' events after the restored step,
    which the resumed run writes again, so no step appears twice; metrics.jsonl is trimmed the same way.
    ``flush`` runs before every checkpoint save, so the events up to a checkpoint are on disk when it is.
    Telemetry gives an object-store workdir's local mirror as `directory` (a TensorBoard reads that).
    """

    def __init__(self, directory, start_step: int, per_step: Iterable[str], *, hparam_metrics: Iterable[str] = (),
                 run_metadata: dict | None = None):
        try:
            from tensorboardX import SummaryWriter  # protobuf machinery: only when a run logs to TensorBoard
        except ImportError as e:
            raise ConfigError(f"log.tensorboard=True needs tensorboardX ({e}): pip install 'tensorboardX>=2.6.5', "
                              "or --config.log.tensorboard=False") from e

        self.directory = Path(directory)
        self.per_step, self.hparam_metrics = tuple(per_step), tuple(hparam_metrics)
        # a new file per start, named to sort after the earlier ones (the name has the time in seconds only)
        n = len(list(self.directory.glob("events.out.tfevents.*"))) if self.directory.exists() else 0
        self.writer = SummaryWriter(str(self.directory), purge_step=start_step + 1 if start_step else None,
                                    flush_secs=30, filename_suffix=f".{n:04d}")
        if not start_step and run_metadata is not None:
            self._write_config(run_metadata)

    def _write_config(self, meta: dict) -> None:
        from tensorboardX.summary import hparams  # (see __init__)

        self.writer.add_text("config", "```\n" + json.dumps(meta, indent=2, sort_keys=True) + "\n```", 0)
        flat = {}

        def walk(prefix, node):
            for k, v in node.items():
                if isinstance(v, dict):
                    walk(f"{prefix}{k}.", v)
                else:
                    flat[prefix + k] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
        walk("", meta.get("config", {}))
        for summary in hparams(flat, {m: float("nan") for m in self.hparam_metrics}):
            self.writer.file_writer.add_summary(summary)

    def log(self, step: int, rec: dict[str, Any]) -> None:
        """float() also reads jsonable's "inf"/"nan" strings back, and a bool as 0/1."""
        for k, v in rec.items():
            if k in self.per_step:
                for i, x in enumerate(v):
                    self.writer.add_scalar(k, float(x), step - len(v) + 1 + i)
            elif isinstance(v, list):
                for i, x in enumerate(v):
                    self.writer.add_scalar(f"{k}/{i}", float(x), step)
            elif v is not None:
                self.writer.add_scalar(k, float(v), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
