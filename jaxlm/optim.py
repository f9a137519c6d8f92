"""The optimizer: one optax chain (global-norm clipping, then AdamW with a schedule).

Weight decay (``optim.decay_mask``): ``matrices`` decays Linear kernels and the embeddings, never
biases or LayerNorm parameters (GPT-2's and nanoGPT's practice); ``all`` decays every parameter,
as Mistral's runs did (transformers 4.5 handed DeepSpeed every parameter in one group).

``optim.muon`` (the speedrun's optimizer, configs/speedrun.py): the hidden weight matrices (``MUON``,
by name, beside the decay mask) are trained by Muon (``optax.contrib.muon``'s Muon branch: momentum
orthogonalised by a Newton-Schulz iteration) at ``optim.muon_lr``, everything else (embeddings, an untied head,
LayerNorm gains, biases) by AdamW at ``optim.lr``: an ``optax.multi_transform`` by parameter name.
Both follow the one schedule (Muon's lr is ``muon_lr / lr`` times AdamW's at every step).

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


# optim.muon: the parameters Muon trains, by the end of their name (any other parameter is AdamW's), each
# with how its kernel is a matrix: (reduction axes, output axes), counted from the end, so the leading
# 'layers' axis of stacked blocks (model.scan_layers) is a batch axis: each layer its own matrix. c_attn's
# output (3, H, K) is q | k | v: its '3' axis is a batch axis too, so each of q, k and v is orthogonalised
# on its own, as modded-nanogpt does. The token table and an untied head are 2-d as well, but not hidden:
# their rows are single tokens (Muon's write-up: embeddings and the head belong to AdamW).
MUON = {
    "attn.c_attn.kernel": ((-4,), (-2, -1)),  # (D, 3, H, K)
    "attn.c_proj.kernel": ((-2,), (-1,)),  # (D, D)
    "mlp.c_fc.kernel": ((-2,), (-1,)),  # (D, 4D)
    "mlp.c_proj.kernel": ((-2,), (-1,)),  # (4D or 2D, D)
}
# Keller Jordan's quintic Newton-Schulz coefficients (optax's default), given here because the state
# keeps them out: see _coefficients_out_of_state.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def muon_dims(name: str):
    """The (reduction, output) axes of parameter `name` if Muon trains it (``MUON``), else None."""
    for suffix, dims in MUON.items():
        if name.endswith("." + suffix) or name == suffix:
            return optax.contrib.MuonDimensionNumbers(*dims)
    return None


def param_groups(params):
    """'muon' or 'adamw' for every parameter (``MUON``): the labels of optim.muon's multi_transform."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "adamw" if muon_dims(param_name(path)) is None else "muon", params)


def _muon(optim_cfg, learning_rate) -> optax.GradientTransformation:
    """Muon for the hidden matrices it is given (the multi_transform masks the others): optax's
    ``scale_by_muon`` (Nesterov momentum optim.muon_momentum, then five Newton-Schulz steps per matrix),
    its width scaling sqrt(max(1, fan_out/fan_in)), decoupled weight decay optim.weight_decay, the lr.
    That is ``optax.contrib.muon``'s Muon branch; contrib.muon itself also partitions by rank, and its
    AdamW half (empty here) would leave a state with no arrays under 'h', which the conversion between
    the loop's and the scan's layouts (jaxlm.scan.to_layout, model.scan_layers across a resume) loses."""
    dims = lambda params: jax.tree_util.tree_map_with_path(lambda path, _: muon_dims(param_name(path)), params)
    return optax.chain(
        _coefficients_out_of_state(optax.contrib.scale_by_muon(
            ns_coeffs=NS_COEFFS, beta=float(optim_cfg.muon_momentum), nesterov=True, weight_dimension_numbers=dims)),
        optax.stateless(_width_scale),
        optax.add_decayed_weights(float(optim_cfg.weight_decay)),
        optax.scale_by_learning_rate(learning_rate))


def _width_scale(updates, params=None):
    """Keller Jordan's width scaling of the orthogonalised updates, sqrt(max(1, fan_out/fan_in)) per matrix
    (optax.contrib.muon's default): tall and wide matrices take steps of the same RMS per output."""
    def scale(path, u):
        reduction, output = muon_dims(param_name(path))
        fan_in, fan_out = (math.prod(u.shape[a] for a in axes) for axes in (reduction, output))
        return u * math.sqrt(max(1.0, fan_out / fan_in))

    return jax.tree_util.tree_map_with_path(scale, updates)


