"""Run a grid of cells -- precision regime × config switches × seed -- one ordinary run directory per cell.

A cell is a regime, a seed and any config overrides (``Cell.overrides``): a learning rate, a model
switch, a layer-scaling flavour. ``cells`` takes their product. Cells run one after another in this
process. A finished cell (its ``done.json``) is skipped; an interrupted one resumes from its
checkpoint, like any run. The cells share the data cache (the machine's, unless ``data.cache_dir``
is set), as every run on the machine does.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from jaxlm import config as config_lib
from jaxlm import run as run_lib
from jaxlm import telemetry
from jaxlm.ablate import runs
from jaxlm.errors import ConfigError

# Layer-index scaling as one switch: its value -> (scale_attn_by_inverse_layer_idx, query_key_layer_scaling).
# 'off'/'on' are the old --layer-scaling values (none/hf).
LAYER_SCALING = {"none": (False, False), "off": (False, False), "hf": (True, False), "on": (True, False),
                 "megatron": (False, True)}
LAYER_SCALING_KEY = "layer_scaling"  # a --switch key of its own (it sets two model fields)
_SHORT = {"optim.lr": "lr", LAYER_SCALING_KEY: "ls"}  # name tokens without a separator


@dataclasses.dataclass(frozen=True)
class Cell:
    regime: str
    seed: int
    switches: tuple[tuple[str, str], ...] = ()  # (key, value as written), in the grid's order

    @property
    def name(self) -> str:
        parts = [self.regime]
        for key, value in self.switches:
            parts.append(f"{_SHORT[key]}{value}" if key in _SHORT else f"{key.rsplit('.', 1)[-1]}-{value}")
        return "-".join([*parts, f"s{self.seed}"])

    def overrides(self, cfg) -> dict[str, Any]:
        """The config overrides of this cell's switches (values typed as the config's fields)."""
        over: dict[str, Any] = {}
        for key, value in self.switches:
            if key == LAYER_SCALING_KEY:
                hf, megatron = LAYER_SCALING[value]
                over["model.scale_attn_by_inverse_layer_idx"] = hf
                over["model.query_key_layer_scaling"] = megatron
            else:
                over[key] = typed_value(cfg, key, value)
        return over


def parse_switch(spec: str) -> tuple[str, list[str]]:
    """'model.qk_norm=off,on' -> ('model.qk_norm', ['off', 'on'])."""
    key, sep, values = spec.partition("=")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key.strip() or not vals:
        raise ConfigError(f"--switch={spec!r}: expected KEY=V1,V2,... e.g. model.qk_norm=off,on")
    key = key.strip()
    if key == LAYER_SCALING_KEY:
        bad = [v for v in vals if v not in LAYER_SCALING]
        if bad:
            raise ConfigError(f"--switch {LAYER_SCALING_KEY}: unknown {bad[0]!r}; allowed: none, hf, megatron "
                              "(off/on mean none/hf)")
    return key, vals


def typed_value(cfg, key: str, text: str) -> Any:
    """`text` as the type of config field `key` (on/off/true/false for booleans)."""
    node = cfg
    try:
        for p in key.split("."):
            node = node[p]
    except (KeyError, AttributeError):
        raise ConfigError(f"--switch {key}: unknown config key") from None
    t = text.lower()
    try:
        if isinstance(node, bool):
            if t not in ("on", "off", "true", "false"):
                raise ValueError
            return t in ("on", "true")
        if isinstance(node, int):
            return int(text)
        if isinstance(node, float):
            return float(text)
    except ValueError:
        raise ConfigError(f"--switch {key}={text!r}: expected a {type(node).__name__} like the config's "
                          f"{node!r}" + (" (on/off)" if isinstance(node, bool) else "")) from None
    return text


def cells(regimes, seeds, switches=()) -> list[Cell]:
    """The product regime × each switch's values × seed; `switches`: [(key, [values])] in name order."""
    keys = [k for k, _ in switches]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"a grid switch is given twice: {sorted(k for k in keys if keys.count(k) > 1)[0]}")
    out = []
    for regime, *values, seed in itertools.product(regimes, *[v for _, v in switches], seeds):
        out.append(Cell(regime, int(seed), tuple(zip(keys, values))))
    return out


def cell_config(cfg, cell: Cell, out: Path, steps: int | None):
    """A cell's config: the base config with its regime, switches and seed; under a budget `steps` is a
    step cap. In W&B the cell is a run of the study's group (OUT's name), of job type its regime, with
    the keys the grid switches as top-level config (for grouping and parallel coordinates)."""
    switched = cell.overrides(cfg)
    over = {"precision.regime": cell.regime, **switched,
            "train.seed": cell.seed,
            "log.wandb_group": cfg.log.wandb_group or Path(out).resolve().name, "log.wandb_job_type": cell.regime,
            "log.wandb_keys": tuple(dict.fromkeys(["precision.regime", "train.seed", *switched,
                                                   *cfg.log.wandb_keys]))}
    if steps:
        over["train.steps"] = steps
    return config_lib.with_overrides(cfg, over)


def is_done(workdir: Path, steps: int) -> bool:
    f = workdir / "done.json"
    if not f.exists():
        return False
    d = json.loads(f.read_text())
    return bool(d.get("stopped")) or "budget" in d or d.get("step", 0) >= steps  # (a budgeted run's budget spent)


def outcome(workdir: Path, stopped: str | None = None) -> str:
    """How a cell that has just returned ended (`stopped`: the loop's stop reason): 'diverged' with its
    first non-finite step, as the report says it (runs.status), else the stop reason or 'finished'."""
    records, _ = telemetry.read_metrics(workdir / "metrics.jsonl") if (workdir / "metrics.jsonl").exists() else ([], 0)
    return runs.status(records, {"stopped": stopped})


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
        length = f"{c.train.steps} steps" if c.train.budget == "none" else f"budget {c.train.budget}"
        log(f"[{i + 1}/{len(grid)}] {cell.name}: {length} in {workdir}")
        bar.set_postfix(cell=cell.name)
        # the run's own lines stay quiet but what ends a budgeted cell (as jaxlm.main says it)
        result = run_lib.run(c, workdir, log=lambda s: log(f"  {cell.name}: {s}") if s.startswith("budget:") else None)
        if result.preempted:
            status.append((cell, "interrupted"))
            log(f"interrupted in {cell.name} at step {result.step}; run the same command again to resume the grid")
            break
        status.append((cell, outcome(workdir, result.stopped)))
    bar.close()
    return status
