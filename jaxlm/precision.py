"""The precision policy: the one place where jaxlm decides dtypes.

A :class:`Policy` has three fields:

* ``param_dtype``   -- dtype of the stored (master) parameters;
* ``compute_dtype`` -- dtype of matmul inputs and activations (the residual stream too);
* ``attn_dtype``    -- dtype of the attention scores: QK^T, scaling, masking and softmax.

Named regimes are presets (see ``REGIMES``); any field may be overridden explicitly.
Whatever the regime, LayerNorm statistics, the final logits, their log-softmax and the
loss are float32 (``FP32``): those are not policy choices.

The regimes follow Mistral's study of GPT-2 training stability:

``fp32``         everything float32.
``bf16``         fp32 params, bf16 compute, bf16 attention scores.
``bf16_upcast``  as bf16, but Q/K upcast and scores + softmax in fp32.
``fp16``         fp32 params, fp16 compute, fp16 attention scores: the naive regime whose
                 QK^T overflows (> 65504) and blows training up.
``fp16_upcast``  as fp16, but Q and K are upcast and QK^T, scaling, masking and softmax run in
                 fp32; the probabilities are cast back to fp16 before multiplying V
                 (Hugging Face ``reorder_and_upcast_attn=True``; Mistral's fix).
``fp8``          as bf16_upcast, but the large matmuls (QKV, attention output, MLP in and out: the
                 model's Linear layers, ``Policy.dot_general``) take float8 operands: e4m3 inputs in
                 the forward pass, e5m2 cotangents in the backward pass, each tensor with its own
                 *current* power-of-two scale (from its amax, every step), float32 accumulation and
                 the compute dtype out. The head, the attention core and LayerNorms are bf16_upcast's.

Other modules never write ``jnp.float16`` and friends; they ask a policy (or use the
constants below). ``tests/test_architecture.py`` enforces it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import ConfigError

# Dtypes that are fixed whatever the regime.
# float32 whatever the regime: the final logits, their log-softmax and the loss; LayerNorm and
# telemetry statistics; the loss scale; Megatron's multiply-back of scaled scores.
FP32 = jnp.float32

DTYPES: dict[str, Any] = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}
_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16"}


class PrecisionError(ConfigError):
    """A precision setting that does not exist or does not make sense."""


def dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


def as_dtype(value: Any, field: str = "precision") -> Any:
    """Turns 'bf16' / 'bfloat16' / jnp.bfloat16 into the jnp dtype, or fails naming `field`."""
    if isinstance(value, str):
        name = _ALIASES.get(value.lower(), value.lower())
    else:
        try:
            name = np.dtype(value).name
        except TypeError:
            name = repr(value)
    if name not in DTYPES:
        raise PrecisionError(
            f"{field}: unknown dtype {value!r}; allowed: {sorted(DTYPES)} (or fp32/bf16/fp16)"
        )
    return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class Policy:
    """Dtypes of parameters, compute and attention scores. Frozen and hashable (jit-static)."""

    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    attn_dtype: Any = jnp.float32
    name: str = "fp32"
    fp8_matmuls: bool = False  # the Linear layers' matmuls take float8 operands (the fp8 regime)

    def __post_init__(self):
        for f in ("param_dtype", "compute_dtype", "attn_dtype"):
            object.__setattr__(self, f, as_dtype(getattr(self, f), f"precision.{f}"))

    @property
    def upcasts_attention(self) -> bool:
        """True when scores run in a wider dtype than the rest of the compute (HF's reorder_and_upcast)."""
        return np.dtype(self.attn_dtype).itemsize > np.dtype(self.compute_dtype).itemsize

    @property
    def matmul_precision(self) -> Any:
        """What float32 matmuls mean: true float32 (``Precision.HIGHEST``), as in PyTorch, whose
        default is allow_tf32=False. JAX's default would let a GPU round float32 operands to TF32
        and a TPU to bfloat16, which would make the fp32 regime a reduced-precision one. For
        16-bit operands the default is exact, and None keeps it."""
        return jax.lax.Precision.HIGHEST if self.compute_dtype == FP32 else None

    @property
    def computes_in_16bit(self) -> bool:
        """Matmul inputs and activations are fp16 or bf16 (what fused 16-bit kernels take)."""
        return np.dtype(self.compute_dtype).itemsize == 2

    @property
    def grad_dtype(self) -> Any:
        """Gradients are unscaled, clipped and applied in the master parameters' dtype."""
        return self.param_dtype

    @property
    def is_fp16(self) -> bool:
        """fp16 anywhere in the forward pass means the gradients need dynamic loss scaling."""
        return jnp.float16 in (self.compute_dtype, self.attn_dtype, self.param_dtype)

    @property
    def dot_general(self):
        """The Linear layers' ``dot_general``: None (lax.dot_general, the default) unless fp8_matmuls."""
        return fp8_dot_general if self.fp8_matmuls else None

    def describe(self) -> str:
        return (
            f"{self.name}: params {dtype_name(self.param_dtype)}, compute {dtype_name(self.compute_dtype)}, "
            f"attention scores {dtype_name(self.attn_dtype)}"
            + (f", Linear matmuls {dtype_name(E4M3)} forward / {dtype_name(E5M2)} backward" if self.fp8_matmuls else "")
        )

    def to_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "param_dtype": dtype_name(self.param_dtype),
            "compute_dtype": dtype_name(self.compute_dtype),
            "attn_dtype": dtype_name(self.attn_dtype),
            "fp8_matmuls": self.fp8_matmuls,
        }


