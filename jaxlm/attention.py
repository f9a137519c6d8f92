"""Causal self-attention behind one function, with the precision of the scores chosen by a Policy.

Three implementations:

``reference``  an einsum path that honours every precision regime exactly: QK^T is computed
               with result dtype ``policy.attn_dtype`` (so naive fp16 really overflows past
               65504), then scaled, masked with that dtype's most negative finite value (as HF
               does) and soft-maxed in that dtype; probabilities are cast to the compute dtype
               before multiplying V. Runs everywhere.
``cudnn``      ``jax.nn.dot_product_attention(implementation="cudnn")``: fp16/bf16 inputs, fp32
               scores and softmax inside. Exact (up to summation order) only where the policy
               upcasts the scores (``*_upcast``), no attention dropout and no Megatron scaling.
``flash``      ``jaxlm.flash``: a Pallas flash-attention kernel with the attention dropout inside,
               fp32 scores and softmax like cudnn; on GPUs, one or a mesh of them (``shard_map``
               over the batch and head axes; elsewhere it runs interpreted, for tests). Its dropout
               mask is the reference path's, so the two are the same function on every mesh.
               On a TPU the same name runs ``jaxlm.flash_tpu``, its Mosaic twin (same mask); the
               kernel is picked by the platform the program is lowered for.
``auto``       on a GPU, where exact: cudnn for passes without attention dropout, flash for
               passes with it; on a TPU flash for passes with attention dropout and XLA's
               attention (reference) without; else reference.

Attention dropout draws its mask from ``flash.keep_mask`` (a hash of the layer's key and the
position) in every implementation.

Layer-index scaling, two flavours:

* ``scale_attn_by_inverse_layer_idx`` (Hugging Face/Mistral): the score is multiplied by
  1/(sqrt(d_head)·(layer_idx+1)) after the product and never multiplied back. It changes the
  function; Mistral's released checkpoints need it.
* ``query_key_layer_scaling`` (Megatron): Q is scaled by 1/(sqrt(d_head)·(layer_idx+1)) *before*
  the low-precision matmul and the product is multiplied back by (layer_idx+1) in fp32, where
  masking and softmax then run. The function is unchanged; only overflow is avoided.

Soft-capping (``softcap`` c > 0, Gemma 2): the scaled scores become c·tanh(score/c) before masking,
in the scores' dtype. The statistics describe the scores before the cap (what grows, and whether
the product overflowed).

Shapes: B batch, T query length, S key length, H heads, K head size.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jaxlm import flash, flash_tpu, precision
from jaxlm.errors import ConfigError

IMPLEMENTATIONS = ("auto", "reference", "cudnn", "flash")


@dataclasses.dataclass(frozen=True)
class ScoreStats:
    """Pre-softmax score statistics of one layer (over unmasked positions), float32 scalars."""

    max: jax.Array
    min: jax.Array
    nonfinite: jax.Array  # bool: any inf/nan among the scores


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """One layer's keys and values for decoding: (B, S, H, K) buffers and `index`, the positions filled."""

    k_BSHK: jax.Array
    v_BSHK: jax.Array
    index: jax.Array  # int32 scalar

    @classmethod
    def empty(cls, batch: int, length: int, n_head: int, head_dim: int, dtype) -> "KVCache":
        zeros = jnp.zeros((batch, length, n_head, head_dim), dtype)
        return cls(zeros, zeros, jnp.zeros((), jnp.int32))

    def mask_TS(self, T: int) -> jax.Array:
        """(T, S): what T new queries, at the positions after the filled ones, may see."""
        return causal_mask(T, self.k_BSHK.shape[1], q_offset=self.index)

    def append(self, k_BTHK: jax.Array, v_BTHK: jax.Array) -> "KVCache":
        at = (0, self.index, 0, 0)
        return KVCache(jax.lax.dynamic_update_slice(self.k_BSHK, k_BTHK.astype(self.k_BSHK.dtype), at),
                       jax.lax.dynamic_update_slice(self.v_BSHK, v_BTHK.astype(self.v_BSHK.dtype), at),
                       self.index + k_BTHK.shape[1])


