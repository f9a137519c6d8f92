"""The pieces the model is made of, and how each declares its logical axes.

Linear layers, LayerNorms and embeddings are Flax NNX's, made with the precision policy's dtypes and
their parameters' logical axes as Flax ``out_sharding`` metadata (``axes``); each large activation
declares its axes by kind (``ACTIVATIONS``, applied by ``constrain``). ``jaxlm.sharding`` maps both to
the mesh in a train step; outside one they mean nothing. Also here: dropout, the variable types the
blocks sow telemetry into, and the chunked cross-entropy of the head.
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
    """A dense layer, kernel (d_in, *d_out); initialised as HF does whatever the output's shape. Its
    matmul is the policy's ``dot_general`` (float8 operands in the fp8 regime, else lax's).
    `use_bias=False` (model.use_bias): no bias parameter at all."""
    return nnx.LinearGeneral(
        d_in, d_out, use_bias=use_bias, dtype=policy.compute_dtype, param_dtype=policy.param_dtype,
        kernel_init=nnx.initializers.normal(std), bias_init=nnx.initializers.zeros_init(),
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
