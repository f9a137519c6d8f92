"""The optimizer: one optax chain (global-norm clipping, then AdamW with a schedule).

Weight decay is masked: it applies to matrices (Linear kernels and the embeddings) and never to
biases or LayerNorm parameters, as in GPT-2/Mistral/nanoGPT.
Schedules (all after a linear warmup from 0): ``linear`` to ``final_lr_ratio * lr`` at the last
step (Mistral), ``cosine`` to the same floor, ``constant``.
"""

from __future__ import annotations

import jax
import optax

from jaxlm.errors import ConfigError
from jaxlm.naming import param_name


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
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
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def decay_mask(params):
    """True for parameters that get weight decay: kernels and embeddings, by name (the fused QKV
    bias is 3-d, so rank cannot tell a weight from a bias)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: param_name(path).endswith((".kernel", ".embedding")), params)


def make(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(the optax chain, its learning-rate schedule)."""
    sched = schedule(optim_cfg, total_steps)
    parts = []
    if optim_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
    parts.append(optax.adamw(sched, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2), eps=float(optim_cfg.eps),
                             weight_decay=float(optim_cfg.weight_decay), mask=decay_mask))
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
                       eps=float(optim_cfg.eps), weight_decay=float(optim_cfg.weight_decay), mask=decay_mask))
    return optax.chain(*parts)


def set_lr(opt_state, lr):
    """`opt_state` of ``make_budgeted``'s chain with AdamW's learning rate set to `lr`."""
    *head, adamw = opt_state
    hp = dict(adamw.hyperparams, learning_rate=jax.numpy.asarray(lr, adamw.hyperparams["learning_rate"].dtype))
    return (*head, adamw._replace(hyperparams=hp))