def score_scale(head_dim: int, layer_idx, inverse_layer_idx: bool, n_layer: int | None = None, dtype=None):
    """1/sqrt(d_head), over (layer_idx+1) with inverse-layer-index scaling. A traced `layer_idx` (the
    layer scan, jaxlm.scan) reads the factor from the table of the `n_layer` Python values in `dtype`:
    the same float the loop's Python number becomes."""
    scale = 1.0 / math.sqrt(head_dim)
    if inverse_layer_idx and not isinstance(layer_idx, int):
        return _table([scale / float(i + 1) for i in range(n_layer)], dtype, layer_idx)
    if inverse_layer_idx:
        scale /= float(layer_idx + 1)
    return scale


def _table(values: list[float], dtype, index: jax.Array) -> jax.Array:
    return jnp.asarray(values, dtype)[index]


def causal_mask(q_len: int, kv_len: int, q_offset: jax.Array | int = 0) -> jax.Array:
    """(T, S) bool, True where query t (at absolute position q_offset+t) may see key s."""
    q_pos = jnp.arange(q_len)[:, None] + q_offset
    return jnp.arange(kv_len)[None, :] <= q_pos


def resolve_implementation(
    impl: str,
    policy: precision.Policy,
    *,
    head_dim: int,
    dropout: bool,
    query_key_layer_scaling: bool,
    softcap: float = 0.0,
    backend: str | None = None,
) -> str:
    """Which implementation `impl` means for this policy; fails if cudnn or flash was forced where it
    is not the same function (or cannot run)."""
    if impl not in IMPLEMENTATIONS:
        raise ConfigError(f"model.attention_impl: unknown {impl!r}; allowed: {', '.join(IMPLEMENTATIONS)}")
    if impl == "reference":
        return impl
    backend = backend or jax.default_backend()
    fused = []  # why neither fused kernel is this regime's function
    if not policy.computes_in_16bit:
        fused.append(f"the fused kernels take fp16/bf16 inputs only (compute dtype is "
                     f"{precision.dtype_name(policy.compute_dtype)})")
    elif not policy.upcasts_attention:
        fused.append(f"regime {policy.name!r} computes scores in {precision.dtype_name(policy.attn_dtype)}, "
                     "the fused kernels in float32: not the same function")
    if query_key_layer_scaling:
        fused.append("query_key_layer_scaling needs the fp32 multiply-back of the reference path")
    if softcap:
        fused.append("attn_logit_softcap is in the reference path only")
    cudnn = [f"the backend is {backend!r}, cuDNN needs a GPU"] if backend != "gpu" else []
    cudnn += fused
    if dropout:
        cudnn.append("cuDNN's dropout seed is a compile-time constant in JAX (the same mask every step)")
    if head_dim % 8 or head_dim > 128:
        cudnn.append(f"head size {head_dim} is not a multiple of 8 up to 128")
    flash_reasons = list(fused) if backend in ("gpu", "tpu") else []  # elsewhere it runs interpreted: exact
    if backend == "tpu" and head_dim % 8:
        flash_reasons.append(f"head size {head_dim} is not a multiple of 8")
    elif backend != "tpu" and (head_dim < 16 or head_dim & (head_dim - 1)):
        flash_reasons.append(f"head size {head_dim} is not a power of two >= 16")
    if impl == "auto":
        if backend == "tpu":
            return "flash" if dropout and not flash_reasons else "reference"
        if backend != "gpu":
            return "reference"
        if dropout:
            return "reference" if flash_reasons else "flash"
        return "reference" if cudnn else "cudnn"
    reasons = cudnn if impl == "cudnn" else flash_reasons
    if reasons:
        raise ConfigError(f"model.attention_impl={impl!r} cannot be used: " + "; ".join(reasons)
                          + ". Use 'auto' or 'reference'.")
    return impl