# regime -> (param, compute, attention scores)
REGIMES: dict[str, tuple[Any, Any, Any]] = {
    "fp32": (jnp.float32, jnp.float32, jnp.float32),
    "bf16": (jnp.float32, jnp.bfloat16, jnp.bfloat16),
    "bf16_upcast": (jnp.float32, jnp.bfloat16, jnp.float32),
    "fp16": (jnp.float32, jnp.float16, jnp.float16),
    "fp16_upcast": (jnp.float32, jnp.float16, jnp.float32),
    "fp8": (jnp.float32, jnp.bfloat16, jnp.float32),
}
FP8_REGIMES = ("fp8",)  # regimes whose Linear matmuls take float8 operands


def policy(
    regime: str = "fp32",
    *,
    param_dtype: Any = None,
    compute_dtype: Any = None,
    attn_dtype: Any = None,
) -> Policy:
    """The preset for `regime`, with any field overridden explicitly (None keeps the preset)."""
    if regime not in REGIMES:
        raise PrecisionError(
            f"precision.regime: unknown regime {regime!r}; allowed: {', '.join(REGIMES)}"
        )
    p, c, a = REGIMES[regime]
    overridden = any(x is not None for x in (param_dtype, compute_dtype, attn_dtype))
    return Policy(
        param_dtype=p if param_dtype is None else param_dtype,
        compute_dtype=c if compute_dtype is None else compute_dtype,
        attn_dtype=a if attn_dtype is None else attn_dtype,
        name=regime + ("+custom" if overridden else ""),
        fp8_matmuls=regime in FP8_REGIMES,
    )


def upcast_regime(regime: str) -> str:
    """The regime with the same compute dtype and float32 attention scores (``bf16`` -> ``bf16_upcast``)."""
    up = regime if regime.endswith("_upcast") else f"{regime}_upcast"
    return up if up in REGIMES else regime


def einsum(spec: str, a: jax.Array, b: jax.Array, *, out_dtype: Any, precision: Any = None) -> jax.Array:
    """``jnp.einsum(spec, a, b)`` of same-dtype operands with an `out_dtype` result (accumulated in at
    least that). When the result is wider than the operands (16-bit activations -> float32 logits or
    attention scores), the backward pass rounds the float32 cotangent to the operands' dtype before
    its two matmuls, as mixed-precision training does everywhere else; plain autodiff would multiply
    a float32 cotangent by 16-bit operands, i.e. float32/TF32 matrix products off the tensor cores."""
    if np.dtype(out_dtype).itemsize <= np.dtype(a.dtype).itemsize:
        return jnp.einsum(spec, a, b, preferred_element_type=out_dtype, precision=precision)
    return _widening_einsum(spec, np.dtype(out_dtype).name, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _widening_einsum(spec, out_dtype, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=out_dtype)


def _widening_einsum_fwd(spec, out_dtype, a, b):
    return _widening_einsum(spec, out_dtype, a, b), (a, b)


def _widening_einsum_bwd(spec, out_dtype, res, g):
    a, b = res
    _, vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b, preferred_element_type=a.dtype), a, b)
    return vjp(g.astype(a.dtype))


