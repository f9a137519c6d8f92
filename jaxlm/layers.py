"""The pieces the model is made of, and how each declares its logical axes.

Linear layers, LayerNorms and embeddings are Flax NNX's, made with the precision policy's dtypes and
their parameters' logical axes as Flax ``out_sharding`` metadata (``axes``); each large activation
declares its axes by kind (``ACTIVATIONS``, applied by ``constrain``). ``jaxlm.sharding`` maps both to
the mesh in a train step; outside one they mean nothing. Also here: dropout, the MLP's activations,
rotary position embeddings, the logit soft-cap, the variable types the blocks sow telemetry into,
and the chunked cross-entropy of the head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import naming, precision
from jaxlm.errors import DataError

# Logical axes, the names jaxlm.sharding's one table maps to mesh axes:
#   batch, length    a batch of sequences          vocab, positions  the embedding tables' rows
#   embed            d_model of a weight matrix    act_embed         d_model of an activation, or of a
#   qkv, heads, head_dim   c_attn's output (3, H, K)                 vector added to one (bias, LayerNorm)
#   mlp              the MLP's hidden width    layers            the leading axis of stacked blocks'
#                                                                  parameters (model.scan_layers)
ACTIVATIONS: dict[str, tuple[str, ...]] = {
    "residual": ("batch", "length", "act_embed"),  # (B, T, D)
    "qkv": ("batch", "length", "qkv", "heads", "head_dim"),  # (B, T, 3, H, K)
    "mlp": ("batch", "length", "mlp"),  # (B, T, 4D)
    "logits": ("batch", "length", "vocab"),  # (B, T, V)
    "vocab_table": ("vocab", "act_embed"),  # (V, D): the tied token table as the forward uses it
}


def constrain(x: jax.Array, kind: str) -> jax.Array:
    """Activation `x` of kind `kind` (``ACTIVATIONS``) laid out as the installed layout says (a train
    step's ``sharding.use_mesh``); the identity otherwise."""
    return naming.constrain(x, ACTIVATIONS[kind], f"the {kind} activation")


def axes(*names: str) -> dict:
    """Variable metadata declaring a parameter's logical axes (Flax's ``out_sharding``). Not applied
    when the parameter is made (no eager sharding: the model has no mesh); ``jaxlm.sharding`` reads it."""
    return {"out_sharding": names, "eager_sharding": False}


def linear(d_in, d_out, std, policy, rngs, kernel_axes, bias_axes, use_bias=True):
    """A dense layer, kernel (d_in, *d_out); initialised as HF does whatever the output's shape (normal
    with standard deviation `std`; `std=0`: zeros, model.zero_init_proj). Its matmul is the policy's
    ``dot_general`` (float8 operands in the fp8 regime, else lax's). `use_bias=False` (model.use_bias):
    no bias parameter at all."""
    kernel_init = nnx.initializers.normal(std) if std else nnx.initializers.zeros_init()
    return nnx.LinearGeneral(
        d_in, d_out, use_bias=use_bias, dtype=policy.compute_dtype, param_dtype=policy.param_dtype,
        kernel_init=kernel_init, bias_init=nnx.initializers.zeros_init(),
        precision=policy.matmul_precision, dot_general=policy.dot_general, rngs=rngs,
        kernel_metadata=axes(*kernel_axes), bias_metadata=axes(*bias_axes),
    )


def layernorm(cfg, policy, rngs, features=None, axis_name="act_embed"):
    # Flax computes LayerNorm statistics in at least float32 whatever `dtype` is. The variance is
    # E[(x - mean)^2], two passes as PyTorch computes it: Flax's fast E[x^2] - mean^2 loses the
    # variance to cancellation when the features share a large mean.
    return nnx.LayerNorm(features or cfg.n_embd, epsilon=cfg.layer_norm_epsilon, dtype=policy.compute_dtype,
                         param_dtype=policy.param_dtype, rngs=rngs, use_fast_variance=False,
                         scale_metadata=axes(axis_name), bias_metadata=axes(axis_name))


def qk_norm(cfg, policy, rngs):
    """The norm model.qk_norm puts on each head's queries and keys (over head_dim, one gain shared by the
    heads): a LayerNorm, or an RMSNorm (model.qk_norm_kind='rms', modded-nanogpt's; gain 1 at init)."""
    if cfg.qk_norm_kind == "layernorm":
        return layernorm(cfg, policy, rngs, cfg.head_dim, "head_dim")
    # Flax computes the mean square in at least float32 whatever `dtype` is, as it does LayerNorm's statistics
    return nnx.RMSNorm(cfg.head_dim, epsilon=cfg.layer_norm_epsilon, dtype=policy.compute_dtype,
                       param_dtype=policy.param_dtype, rngs=rngs, scale_metadata=axes("head_dim"))


def zero_padded(init, rows: int):
    """`init` for the first `rows` rows, zeros below: the same draw whatever the padding."""

    def f(key, shape, dtype):
        return jnp.pad(init(key, (rows, *shape[1:]), dtype), ((0, shape[0] - rows), (0, 0)))

    return f


def dropout(x, rate: float, key: jax.Array | None):
    """Inverted dropout (the same draws as ``nnx.Dropout``); the identity without a key or at rate 0."""
    if key is None or rate == 0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, p=keep, shape=x.shape, out_sharding=jax.typeof(x).sharding)
    return jax.lax.select(mask, x / keep, jnp.zeros_like(x))



