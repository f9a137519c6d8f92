"""Run directories read back for a report: any folder holding ``run.json`` and ``metrics.jsonl`` (what
``jaxlm.main`` and every grid cell write), from one machine or several.

    runs = find_runs([DIR, ...])        # [Run]: device, regime, switches, seed, records, done.json
    run.first_nonfinite_step()          # THE first non-finite step (the CLI, the tables and the plots)
    run.status                          # 'finished' | 'diverged (non-finite training loss at step N)' | ...

Runs are grouped by (accelerator kind, configuration): the regime, the model's stability switches
that are on (layer scaling, qk_norm, z_loss, softcap) and, when the runs have several, the learning
rate; seeds are aggregated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jaxlm import precision
from jaxlm import telemetry as T

DTYPE_FIELDS = ("param_dtype", "compute_dtype", "attn_dtype")  # of run.json's precision (Policy.to_dict)


@dataclass
class Run:
    path: Path
    device: str
    regime: str
    layer_scaling: bool
    seed: int
    records: list[dict]
    done: dict | None = None
    model: dict = field(default_factory=dict)  # the run's model config section
    lr: float = 0.0
    show_lr: bool = False  # the label names the LR (set when the runs have several)
    variant: str = ""  # the run directory's name less its seed, where it is not a grid cell's (e.g. 'crammed')
    budget: str = "none"  # train.budget
    loss_scaling: bool = False  # fp16 somewhere in the regime: dynamic loss scaling

    @property
    def group(self) -> tuple[str, str]:
        return self.device, self.label

    @property
    def config_label(self) -> str:
        """The regime and the model's stability switches that are on (what a LR sweep varies over)."""
        m = self.model
        out = self.regime + (" +layer-scale" if self.layer_scaling else "")
        out += " +megatron-scale" if m.get("query_key_layer_scaling") else ""
        out += " +qk_norm" if m.get("qk_norm") else ""
        out += f" +z_loss={m['z_loss']:g}" if m.get("z_loss") else ""
        out += f" +softcap={m['attn_logit_softcap']:g}" if m.get("attn_logit_softcap") else ""
        return out

    @property
    def label(self) -> str:
        return (self.config_label + (f" {self.variant}" if self.variant else "")
                + (f" lr={self.lr:g}" if self.show_lr else ""))

    @property
    def init_loss(self) -> float:
        """The loss before the first update (step 1's loss is computed with the initial parameters)."""
        first = next((r for r in self.records if T.LOSS in r), {})  # (the step-0 record holds the compile time)
        losses = first.get(T.STEP_LOSSES) or [first.get(T.LOSS, float("nan"))]
        return num(losses[0])

    @property
    def final_loss(self) -> float:
        """The last validation loss (else the last training loss); NaN if the run stopped early or ended
        non-finite -- a diverged run."""
        if (self.done or {}).get("stopped"):
            return float("nan")
        v = self.last(T.EVAL_LOSS)
        v = self.last(T.LOSS) if v is None else v
        return float("nan") if v is None else v

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a scalar metric; 'nan'/'inf' strings become floats."""
        pts = [(r[T.STEP], num(r[key])) for r in self.records if key in r and not isinstance(r[key], list)]
        if not pts:
            return np.zeros(0), np.zeros(0)
        s, v = zip(*pts)
        return np.asarray(s), np.asarray(v, float)

    def layers(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values[step, layer]) of a per-layer metric."""
        pts = [(r[T.STEP], [num(x) for x in r[key]]) for r in self.records if isinstance(r.get(key), list)]
        if not pts:
            return np.zeros(0), np.zeros((0, 0))
        s, v = zip(*pts)
        return np.asarray(s), np.asarray(v, float)

    def first_nonfinite_step(self) -> int | None:
        """The first step whose training loss is not finite (see first_nonfinite_step)."""
        return first_nonfinite_step(self.records)

    @property
    def status(self) -> str:
        return status(self.records, self.done)

    def last(self, key: str):
        s, v = self.series(key)
        return (float(v[-1]) if len(v) else None)


def first_nonfinite_step(records: list[dict]) -> int | None:
    """The one definition of a run's first non-finite step (telemetry.first_nonfinite_step): the first
    step whose own training loss is not finite."""
    return T.first_nonfinite_step(records)


def status(records: list[dict], done: dict | None) -> str:
    """How a run ended, as the grid's CLI and the report both say it: 'diverged (non-finite training
    loss at step N)' by the one definition (whether the loop stopped there, as bf16/fp32 do, or an
    fp16 run went on skipping steps), else its stop reason, 'finished', or 'running/interrupted' (no
    done.json)."""
    bad = first_nonfinite_step(records)
    if bad is not None:
        return f"diverged (non-finite training loss at step {bad})"
    if (done or {}).get("stopped"):
        return done["stopped"]
    return "finished" if done is not None else "running/interrupted"


def num(x) -> float:
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, str):
        return float(x)  # "nan", "inf", "-inf"
    return float(x) if x is not None else float("nan")


def read_run(run_dir: Path) -> Run:
    """The Run of a directory holding run.json and metrics.jsonl."""
    meta = json.loads((run_dir / "run.json").read_text())
    records, _ = T.read_metrics(run_dir / "metrics.jsonl")
    done = json.loads((run_dir / "done.json").read_text()) if (run_dir / "done.json").exists() else None
    model, prec = meta["config"]["model"], meta["precision"]
    return Run(run_dir, meta["environment"]["device_kind"], prec["name"], bool(model["scale_attn_by_inverse_layer_idx"]),
               int(meta["config"]["train"]["seed"]), records, done, model, float(meta["config"]["optim"]["lr"]),
               variant=_variant(run_dir, prec["name"]), budget=str(meta["config"]["train"].get("budget", "none")),
               loss_scaling=precision.Policy(**{k: prec[k] for k in DTYPE_FIELDS if prec.get(k)}).is_fp16)


def find_runs(dirs) -> list[Run]:
    runs = [read_run(meta.parent) for d in dirs for meta in sorted(Path(d).rglob("run.json"))
            if (meta.parent / "metrics.jsonl").exists()]
    if len({r.lr for r in runs}) > 1:
        for r in runs:
            r.show_lr = True
    return runs


def _variant(run_dir: Path, regime: str) -> str:
    """'crammed' of a run directory 'crammed-s21'; '' for a grid cell (named '<regime>-<switches>-s<seed>',
    whose switches the label names already) or a name without a seed suffix."""
    base, sep, seed = run_dir.name.rpartition("-s")
    if not sep or not seed.isdigit() or base == regime or base.startswith(regime + "-"):
        return ""
    return base

