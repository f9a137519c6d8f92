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
