"""The optimizer: one optax chain (global-norm clipping, then AdamW with a schedule).

Weight decay (``optim.decay_mask``): ``matrices`` decays Linear kernels and the embeddings, never
biases or LayerNorm parameters (GPT-2's and nanoGPT's practice); ``all`` decays every parameter,
as Mistral's runs did (transformers 4.5 handed DeepSpeed every parameter in one group).

Schedules, counted in applied updates (a skipped fp16 step keeps the optimizer state, so optax's
count does not advance): a warmup over ``warmup_steps`` -- ``linear`` from 0, or ``log``, DeepSpeed
0.3.13's ``WarmupDecayLR``: ``lr * ln(k + 1) / ln(W)`` at k < W -- then ``linear`` to
``final_lr_ratio * lr`` at the last step (Mistral), ``cosine`` to the same floor, or ``constant``.
``optim.deepspeed_lag`` adds the lag of DeepSpeed's engine, which steps its scheduler after each
applied update and never before the first: update 1 runs at the optimizer's configured ``lr``,
update n >= 2 at the schedule's value for n - 2.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from jaxlm.errors import ConfigError
from jaxlm.naming import param_name
from jaxlm.precision import FP32


def log_warmup(lr: float, warmup_steps: int) -> optax.Schedule:
    """DeepSpeed 0.3.13's warmup: ``lr * ln(k + 1) / ln(W)``, W = max(2, warmup_steps) (0 at k = 0)."""
    inv_log = 1.0 / math.log(max(2, warmup_steps))
    return lambda k: lr * inv_log * jnp.log(jnp.asarray(k, FP32) + 1.0)


def deepspeed_lag(sched: optax.Schedule, lr: float) -> optax.Schedule:
    """`sched` one behind, its first value `lr`: applied update n (count n - 1) runs at `lr` for n = 1,
    else at ``sched(n - 2)`` (DeepSpeed's engine steps the scheduler after each applied update)."""
    return lambda count: jnp.where(count == 0, jnp.asarray(lr, FP32), sched(jnp.maximum(count - 1, 0)))


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """The learning rate of each applied update, by optax's update count (0 for the first)."""
    sched = _schedule(optim_cfg, total_steps)
    return deepspeed_lag(sched, float(optim_cfg.lr)) if optim_cfg.get("deepspeed_lag", False) else sched


def _schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    lr, warm = float(optim_cfg.lr), int(optim_cfg.warmup_steps)
    floor = lr * float(optim_cfg.final_lr_ratio)
    decay = max(total_steps - warm, 1)
    if optim_cfg.schedule == "linear":
        after = optax.linear_schedule(lr, floor, decay)
    elif optim_cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay, alpha=float(optim_cfg.final_lr_ratio))
    elif optim_cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    else:
        raise ConfigError(f"optim.schedule: unknown {optim_cfg.schedule!r}; allowed: linear, cosine, constant")
    if warm == 0:
        return after
    kind = optim_cfg.get("warmup", "linear")  # (config.CHOICES: validated before)
    warmup = optax.linear_schedule(0.0, lr, warm) if kind == "linear" else log_warmup(lr, warm)
    return optax.join_schedules([warmup, after], [warm])


def decay_mask(params):
    """True for parameters that get weight decay under ``optim.decay_mask=matrices``: kernels and
    embeddings, by name (the fused QKV bias is 3-d, so rank cannot tell a weight from a bias)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: param_name(path).endswith((".kernel", ".embedding")), params)


def _mask(optim_cfg):
    """AdamW's weight-decay mask for ``optim.decay_mask`` (None: every parameter)."""
    return decay_mask if optim_cfg.get("decay_mask", "matrices") == "matrices" else None  # (config.CHOICES)


def make(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(the optax chain, its learning-rate schedule)."""
    sched = schedule(optim_cfg, total_steps)
    parts = []
    if optim_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
    parts.append(optax.adamw(sched, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2), eps=float(optim_cfg.eps),
                             weight_decay=float(optim_cfg.weight_decay), mask=_mask(optim_cfg)))
    return optax.chain(*parts), sched


# --- under a budget (train.budget): the learning rate is set by the train step -----------------

def make_budgeted(optim_cfg) -> optax.GradientTransformation:
    """The same chain with AdamW wrapped in ``optax.inject_hyperparams``: its learning rate is a value
    in the optimizer state, which the train step sets from ``budget.lr_factor(step, f)`` before each
    update (``set_lr``), so it is checkpointed with the state and a new f never recompiles."""
    parts = []
    if optim_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))
    parts.append(adamw(learning_rate=float(optim_cfg.lr), b1=float(optim_cfg.b1), b2=float(optim_cfg.b2),
                       eps=float(optim_cfg.eps), weight_decay=float(optim_cfg.weight_decay), mask=_mask(optim_cfg)))
    return optax.chain(*parts)


def set_lr(opt_state, lr):
    """`opt_state` of ``make_budgeted``'s chain with AdamW's learning rate set to `lr`."""
    *head, adamw = opt_state
    hp = dict(adamw.hyperparams, learning_rate=jax.numpy.asarray(lr, adamw.hyperparams["learning_rate"].dtype))
    return (*head, adamw._replace(hyperparams=hp))
