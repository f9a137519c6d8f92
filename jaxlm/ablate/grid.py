"""Run a regime × layer-scaling × seed grid, one ordinary run directory per cell.

Cells run one after another in this process. A finished cell (its ``done.json``) is skipped; an
interrupted one resumes from its checkpoint, like any run. The data cache is shared by the cells
(``OUT/data`` unless ``data.cache_dir`` is set).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
from pathlib import Path

from tqdm import tqdm

from jaxlm import config as config_lib
from jaxlm import run as run_lib
from jaxlm import telemetry
from jaxlm.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Cell:
    regime: str
    layer_scaling: bool
    seed: int

    @property
    def name(self) -> str:
        return f"{self.regime}-ls{'on' if self.layer_scaling else 'off'}-s{self.seed}"


def cells(regimes, layer_scaling, seeds) -> list[Cell]:
    return [Cell(r, ls, int(s)) for r, ls, s in itertools.product(regimes, layer_scaling, seeds)]


def parse_switch(values) -> list[bool]:
    out = []
    for v in values:
        v = str(v).lower()
        if v not in ("on", "off", "true", "false"):
            raise ConfigError(f"--layer-scaling: expected on/off, got {v!r}")
        out.append(v in ("on", "true"))
    return out


def cell_config(cfg, cell: Cell, out: Path, steps: int | None):
    over = {"precision.regime": cell.regime, "model.scale_attn_by_inverse_layer_idx": cell.layer_scaling,
            "train.seed": cell.seed, "data.cache_dir": cfg.data.cache_dir or str(out / "data")}
    if steps:
        over["train.steps"] = steps
    return config_lib.with_overrides(cfg, over)


def is_done(workdir: Path, steps: int) -> bool:
    f = workdir / "done.json"
    if not f.exists():
        return False
    d = json.loads(f.read_text())
    return bool(d.get("stopped")) or "budget" in d or d.get("step", 0) >= steps  # (a budgeted run's budget spent)


def outcome(workdir: Path) -> str:
    """'finished', or 'diverged' with the first step whose logged training loss is not finite."""
    records, _ = telemetry.read_metrics(workdir / "metrics.jsonl") if (workdir / "metrics.jsonl").exists() else ([], 0)
    for r in records:
        loss = r.get(telemetry.LOSS)
        if loss is not None and not math.isfinite(float(loss)):
            return f"diverged (non-finite training loss at step {r[telemetry.STEP]})"
    return "finished"


def run_grid(cfg, grid: list[Cell], out, steps: int | None = None, log=print) -> list[tuple[Cell, str]]:
    """Runs every cell not yet done; returns (cell, status) for all. Stops at a preemption."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    status = []
    bar = tqdm(grid, desc="grid", unit="cell", file=sys.stderr, position=0)
    for i, cell in enumerate(bar):
        c = cell_config(cfg, cell, out, steps)
        workdir = out / "cells" / cell.name
        if is_done(workdir, c.train.steps):
            status.append((cell, "done before"))
            log(f"[{i + 1}/{len(grid)}] {cell.name}: already finished, skipped")
            continue
        log(f"[{i + 1}/{len(grid)}] {cell.name}: {c.train.steps} steps in {workdir}")
        bar.set_postfix(cell=cell.name)
        result = run_lib.run(c, workdir, log=lambda s: None)
        if result.preempted:
            status.append((cell, "interrupted"))
            log(f"interrupted in {cell.name} at step {result.step}; run the same command again to resume the grid")
            break
        status.append((cell, result.stopped or outcome(workdir)))
    bar.close()
    return status
