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

    def describe(self) -> str:
        return (
            f"{self.name}: params {dtype_name(self.param_dtype)}, compute {dtype_name(self.compute_dtype)}, "
            f"attention scores {dtype_name(self.attn_dtype)}"
        )

    def to_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "param_dtype": dtype_name(self.param_dtype),
            "compute_dtype": dtype_name(self.compute_dtype),
            "attn_dtype": dtype_name(self.attn_dtype),
        }


# regime -> (param, compute, attention scores)
REGIMES: dict[str, tuple[Any, Any, Any]] = {
    "fp32": (jnp.float32, jnp.float32, jnp.float32),
    "bf16": (jnp.float32, jnp.bfloat16, jnp.bfloat16),
    "bf16_upcast": (jnp.float32, jnp.bfloat16, jnp.float32),
    "fp16": (jnp.float32, jnp.float16, jnp.float16),
    "fp16_upcast": (jnp.float32, jnp.float16, jnp.float32),
}


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


def loss_scale_config(cfg, pol: Policy) -> LossScaleConfig:
    p = cfg.precision
    return LossScaleConfig(init=float(p.loss_scale_init), window=int(p.loss_scale_window),
                           hysteresis=int(p.loss_scale_hysteresis), minimum=float(p.loss_scale_min),
                           enabled=pol.is_fp16)


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