def activation(kind: str, h_BTF):
    """The MLP's nonlinearity (model.mlp_kind) of c_fc's output: ``gelu`` (HF's "gelu_new", tanh
    approximation); ``gated_gelu`` GELU(a)·b of its two halves (Cramming's GLU, half the width out);
    ``relu2`` ReLU(h)² (So et al. 2021, *Primer*; modded-nanogpt's): sparse, and cheaper than GELU."""
    if kind == "gated_gelu":
        a_BTF, b_BTF = jnp.split(h_BTF, 2, axis=-1)
        return jax.nn.gelu(a_BTF, approximate=True) * b_BTF
    if kind == "relu2":
        return jnp.square(jax.nn.relu(h_BTF))
    return jax.nn.gelu(h_BTF, approximate=True)


# --- rotary position embeddings (model.rope) ----------------------------------------------------
# RoPE (Su et al. 2021, *RoFormer*): each head's query and key are read as head_dim/2 planes (dims j and
# j + head_dim/2, GPT-NeoX's and modded-nanogpt's pairing), and plane j of the vector at position p is
# rotated by p·θ_j, θ_j = base^(-2j/head_dim). Rotations keep lengths, and a query rotated by p·θ dotted
# with a key rotated by s·θ is their product rotated by (p - s)·θ: the scores depend on positions only
# through their difference, so there is no learned position table (wpe). Angles and rotation run in
# float32 (p·θ_0 up to n_positions needs its mantissa); q and k come back in their own dtype (the
# policy's compute dtype).

def rope_tables(positions_BT, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) of the rotation angles at `positions_BT`, float32 (B, T, head_dim/2)."""
    inv_freq_J = base ** (-jnp.arange(0, head_dim, 2, dtype=precision.FP32) / head_dim)
    angle_BTJ = jnp.asarray(positions_BT).astype(precision.FP32)[..., None] * inv_freq_J
    return jnp.cos(angle_BTJ), jnp.sin(angle_BTJ)


def rope(x_BTHK, tables) -> jax.Array:
    """`x_BTHK` (queries or keys) with each head's planes rotated by the angles of ``rope_tables``."""
    cos_BTJ, sin_BTJ = (t[:, :, None, :] for t in tables)  # every head the same angles
    x1, x2 = jnp.split(x_BTHK.astype(precision.FP32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos_BTJ - x2 * sin_BTJ, x1 * sin_BTJ + x2 * cos_BTJ], axis=-1)
    return out.astype(x_BTHK.dtype)


def softcap(logits, cap: float):
    """cap·tanh(logits/cap): every logit inside (-cap, cap), the identity near 0 (model.logit_softcap;
    Gemma 2, modded-nanogpt). 0 = off."""
    return cap * jnp.tanh(logits / cap) if cap else logits


class Stats(nnx.Intermediate):
    """Per-layer telemetry the modules sow when ``collect_stats`` is set (see ``apply``)."""



class Residual(nnx.Intermediate):
    """The residual stream after the embedding and after each block, sown when ``collect_residuals``
    is set (see ``apply``)."""


