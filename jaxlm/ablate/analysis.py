"""The report's analyses of runs (numbers, no plots, no document): Wortsman et al.'s learning-rate
sensitivity (2023, section 3.2) and, for studies by time (train.budget), the training time to a
validation loss."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from jaxlm import telemetry as T
from jaxlm.ablate.runs import Run, num

# --- learning-rate sensitivity (Wortsman et al. 2023, section 3.2) -------------------------------

def lr_sensitivity(points: dict[float, list[tuple[float, float]]]) -> dict:
    """LR sensitivity of one configuration from {lr: [(final loss, loss at init) per seed]}:
    E over the LRs of [min(loss(η), loss at init) − the best such loss over the LRs], where loss(η) is
    the mean over seeds of each seed's min(final, init) and a diverged (non-finite) run counts as its
    loss at init. Also the best LR and loss, and the smallest LR at which a seed diverged (non-finite
    or not below its initial loss), or None."""
    clamped = {lr: float(np.mean([init if not math.isfinite(f) else min(f, init) for f, init in seeds]))
               for lr, seeds in sorted(points.items())}
    best_lr = min(clamped, key=clamped.get)
    best = clamped[best_lr]
    diverged = [lr for lr, seeds in sorted(points.items()) if any(not math.isfinite(f) or f >= i for f, i in seeds)]
    return {"sensitivity": float(np.mean([v - best for v in clamped.values()])), "best_lr": best_lr,
            "best_loss": best, "diverges_at": diverged[0] if diverged else None, "losses": clamped}


def lr_points(runs) -> dict:
    """{(device, config label): {lr: [(final loss, init loss) per seed]}} of the finished runs (a run still
    going or interrupted has no final loss yet)."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r.done is None:
            continue
        out[(r.device, r.config_label)][r.lr].append((r.final_loss, r.init_loss))
    return out


# --- studies by time (train.budget) ----------------------------------------------------------------

def eval_by_time(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """(training seconds, validation loss) at each periodic evaluation: the seconds of training steps
    before it (budget/train_time_s; compilation, evaluation and saves not counted)."""
    pts = [(num(r[T.TRAIN_TIME]), num(r[T.EVAL_LOSS])) for r in run.records if T.EVAL_LOSS in r and T.TRAIN_TIME in r]
    if not pts:
        return np.zeros(0), np.zeros(0)
    t, v = zip(*pts)
    return np.asarray(t), np.asarray(v)


def time_to_loss(run: Run, target: float) -> float | None:
    """The training seconds at the first evaluation whose validation loss is at or below `target`."""
    for t, v in zip(*eval_by_time(run)):
        if v <= target:
            return float(t)
    return None
