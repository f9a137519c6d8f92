"""``WORKDIR/metrics.jsonl`` read back: the one reader (every tool's and the resume's) and what a
resumed run does to the file.

A record is one line: a JSON object with an integer ``step`` (``telemetry.Telemetry`` writes them).
Any other line (not UTF-8, not JSON, a line torn by a kill, not an object, no integer step) is skipped
and counted, never an error: a damaged history never blocks a resume, a report or a replay. A resume
rewrites the file clean (``resume``): the records up to the restored step, in one atomic replace.
"""

from __future__ import annotations

import json

from jaxlm import files, paths

STEP = "step"  # (telemetry.STEP)


def read_metrics(path) -> tuple[list[dict], int]:
    """The records of a metrics.jsonl, and how many lines were skipped (not a JSON object with an
    integer step: a torn last line, bytes that are not UTF-8, a line edited by hand)."""
    records, bad = [], 0
    for line in paths.path(path).read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError:  # (UnicodeDecodeError and json.JSONDecodeError both are)
            bad += 1
            continue
        if isinstance(record, dict) and type(record.get(STEP)) is int and record[STEP] >= 0:  # (not a bool)
            records.append(record)
        else:
            bad += 1
    return records, bad


def trim_metrics(path, last_step: int) -> int:
    """Keeps the records up to `last_step` (a resumed run writes the later ones again), in one atomic
    replace: a kill during it leaves the old file or the new one. Returns the lines skipped."""
    records, bad = read_metrics(path)
    keep = [r for r in records if r[STEP] <= last_step]
    files.atomic_write(path, "".join(json.dumps(r) + "\n" for r in keep))
    return bad


def resume(path, local, start_step: int) -> list[str]:
    """Makes `local` (the file the run appends to: `path` itself, or its local copy when `path` is in an
    object store) hold `path`'s records up to `start_step`, rewritten clean; returns the warnings to
    show: lines skipped (counted, in one warning), or a history missing when a checkpoint is resumed."""
    path = paths.path(path)
    found = path.exists()
    if local != path:
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(path.read_bytes() if found else b"")
    if not found:
        return [f"warning: {path} is missing; it is started again from step {start_step}, and the history before "
                f"step {start_step} is gone (the checkpoint holds the training state, not the metrics)"] if start_step else []
    skipped = trim_metrics(local, start_step)
    return [f"warning: {path}: skipped {skipped} line(s) that are not a JSON record with an integer step (not UTF-8, "
            "not JSON, cut short by a kill, or edited); the file is rewritten without them"] if skipped else []