def sow_fp8(module: nnx.Module, x_in) -> None:
    """Sows what e4m3 current scaling does to the input of one fp8 matmul (``precision.fp8_stats``)."""
    for name, value in precision.fp8_stats(x_in, precision.E4M3).items():
        module.sow(Stats, "fp8_" + name, value)


def rms(x):
    x = x.astype(precision.FP32)
    return jnp.sqrt(jnp.mean(x * x))


def collected_stats(sown: dict, logits_BTV, vocab_size: int, fp8: bool) -> dict:
    """``model.apply(collect_stats=True)``'s statistics from what the model sowed (a plain dict) and its
    float32 logits: per layer resid_rms, attn_max, attn_min, nonfinite (and the fp8 ones), and the
    scalars logit_mean and log_z."""
    blocks = sown["layers"][0]  # every value (n_layer,), in a tuple of the times it was sown
    rms_L = blocks["resid_rms"][0]
    stats = {"resid_rms": rms_L, "attn_max": blocks["attn"]["attn_max"][0], "attn_min": blocks["attn"]["attn_min"][0],
             "nonfinite": blocks["attn"]["nonfinite"][0] | ~jnp.isfinite(rms_L)}
    if fp8:
        for k in ("fp8_amax", "fp8_saturated", "fp8_underflow"):
            stats[k] = jnp.max(jnp.stack([*blocks["attn"][k], *blocks["mlp"][k]]), axis=0)
    real_V = jnp.arange(logits_BTV.shape[-1]) < vocab_size
    stats["logit_mean"] = jnp.sum(jnp.where(real_V, logits_BTV, 0.0)) / (logits_BTV[..., 0].size * vocab_size)
    stats["log_z"] = jnp.mean(jax.nn.logsumexp(logits_BTV, axis=-1))
    return stats


def chunked_cross_entropy(head, x_BTD, targets_BT, chunk: int):
    """(cross-entropy, log Z) per token, float32 (B, T), of ``head(x) -> float32 logits``, `chunk`
    positions at a time (0 or >= T: one piece).

    A ``lax.scan`` over position chunks of every batch row (the batch axis, and its sharding, stay
    whole) with each chunk under ``jax.checkpoint``: the forward keeps no logits, the backward
    recomputes one chunk's logits at a time, and the scan sums the head weights' gradient over
    chunks. The last chunk is padded with masked positions where `chunk` does not divide T.
    """
    def piece(x_BcD, t_Bc):
        logits_BcV = head(x_BcD)
        logz_Bc = jax.nn.logsumexp(logits_BcV, axis=-1)
        target_Bc = jnp.take_along_axis(logits_BcV, t_Bc[..., None], axis=-1)[..., 0]
        return logz_Bc - target_Bc, logz_Bc

    B, T, D = x_BTD.shape
    if chunk <= 0 or chunk >= T:
        return piece(x_BTD, targets_BT)
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:
        x_BTD = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    xs = (x_BTD.reshape(B, n, chunk, D).swapaxes(0, 1), targets_BT.reshape(B, n, chunk).swapaxes(0, 1))
    _, (nll_nBc, logz_nBc) = jax.lax.scan(lambda c, a: (c, jax.checkpoint(piece)(*a)), None, xs)
    unchunk = lambda a_nBc: a_nBc.swapaxes(0, 1).reshape(B, n * chunk)[:, :T]
    return unchunk(nll_nBc), unchunk(logz_nBc)


def split(key, n: int) -> tuple:
    return tuple(jax.random.split(key, n)) if key is not None else (None,) * n


def z_loss(log_z_BT: jax.Array, coefficient: float) -> jax.Array:
    """coefficient · mean(log² Z), from the log-partition values ``token_losses`` returns (PaLM's
    auxiliary loss; padding logits hold the float32 minimum and add nothing to Z)."""
    return coefficient * jnp.mean(jnp.square(log_z_BT))


def check_token_ids(tokens, vocab_size: int) -> None:
    """Fails naming the offending ids if any token is outside [0, vocab_size): inside jit an id past
    the table would read a padding row or clamp (NaN logits, or the last row for -1), silently."""
    t = np.asarray(tokens)
    if t.size and (t.min() < 0 or t.max() >= vocab_size):
        bad = np.unique(t[(t < 0) | (t >= vocab_size)])
        raise DataError(f"token ids {bad[:8].tolist()} are outside the vocabulary [0, {vocab_size}); "
                        "tokenize with the model's own tokenizer")