def _coefficients_out_of_state(tx) -> optax.GradientTransformation:
    """`tx` (holding a MuonState) with the Newton-Schulz coefficients, constants, kept out of its state:
    jaxlm lays out and checkpoints every optimizer-state array as a moment of the parameter it is named
    after (``sharding.state_shardings``). The momentum stays in the state, so checkpoints hold it."""
    is_muon = lambda x: isinstance(x, optax.contrib.MuonState)
    put = lambda state, coeffs: jax.tree.map(lambda x: x._replace(ns_coeffs=coeffs) if is_muon(x) else x,
                                             state, is_leaf=is_muon)

    def update(updates, state, params=None):
        updates, state = tx.update(updates, put(state, jnp.asarray(NS_COEFFS, FP32)), params)
        return updates, put(state, None)

    return optax.GradientTransformation(lambda params: put(tx.init(params), None), update)


def _adamw(optim_cfg, learning_rate) -> optax.GradientTransformation:
    return optax.adamw(learning_rate, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2), eps=float(optim_cfg.eps),
                       weight_decay=float(optim_cfg.weight_decay), mask=_mask(optim_cfg))


def _update_rule(optim_cfg, learning_rate) -> optax.GradientTransformation:
    """AdamW at `learning_rate` (a number, or a schedule of the update count); with optim.muon, Muon for
    the hidden matrices at muon_lr / lr times it, AdamW for the rest."""
    if not optim_cfg.get("muon", False):
        return _adamw(optim_cfg, learning_rate)
    ratio = float(optim_cfg.muon_lr) / float(optim_cfg.lr)
    muon_lr = (lambda count: learning_rate(count) * ratio) if callable(learning_rate) else learning_rate * ratio
    return optax.multi_transform({"adamw": _adamw(optim_cfg, learning_rate), "muon": _muon(optim_cfg, muon_lr)},
                                 param_groups)


def _mask(optim_cfg):
    """AdamW's weight-decay mask for ``optim.decay_mask`` (None: every parameter)."""
    return decay_mask if optim_cfg.get("decay_mask", "matrices") == "matrices" else None  # (config.CHOICES)


def make(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(the optax chain, its learning-rate schedule)."""
    sched = schedule(optim_cfg, total_steps)
    parts = []
    if optim_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
    parts.append(_update_rule(optim_cfg, sched))
    return optax.chain(*parts), sched


# --- under a budget (train.budget): the learning rate is set by the train step -----------------

def make_budgeted(optim_cfg) -> optax.GradientTransformation:
    """The same chain with AdamW wrapped in ``optax.inject_hyperparams``: its learning rate is a value
    in the optimizer state, which the train step sets from ``budget.lr_factor(step, f)`` before each
    update (``set_lr``), so it is checkpointed with the state and a new f never recompiles. With
    optim.muon the whole multi_transform is wrapped: Muon's lr follows AdamW's injected one."""
    parts = []
    if optim_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
    if optim_cfg.get("muon", False):
        rule = optax.inject_hyperparams(lambda learning_rate: _update_rule(optim_cfg, learning_rate))
        parts.append(rule(learning_rate=float(optim_cfg.lr)))
        return optax.chain(*parts)
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))
    parts.append(adamw(learning_rate=float(optim_cfg.lr), b1=float(optim_cfg.b1), b2=float(optim_cfg.b2),
                       eps=float(optim_cfg.eps), weight_decay=float(optim_cfg.weight_decay), mask=_mask(optim_cfg)))
    return optax.chain(*parts)


def set_lr(opt_state, lr):
    """`opt_state` of ``make_budgeted``'s chain with AdamW's learning rate set to `lr` (with optim.muon,
    Muon's is muon_lr / lr times it)."""
    *head, adamw = opt_state
    hp = dict(adamw.hyperparams, learning_rate=jax.numpy.asarray(lr, adamw.hyperparams["learning_rate"].dtype))
    return (*head, adamw._replace(hyperparams=hp))