def describe(impl: str, mesh_shape: dict[str, int]) -> str:
    """The startup line's words for the resolved implementation on a mesh of `mesh_shape`."""
    if impl != "flash" or math.prod(mesh_shape.values()) == 1:
        return impl
    split = "×".join(f"{a}={n}" for a, n in mesh_shape.items() if n > 1)
    return f"flash (shard_map over {split}; dropout masks hash global rows and heads)"


def _scores(q_BTHK, k_BSHK, policy, *, layer_idx, inverse_layer_idx, query_key_layer_scaling, n_layer=None):
    """Scaled QK^T in the dtype the softmax will run in; returns (scores_BHTS, its dtype)."""
    head_dim = q_BTHK.shape[-1]
    sdt, mp = policy.attn_dtype, policy.matmul_precision
    scale = score_scale(head_dim, layer_idx, inverse_layer_idx, n_layer, sdt)
    if query_key_layer_scaling:
        if isinstance(layer_idx, int):
            coeff, q_scale = float(layer_idx + 1), scale / float(layer_idx + 1)
        else:  # the scan's traced index: (i+1) is exact in float32, the product from the loop's values
            coeff = (layer_idx + 1).astype(precision.FP32)
            q_scale = _table([score_scale(head_dim, i, inverse_layer_idx) / float(i + 1) for i in range(n_layer)],
                             precision.FP32, layer_idx)
        q = (q_BTHK.astype(precision.FP32) * q_scale).astype(sdt)
        s = jnp.einsum("bthk,bshk->bhts", q, k_BSHK.astype(sdt), preferred_element_type=sdt, precision=mp)
        return s.astype(precision.FP32) * coeff, precision.FP32
    # Upcast regimes multiply the 16-bit Q and K with a float32 result: products of 16-bit numbers
    # are exact in float32 and the sum is float32, so this equals QK^T of upcast operands (HF's
    # reorder_and_upcast_attn) at tensor-core speed.
    operand = policy.compute_dtype if policy.upcasts_attention else sdt
    s = precision.einsum("bthk,bshk->bhts", q_BTHK.astype(operand), k_BSHK.astype(operand), out_dtype=sdt,
                         precision=mp)
    return s * jnp.asarray(scale, sdt), sdt


def _stats(s_BHTS, mask_TS) -> ScoreStats:
    """Max/min over unmasked scores. NaN is propagated explicitly: XLA's CPU backend drops NaNs
    from max/min reductions by default (fast min/max), which would hide a broken layer."""
    f32 = precision.FP32
    s = s_BHTS.astype(f32)
    has_nan = jnp.any(jnp.where(mask_TS, jnp.isnan(s), False))
    nan = jnp.asarray(jnp.nan, f32)
    return ScoreStats(
        max=jnp.where(has_nan, nan, jnp.max(jnp.where(mask_TS, s, -jnp.inf))),
        min=jnp.where(has_nan, nan, jnp.min(jnp.where(mask_TS, s, jnp.inf))),
        nonfinite=jnp.any(jnp.where(mask_TS, ~jnp.isfinite(s), False)),
    )


def fused_attention(q_BTHK, k_BTHK, v_BTHK, *, scale: float, dropout_rate: float, dropout_key) -> jax.Array:
    """The flash kernel of the platform the program is lowered for -- Mosaic (``flash_tpu``) on TPU,
    Triton (``flash``; interpreted off GPUs) elsewhere -- partitioned over the installed mesh."""
    rate = float(dropout_rate) if dropout_key is not None else 0.0
    seed = flash.key_bits(dropout_key) if dropout_key is not None else jnp.zeros((2,), jnp.uint32)

    def kernel(q, k, v, seed4, n_heads):
        kw = dict(n_heads=n_heads, scale=float(scale), rate=rate)
        return jax.lax.platform_dependent(q, k, v, seed4, tpu=functools.partial(flash_tpu.kernel, **kw),
                                          default=functools.partial(flash.kernel, **kw))
    return flash.partitioned(kernel, q_BTHK, k_BTHK, v_BTHK, seed)


