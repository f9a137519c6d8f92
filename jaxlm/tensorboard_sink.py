"""A TensorBoard sink: scalars, a run's config as text and hparams, resumes without duplicated steps.

``telemetry.Telemetry`` feeds it every record (``log.tensorboard``, on by default); it lives apart
from the metric names so that it knows nothing of them but the few it is handed.

TensorBoard names a run by its event directory relative to ``--logdir``, so a run's events go to
``WORKDIR/tensorboard/NAME`` (NAME: the workdir's name, see ``event_dir``): ``--logdir runs/`` shows
``NAME/tensorboard/NAME``, ``--logdir runs/NAME`` shows ``tensorboard/NAME``, and the command the run
prints at its start (``view_line``) shows ``NAME``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterable

from jaxlm.errors import ConfigError

EVENTS = "events.out.tfevents.*"


def event_dir(base, name: str) -> Path:
    """The directory of a run's event files under `base` (WORKDIR/tensorboard): `base`/`name` for a new
    run; where a run's events already are for a resumed one, so that purge_step (which acts within one
    directory) still hides the steps it writes again: `base` itself for a run started before runs had
    their own directory, the first directory holding events for a workdir renamed since it started."""
    base = Path(base)
    if not base.is_dir():
        return base / name
    if any(base.glob(EVENTS)):
        return base
    started = sorted(d for d in base.iterdir() if d.is_dir() and any(d.glob(EVENTS)))
    return started[0] if started else base / name


def view_line(directory, workdir) -> str:
    """The startup line with the commands that show the run whose events are in `directory` by its name,
    alone and beside the other runs of its parent directory."""
    directory = Path(directory)
    return (f"dashboard: tensorboard --logdir {directory.parent}  (this run, as {directory.name}; "
            f"every run beside it: tensorboard --logdir {Path(workdir).parent})")


class TensorBoard:
    """Event files in `directory` (see event_dir): every number of every record as a scalar (a
    per-layer list as ``name/<layer>``; a list named in `per_step` one value per step, the record at
    step s holding steps s-n+1 .. s), and on a fresh run the config as text and as hparams (section.key).

    A resumed run (from the checkpoint at `start_step`) opens a new event file with
    ``purge_step=start_step + 1``: TensorBoard drops the earlier files' events after the restored step,
    which the resumed run writes again, so no step appears twice; metrics.jsonl is trimmed the same way.
    ``flush`` runs before every checkpoint save, so the events up to a checkpoint are on disk when it is.
    Telemetry gives an object-store workdir's local mirror as `directory` (a TensorBoard reads that).

    Non-finite values are written as they are (TensorBoard shows NaN/Inf) and counted in `nonfinite`
    for one closing line, not warned about one by one (an fp16 run that overflows would print dozens;
    the steps themselves are in metrics.jsonl: train/nonfinite_steps, skipped_steps).
    """

    def __init__(self, directory, start_step: int, per_step: Iterable[str], *, hparam_metrics: Iterable[str] = (),
                 run_metadata: dict | None = None):
        try:  # TensorBoard's event writer and protos (no TensorFlow): imported only when a run logs to it
            from tensorboard.compat.proto import event_pb2, summary_pb2  # (see the line above)
            from tensorboard.summary.writer.event_file_writer import EventFileWriter  # (see above)
        except ImportError as e:
            raise ConfigError(f"log.tensorboard=True needs tensorboard ({e}): pip install 'tensorboard>=2.21.0', "
                              "or --config.log.tensorboard=False") from e

        self.directory = Path(directory)
        self.per_step, self.hparam_metrics = tuple(per_step), tuple(hparam_metrics)
        self.nonfinite = 0  # non-finite scalar values written (NaN/Inf, as TensorBoard shows them)
        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        # a new file per start, named to sort after the earlier ones (the name has the time in seconds only)
        n = len(list(self.directory.glob(EVENTS))) if self.directory.exists() else 0
        self.directory.mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(self.directory), flush_secs=30, filename_suffix=f".{n:04d}")
        if start_step:  # TensorBoard drops the steps after a SessionLog.START event's step, in this directory
            self.writer.add_event(self._event(step=start_step + 1, wall_time=time.time(),
                                              session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
        elif run_metadata is not None:
            self._write_config(run_metadata)

    def _write_config(self, meta: dict) -> None:
        from tensorboard.plugins.hparams import summary_v2 as hp  # (see __init__)
        from tensorboard.plugins.text import summary_v2 as text  # (see __init__)

        self._add(text.text_pb("config", "```\n" + json.dumps(meta, indent=2, sort_keys=True) + "\n```"), 0)
        flat = {}

        def walk(prefix, node):
            for k, v in node.items():
                if isinstance(v, dict):
                    walk(f"{prefix}{k}.", v)
                else:
                    ok = isinstance(v, (int, float, str, bool)) and (not isinstance(v, float) or math.isfinite(v))
                    flat[prefix + k] = v if ok else json.dumps(v)  # (the hparams plugin takes scalars and strings)
        walk("", meta.get("config", {}))
        self._add(hp.hparams_config_pb([hp.HParam(k) for k in flat], [hp.Metric(m) for m in self.hparam_metrics]), 0)
        self._add(hp.hparams_pb(flat), 0)

    def _add(self, summary, step: int) -> None:
        self.writer.add_event(self._event(summary=summary, step=step, wall_time=time.time()))

    def log(self, step: int, rec: dict[str, Any]) -> None:
        """float() also reads jsonable's "inf"/"nan" strings back, and a bool as 0/1."""
        for k, v in rec.items():
            if k in self.per_step:
                for i, x in enumerate(v):
                    self._scalar(k, float(x), step - len(v) + 1 + i)
            elif isinstance(v, list):
                for i, x in enumerate(v):
                    self._scalar(f"{k}/{i}", float(x), step)
            elif v is not None:
                self._scalar(k, float(v), step)

    def _scalar(self, tag: str, value: float, step: int) -> None:
        """A simple_value scalar (what TensorBoard's scalar dashboard reads)."""
        self.nonfinite += not math.isfinite(value)
        self._add(self._summary(value=[self._summary.Value(tag=tag, simple_value=value)]), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> str | None:
        """Closes the event file; returns the line that counts the non-finite values written, if any."""
        self.writer.close()
        n = self.nonfinite
        return f"tensorboard: {n} non-finite value{'s' if n > 1 else ''} logged (shown as NaN/Inf)" if n else None
