"""Training budgets (``train.budget``): a wall-clock time or a FLOP count that a run spends, and the
budget fraction f ∈ [0, 1] that the learning-rate schedule and the batch ramp read.

    budget = parse("15m")                      # Budget("time", 900.0); parse("1e18flops"); parse("none") -> None
    meter = Meter(budget, spent=0.0)           # spent: restored from the checkpoint on resume
    f = meter.fraction                         # before a step: the f that step trains with
    meter.charge(seconds=..., tokens=...)      # after it; meter.done once f reaches 1

What is charged: under a wall-clock budget, the time of the training steps themselves (fetching
the batch, the step, waiting for it to finish); compilation, evaluation, per-layer statistics,
logging and checkpoint saves are not charged. Under a FLOP budget, each step's active tokens
× the MFU formula's FLOPs per token (``telemetry.flops_per_token``), which no clock affects.

f is a host number passed to the jitted step as a traced float32 scalar: a new f never recompiles.
The step of a budgeted run trains with the f reached *before* it, so the last step has f < 1 (one
step's worth: (N-1)/N of N equal steps) and trains at that f's lr, one step's worth of the decay above
the floor; the floor is the schedule's value at f = 1, where the run ends. (A step cannot train at
f = 1: under a clock, which step will be the last is known only once it is done.)
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax.numpy as jnp

from jaxlm import precision
from jaxlm.errors import ConfigError

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Schedules that only make sense by budget fraction (the step-based ones also run by f under a budget).
BUDGET_SCHEDULES = ("linear", "cosine", "constant", "triangle", "wsd")
_EXAMPLES = "e.g. 'none', '90s', '15m', '2h', '1.5d' (wall-clock) or '1e18flops'"


@dataclasses.dataclass(frozen=True)
class Budget:
    kind: str  # "time" (seconds) | "flops"
    total: float

    def describe(self, spent: float | None = None) -> str:
        def fmt(x):
            return f"{x:,.1f} s" if self.kind == "time" else f"{x:.3g} FLOPs"
        return fmt(self.total) if spent is None else f"{fmt(spent)} of {fmt(self.total)}"


def parse(text: str) -> Budget | None:
    """'none' -> None; '15m' / '2h' / '90s' / '1.5d' -> a wall-clock budget; '1e18flops' -> a FLOP budget."""
    t = str(text).strip().lower().replace(" ", "")
    if t in ("", "none"):
        return None
    m = re.fullmatch(r"([+-]?[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)(s|m|h|d|flops)", t)
    if not m:
        raise ConfigError(f"train.budget={text!r}: not a budget; {_EXAMPLES}")
    value = float(m.group(1))
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"train.budget={text!r}: a budget must be positive; {_EXAMPLES}")
    if m.group(2) == "flops":
        return Budget("flops", value)
    return Budget("time", value * UNITS[m.group(2)])


def lr_factor(optim_cfg, step, f):
    """The learning rate as a multiple of optim.lr for a step trained at budget fraction `f` (traced or not):
    a linear warmup over optim.warmup_steps *steps* (0 = none), times the shape by f, which ends at
    optim.final_lr_ratio at f = 1 exactly:

    * ``linear``   1 → floor over f ∈ [0, 1] (Mistral's decay, by budget)
    * ``cosine``   cosine 1 → floor
    * ``constant`` 1
    * ``triangle`` 0 → 1 over [0, optim.budget_peak], then 1 → floor (one-cycle; Cramming's budget triangle)
    * ``wsd``      1 until f = 1 - optim.budget_decay, then linear to the floor (warmup-stable-decay)
    """
    f = jnp.clip(jnp.asarray(f, precision.FP32), 0.0, 1.0)
    floor = float(optim_cfg.final_lr_ratio)
    name = optim_cfg.schedule
    if name == "linear":
        shape = 1.0 - (1.0 - floor) * f
    elif name == "cosine":
        shape = floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * f))
    elif name == "constant":
        shape = jnp.ones_like(f)
    elif name == "triangle":
        p = float(optim_cfg.budget_peak)
        up = f / p if p > 0 else jnp.ones_like(f)
        down = 1.0 - (1.0 - floor) * (f - p) / (1.0 - p)
        shape = jnp.where(f < p, up, down)
    elif name == "wsd":
        d = float(optim_cfg.budget_decay)
        start = 1.0 - d
        shape = jnp.where(f < start, 1.0, 1.0 - (1.0 - floor) * (f - start) / d)
    else:
        raise ConfigError(f"optim.schedule: unknown {name!r}; allowed under a budget: {', '.join(BUDGET_SCHEDULES)}")
    if name != "constant":
        shape = jnp.where(f >= 1.0, floor, shape)  # exactly the floor at the end, whatever rounding
    warm = int(optim_cfg.warmup_steps)
    if warm:
        shape = shape * jnp.minimum(jnp.asarray(step, precision.FP32) / warm, 1.0)
    return shape


def active_micro_batches(f: float, n: int, ramp: float) -> int:
    """Cramming's batch-size ramp, in whole micro-batches: of the n micro-batches of a full batch, the
    first ceil(n·f/ramp) are trained on (at least 1; all n from f = ramp on). ramp 0 = always n."""
    if ramp <= 0 or n <= 1:
        return n
    return int(min(n, max(1, math.ceil(n * min(f / ramp, 1.0) - 1e-9))))


def ramp_step_cost(full: float, n: int, ramp: float, f0: float = 0.0, points: int = 1000) -> tuple[float, float]:
    """Under train.batch_ramp, from a full batch's step cost `full` (taken as proportional to the
    micro-batches trained on; exact for FLOPs): (the cost of the step at f0, the average step's cost
    over f ∈ [f0, 1]). The budget is spent evenly over f, so the average is the harmonic mean of the
    cost over f, which makes `left / average` the number of steps left."""
    fs = [f0 + (1.0 - f0) * (i + 0.5) / points for i in range(points)]
    inverse = sum(n / active_micro_batches(f, n, ramp) for f in fs) / points
    return full * active_micro_batches(f0, n, ramp) / n, full / inverse


def validate(cfg) -> None:
    """The budget keys of a config (called by jaxlm.config.validate): one ConfigError naming the field."""
    budget = parse(cfg.train.budget)
    o, t = cfg.optim, cfg.train
    if o.schedule in ("triangle", "wsd") and budget is None and not t.budget_replay:
        raise ConfigError(f"optim.schedule={o.schedule!r} reads the budget fraction; set train.budget "
                          "(e.g. '15m') or choose linear, cosine or constant")
    if not 0.0 <= o.budget_peak < 1.0:
        raise ConfigError(f"optim.budget_peak: the triangle's peak as a budget fraction in [0, 1), got {o.budget_peak}")
    if not 0.0 < o.budget_decay <= 1.0:
        raise ConfigError(f"optim.budget_decay: wsd's decay share of the budget in (0, 1], got {o.budget_decay}")
    if not 0.0 <= t.batch_ramp <= 1.0:
        raise ConfigError(f"train.batch_ramp: the budget fraction where the batch reaches full size, in [0, 1] "
                          f"(0 = no ramp), got {t.batch_ramp}")
    if t.batch_ramp > 0:
        if budget is None and not t.budget_replay:
            raise ConfigError("train.batch_ramp reads the budget fraction; set train.budget or train.batch_ramp=0")
        if not t.micro_batch_size or t.micro_batch_size == t.batch_size:
            raise ConfigError(f"train.batch_ramp ramps the number of micro-batches; set train.micro_batch_size to a "
                              f"divisor of train.batch_size={t.batch_size} (e.g. {max(t.batch_size // 4, 1)})")
    if t.max_steps < 0:
        raise ConfigError(f"train.max_steps: the step cap of a budgeted run (0 = none), got {t.max_steps}")
    if t.budget_replay and budget is None:
        raise ConfigError("train.budget_replay replays a budgeted run; set train.budget to that run's budget")


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}  # train.budget_clock


class Meter:
    """What a run has spent: training-step seconds and FLOPs (both kept; the budget's kind is charged),
    and the steps taken, against the budget and the step cap ``max_steps`` (train.max_steps; 0 = none).

    ``fraction`` is the run's f: the share of whichever limit is nearer its end, ``max(spent / budget,
    step / max_steps)``, so the schedule reaches f = 1 at the limit that ends the run."""

    def __init__(self, budget: Budget, seconds: float = 0.0, flops: float = 0.0, clock=time.perf_counter, *,
                 max_steps: int = 0, step: int = 0):
        self.budget, self.seconds, self.flops, self.clock = budget, float(seconds), float(flops), clock
        self.max_steps, self.step = int(max_steps), int(step)
        self._start = (self.seconds, self.fraction)  # this session's start, for the ETA
        self._wall0: tuple[float, float] | None = None  # FLOP budget: (clock, f) after this session's first step

    @property
    def spent(self) -> float:
        return self.seconds if self.budget.kind == "time" else self.flops

    @property
    def budget_fraction(self) -> float:
        """The share of the budget spent (what the budget alone says, whatever the step cap)."""
        return min(self.spent / self.budget.total, 1.0)

    @property
    def fraction(self) -> float:
        steps = self.step / self.max_steps if self.max_steps else 0.0
        return min(max(self.budget_fraction, steps), 1.0)

    @property
    def done(self) -> bool:
        return self.spent >= self.budget.total or bool(self.max_steps and self.step >= self.max_steps)

    @property
    def waits(self) -> bool:
        """Whether the loop must wait for each step to finish (a clock charges only finished work)."""
        return self.budget.kind == "time"

    def charge(self, seconds: float, flops: float) -> None:
        """After each step: what it cost."""
        self.seconds += seconds
        self.flops += flops
        self.step += 1
        if not self.waits and self._wall0 is None:  # the ETA's wall-clock origin (see eta)
            self._wall0 = (self.clock(), self.fraction)

    def eta(self) -> float | None:
        """Seconds left until the run's end (f = 1), at this session's rate of f: under a wall-clock
        budget per charged second (with no nearer step cap exactly the budget left); under a FLOP
        budget, whose loop does not wait for steps (the charged seconds are their dispatch), per second
        of wall clock since the session's first step. The loop asks when it has fetched a log record's
        metrics, so the steps are done; evaluation and saves in between count (they take the run's
        wall time too). None before the first charged step."""
        if not self.waits:
            if self._wall0 is None:
                return None
            t0, f0 = self._wall0
            df, ds = self.fraction - f0, self.clock() - t0
            return (1.0 - self.fraction) * ds / df if df > 0 and ds > 0 else None
        s0, f0 = self._start
        df, ds = self.fraction - f0, self.seconds - s0
        if df <= 0 or ds <= 0:
            return None
        return (1.0 - self.fraction) * ds / df

    def state(self) -> dict:
        """What a checkpoint keeps (with the loader state), for ``Meter(budget, **state)`` on resume."""
        return {"seconds": self.seconds, "flops": self.flops}


def cap_note(budget: Budget, max_steps: int, step: int, spent: float, per_step: float | None) -> str:
    """The startup line of a budgeted run at `step` with `spent`: what will end it, the budget or the
    step cap `max_steps` (0 = none), and where a cap binds first, the budget fraction it stops at.
    `per_step`: one step's cost in the budget's unit (measured or computed; None: not measured)."""
    unit = "s" if budget.kind == "time" else "FLOPs"
    if not max_steps:
        rate = f" (about {step + int((budget.total - spent) / per_step):,} steps at {per_step:.3g} {unit}/step)" \
            if per_step else ""
        return (f"budget: the run ends when {budget.describe()} are spent{rate}; no step cap "
                "(an explicit train.steps or train.max_steps sets one)")
    at = min((spent + (max_steps - step) * per_step) / budget.total, 1.0)
    if at >= 1.0:
        return (f"budget: the run ends when {budget.describe()} are spent, before its step cap "
                f"train.max_steps={max_steps:,} (at {per_step:.3g} {unit}/step)")
    return (f"budget: the step cap train.max_steps={max_steps:,} ends the run first: at the measured "
            f"{per_step:.3g} {unit}/step it stops at budget f {at:.2f} ({at:.0%} of {budget.describe()} spent); "
            "the schedule's f reaches 1 there (each step trains at the f reached before it: the last one "
            "step's worth above the lr's floor)")