_widening_einsum.defvjp(_widening_einsum_fwd, _widening_einsum_bwd)


# --- fp8 matmuls (the fp8 regime) ------------------------------------------------------------
# Float8 formats (OCP FP8): e4m3 (max 448, 3 mantissa bits) for forward operands, e5m2 (max 57344,
# 2 mantissa bits) for backward cotangents, as Transformer Engine's HYBRID recipe and cuBLASLt take.
E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2


def fp8_scale(amax: jax.Array, fmt: Any) -> jax.Array:
    """Current scaling: the largest power of two s with amax·s <= the format's max (1 for amax 0).
    A power of two makes scaling and unscaling exact; only the cast to float8 rounds."""
    amax = jnp.asarray(amax, FP32)
    fmax = float(jnp.finfo(fmt).max)
    ok = jnp.isfinite(amax) & (amax > 0)
    _, e = jnp.frexp(fmax / jnp.where(ok, amax, 1.0))  # ratio = m·2^e, m in [0.5, 1): floor(log2) = e - 1, exactly
    return jnp.where(ok, jnp.ldexp(jnp.ones((), FP32), e - 1), 1.0).astype(FP32)


def fp8_quantize(x: jax.Array, fmt: Any, scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(x·scale saturated to ±max and cast to `fmt`, scale). `scale` defaults to current scaling from
    x's own amax. Values past the range saturate at ±max (never inf); non-finite inputs stay non-finite."""
    x32 = x.astype(FP32)
    if scale is None:
        scale = fp8_scale(jnp.max(jnp.abs(x32)), fmt)
    fmax = float(jnp.finfo(fmt).max)
    y = x32 * scale
    y = jnp.where(jnp.isfinite(y), jnp.clip(y, -fmax, fmax), y)
    return y.astype(fmt), scale


def fp8_dequantize(q: jax.Array, scale: jax.Array, dtype: Any) -> jax.Array:
    return (q.astype(FP32) / scale).astype(dtype)


def fp8_qdq(x: jax.Array, fmt: Any) -> jax.Array:
    """x rounded through `fmt` with current scaling, back in x's dtype (exact there: 16-bit types hold
    every float8 value, and the scale is a power of two)."""
    q, scale = fp8_quantize(x, fmt)
    return fp8_dequantize(q, scale, x.dtype)


def fp8_stats(x: jax.Array, fmt: Any = E4M3) -> dict[str, jax.Array]:
    """What current scaling does to `x`: its amax, the fraction of entries saturated at the format's
    range and the fraction of non-zero entries that underflow to zero (float32 scalars)."""
    x32 = jnp.abs(x.astype(FP32))
    q, _ = fp8_quantize(x, fmt)
    q32 = jnp.abs(q.astype(FP32))
    fmax = float(jnp.finfo(fmt).max)
    n = max(x.size, 1)
    return {"amax": jnp.max(x32),
            "saturated": jnp.sum((q32 >= fmax) & (x32 * fp8_scale(jnp.max(x32), fmt) > fmax)) / n,
            "underflow": jnp.sum((q32 == 0) & (x32 > 0)) / n}


def fp8_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    """``lax.dot_general`` with float8 operands (the fp8 regime's Linear layers; flax calls it with
    its Linear's `precision`, ignored here). Forward: both operands rounded through e4m3 with current
    per-tensor scaling, multiplied with float32 accumulation, the result in the operands' dtype.
    Backward: the cotangent rounded through e5m2 (its own current scale), then the two transposed
    products with the saved e4m3 operands, accumulated in float32 and returned in the operands' dtype.
    Written as quantise → dequantise → dot, the pattern XLA's GPU compiler rewrites into a cuBLASLt
    fp8 GEMM (not verified on a GPU here); elsewhere it is an exact emulation."""
    del precision, out_sharding
    out_dtype = np.dtype(preferred_element_type or lhs.dtype).name
    return _fp8_dot(dimension_numbers, out_dtype, lhs, rhs)


def _dot(dimension_numbers, out_dtype, a, b):
    return jax.lax.dot_general(a, b, dimension_numbers, preferred_element_type=FP32).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fp8_dot(dimension_numbers, out_dtype, a, b):
    return _dot(dimension_numbers, out_dtype, fp8_qdq(a, E4M3), fp8_qdq(b, E4M3))


def _fp8_dot_fwd(dimension_numbers, out_dtype, a, b):
    a8, b8 = fp8_qdq(a, E4M3), fp8_qdq(b, E4M3)
    return _dot(dimension_numbers, out_dtype, a8, b8), (a8, b8)


def _fp8_dot_bwd(dimension_numbers, out_dtype, res, g):
    a8, b8 = res
    g8 = fp8_qdq(g, E5M2)  # e5m2 values, exact in g's dtype (the compute dtype)
    _, vjp = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, dimension_numbers, preferred_element_type=FP32), a8, b8)
    return vjp(g8.astype(FP32))  # float32 accumulation; the products come back in the operands' dtype


_fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)


def finfo_min(dtype: Any) -> Any:
    """The most negative finite value of `dtype`: what HF masks attention with."""
    return jnp.finfo(dtype).min


# --- fp16 dynamic loss scaling (DeepSpeed's DynamicLossScaler semantics, inside jit) -----------

@dataclasses.dataclass(frozen=True)
class LossScaleConfig:
    init: float = 2.0**16
    window: int = 1000  # clean steps since the last overflow before the scale doubles
    hysteresis: int = 2  # overflows tolerated (step skipped, scale kept) before the scale halves
    minimum: float = 1.0
    enabled: bool = True  # False: scale 1, nothing skipped (non-fp16 regimes)
    # DeepSpeed ZeRO-2's order: the scale is updated before the gradients are unscaled, so on a step
    # where it doubles they are divided by twice the scale the loss was multiplied by (Mistral's runs)
    update_first: bool = False


def loss_scale_config(cfg, pol: Policy) -> LossScaleConfig:
    p = cfg.precision
    return LossScaleConfig(init=float(p.loss_scale_init), window=int(p.loss_scale_window),
                           hysteresis=int(p.loss_scale_hysteresis), minimum=float(p.loss_scale_min),
                           enabled=pol.is_fp16, update_first=bool(p.get("loss_scale_update_first", False)))


def loss_scale_init(c: LossScaleConfig) -> dict:
    """The loss-scale state: a dict of scalars that lives in the train state (so it is checkpointed)."""
    return {
        "scale": jnp.asarray(c.init if c.enabled else 1.0, FP32),
        "good_steps": jnp.zeros((), jnp.int32),  # clean steps since the last overflow
        "hysteresis": jnp.asarray(c.hysteresis, jnp.int32),
        "skipped": jnp.zeros((), jnp.int32),  # total steps skipped for non-finite gradients
    }


def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def loss_scale_update(state: dict, finite: jax.Array, c: LossScaleConfig) -> dict:
    """Next state after a step whose (unscaled) gradients were `finite` or not.

    Overflow: the step is skipped; if the hysteresis is used up the scale halves (not below the
    minimum), else the hysteresis counter drops by one. Clean: after `window` clean steps since
    the last overflow the scale doubles and the hysteresis is restored (as DeepSpeed without
    ``consecutive_hysteresis``: once used up, it stays so until the scale next doubles).
    """
    if not c.enabled:
        return dict(state, skipped=state["skipped"] + jnp.where(finite, 0, 1).astype(jnp.int32))
    halve = ~finite & (state["hysteresis"] <= 1)
    good = jnp.where(finite, state["good_steps"] + 1, 0)
    double = finite & (good % c.window == 0)
    scale = jnp.where(halve, jnp.maximum(state["scale"] / 2, c.minimum), state["scale"])
    scale = jnp.where(double, scale * 2, scale)
    hyst = jnp.where(finite, jnp.where(double, c.hysteresis, state["hysteresis"]),
                     jnp.maximum(state["hysteresis"] - 1, 1))
    return {"scale": scale.astype(FP32), "good_steps": good.astype(jnp.int32),
            "hysteresis": hyst.astype(jnp.int32), "skipped": state["skipped"] + (~finite).astype(jnp.int32)}