def attention(
    q_BTHK: jax.Array,
    k_BSHK: jax.Array,
    v_BSHK: jax.Array,
    *,
    policy: precision.Policy,
    layer_idx: int | jax.Array,
    n_layer: int | None = None,
    inverse_layer_idx: bool = False,
    query_key_layer_scaling: bool = False,
    softcap: float = 0.0,
    implementation: str = "reference",
    mask_TS: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
    collect_stats: bool = False,
) -> tuple[jax.Array, ScoreStats | None]:
    """Softmax(scaled QK^T, causal) V in the policy's dtypes; returns (out_BTHK, stats or None).

    `implementation` must already be resolved ('reference', 'cudnn' or 'flash'). `mask_TS` defaults to
    the causal mask of equal query/key lengths. With a `dropout_key`, attention probabilities are
    dropped at `dropout_rate` with ``flash.keep_mask``: the same mask in the reference path and the
    kernel. 'flash' runs where its shapes allow (``flash.supported``, plain causal), else the
    reference path, which is the same function. Stats are computed only when asked (the flag is
    static, so off is free).
    """
    T, S = q_BTHK.shape[1], k_BSHK.shape[1]
    plain_causal = mask_TS is None
    if plain_causal:
        mask_TS = causal_mask(T, S)
    cdt = policy.compute_dtype
    kw = dict(layer_idx=layer_idx, inverse_layer_idx=inverse_layer_idx,
              query_key_layer_scaling=query_key_layer_scaling, n_layer=n_layer)

    if implementation == "cudnn":
        out = jax.nn.dot_product_attention(
            q_BTHK.astype(cdt), k_BSHK.astype(cdt), v_BSHK.astype(cdt),
            mask=None if plain_causal else mask_TS[None, None], is_causal=plain_causal,
            scale=score_scale(q_BTHK.shape[-1], layer_idx, inverse_layer_idx),
            implementation="cudnn",
        )
        stats = _stats(_scores(q_BTHK, k_BSHK, policy, **kw)[0], mask_TS) if collect_stats else None
        return out, stats
    if (implementation == "flash" and plain_causal and T == S and not softcap
            and flash.supported(T, q_BTHK.shape[-1]) is None and flash_tpu.supported(T, q_BTHK.shape[-1]) is None):
        out = fused_attention(q_BTHK.astype(cdt), k_BSHK.astype(cdt), v_BSHK.astype(cdt),
                              scale=score_scale(q_BTHK.shape[-1], layer_idx, inverse_layer_idx),
                              dropout_rate=dropout_rate, dropout_key=dropout_key)
        stats = _stats(_scores(q_BTHK, k_BSHK, policy, **kw)[0], mask_TS) if collect_stats else None
        return out, stats
    if implementation not in ("reference", "flash"):
        raise ConfigError(f"attention(): implementation must be resolved first, got {implementation!r}")

    s_BHTS, sdt = _scores(q_BTHK, k_BSHK, policy, **kw)
    stats = _stats(s_BHTS, mask_TS) if collect_stats else None
    if softcap:
        s_BHTS = jnp.asarray(softcap, sdt) * jnp.tanh(s_BHTS / jnp.asarray(softcap, sdt))
    s_BHTS = jnp.where(mask_TS, s_BHTS, precision.finfo_min(sdt))
    probs_BHTS = jax.nn.softmax(s_BHTS, axis=-1).astype(cdt)
    if dropout_key is not None and dropout_rate > 0:
        keep_BHTS = flash.reference_keep_mask(dropout_key, q_BTHK.shape[0], q_BTHK.shape[2], T, S, dropout_rate)
        probs_BHTS = jax.lax.select(keep_BHTS, probs_BHTS / (1.0 - dropout_rate), jnp.zeros_like(probs_BHTS))
    out_BTHK = jnp.einsum("bhts,bshk->bthk", probs_BHTS, v_BSHK.astype(cdt), precision=policy.matmul_precision)
    return out_BTHK, stats
