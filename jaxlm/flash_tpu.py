"""Causal flash attention with attention dropout inside the kernel for TPUs (Pallas on Mosaic).

The same function as ``jaxlm.flash`` (its Triton twin) and the reference path: the dropout mask is
``flash.keep_mask``, the hash of (the layer's key, global batch·head, query, key), drawn here tile by
tile; scores and softmax are float32; the score scale is the caller's, with the inverse-layer-index
factor already folded in (``attention.score_scale``). On a mesh it runs under the same
``flash.partitioned`` shard_map, so masks do not depend on the mesh.

How it tiles for the TPU (learned from JAX's ``pallas/ops/tpu/flash_attention.py`` and splash
attention):

* layout (B, H, T, K): each block's last two dims are (rows, head size), what Mosaic lays into
  (8, 128) vregs; q, k, v are transposed from the model's (B, T, H, K) outside the kernel.
* grid (B, H, query blocks, key blocks), the key axis last and ``"arbitrary"`` (it carries the
  online-softmax state in VMEM scratch), the others ``"parallel"`` (megacore chips split them);
  the backward dK/dV kernel runs key blocks outside and query blocks inside.
* the causal block skip: tiles above the diagonal run no code (``pl.when``), and their index maps
  point at a block already resident, so no DMA is issued for them either.
* row statistics (max, sum, log-sum-exp) are kept lane-broadcast as (rows, 128) arrays, the shape
  the vector unit reduces into; ``rowsum(dO ⊙ O)`` is recomputed per tile in the backward kernels
  instead of being stored.
* blocks of 128 rows (``BLOCK``): the MXU's width on v4/v5e/v5p and the smallest tile every
  generation runs at full rate; longer sequences may gain from 256-512 on v5p/v6e (to be measured
  on a TPU, none was lent).

``interpret`` None: Mosaic where the program is lowered for TPU, Pallas's interpreter elsewhere,
chosen at lowering (``lax.platform_dependent``); tests pass ``pltpu.InterpretParams()``, the TPU
interpret mode, which also checks the grid's block visits, DMAs and races as a TPU would run them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxlm import flash, precision

BLOCK = 128  # query and key rows per tile, all three kernels
LANES = 128  # the vector unit's lane count: row statistics are broadcast over it
_F32 = precision.FP32
_NT = (((1,), (1,)), ((), ()))  # A @ B^T


def supported(T: int, head_dim: int) -> str | None:
    """Why the kernel cannot run these shapes, or None."""
    if head_dim % 8:
        return f"head size {head_dim} is not a multiple of 8"
    if T % min(BLOCK, T) or T % 8:
        return f"sequence length {T} is not a multiple of {BLOCK} (or of 8 below it)"
    return None


def _lanes(x, n: int):
    """A (rows, LANES) lane-broadcast statistic as (rows, n)."""
    return jnp.tile(x, (1, n // LANES)) if n % LANES == 0 else x[:, :n]


def _tile_dropped(x, seed_ref, n_heads, rows, cols, T, rate):
    """x ⊙ M / keep for one tile of program (b, h, ...); `seed_ref` (SMEM int32[4]): the key's bits and
    this shard's global row and head offsets (``flash.partitioned``)."""
    if rate == 0.0:
        return x
    u32 = jnp.uint32
    s0, s1, row0, head0 = (seed_ref[i].astype(u32) for i in range(4))
    bh = (row0 + pl.program_id(0).astype(u32)) * u32(n_heads) + head0 + pl.program_id(1).astype(u32)
    keep = flash.keep_mask((s0, s1), bh, rows, cols, T, rate)
    return jnp.where(keep, x * (1.0 / (1.0 - rate)), 0.0)


def _positions(i, j, bq, bk):
    shape = (bq, bk)
    return (i * bq + jax.lax.broadcasted_iota(jnp.int32, shape, 0),
            j * bk + jax.lax.broadcasted_iota(jnp.int32, shape, 1))


def _probabilities(q, k, lse_or_none, rows, cols, scale):
    s = jax.lax.dot_general(q, k, _NT, preferred_element_type=_F32) * scale
    s = jnp.where(cols <= rows, s, flash._NEG)
    return s if lse_or_none is None else jnp.exp(s - _lanes(lse_or_none, s.shape[1]))


def _forward_kernel(seed_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale, rate,
                    n_heads, bq, bk):
    qi, ki = pl.program_id(2), pl.program_id(3)
    T, K = k_ref.shape[0] * pl.num_programs(3), q_ref.shape[1]

    @pl.when(ki == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, flash._NEG, _F32)
        l_sc[...] = jnp.zeros(l_sc.shape, _F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

    @pl.when(ki * bk <= qi * bq + bq - 1)  # the causal block skip
    def _run():
        rows, cols = _positions(qi, ki, bq, bk)
        s = _probabilities(q_ref[...], k_ref[...], None, rows, cols, scale)
        m_prev = m_sc[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - _lanes(m_next, bk))
        alpha = jnp.exp(m_prev - m_next)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        m_sc[...] = m_next
        p = _tile_dropped(p, seed_ref, n_heads, rows, cols, T, rate)
        v = v_ref[...]
        acc_sc[...] = acc_sc[...] * _lanes(alpha, K) + jnp.dot(p.astype(v.dtype), v, preferred_element_type=_F32)

    @pl.when(ki == pl.num_programs(3) - 1)
    def _store():
        o_ref[...] = (acc_sc[...] / _lanes(l_sc[...], K)).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(l_sc[...])


def _grad_tile(seed_ref, q, k, v, o, do, lse, rows, cols, *, scale, rate, n_heads, T):
    """(P ⊙ M / keep, dS) of one tile: the backward pass's two products."""
    p = _probabilities(q, k, lse, rows, cols, scale)
    delta = jnp.sum(o.astype(_F32) * do.astype(_F32), axis=1, keepdims=True)  # rowsum(dO ⊙ O)
    dp = _tile_dropped(jax.lax.dot_general(do, v, _NT, preferred_element_type=_F32), seed_ref, n_heads, rows,
                       cols, T, rate)
    return _tile_dropped(p, seed_ref, n_heads, rows, cols, T, rate), p * (dp - delta) * scale


def _dkdv_kernel(seed_ref, q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, scale,
                 rate, n_heads, bq, bk):
    ki, qi = pl.program_id(2), pl.program_id(3)
    T = q_ref.shape[0] * pl.num_programs(3)

    @pl.when(qi == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, _F32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, _F32)

    @pl.when(qi * bq + bq - 1 >= ki * bk)
    def _run():
        q, do = q_ref[...], do_ref[...]
        rows, cols = _positions(qi, ki, bq, bk)
        pd, ds = _grad_tile(seed_ref, q, k_ref[...], v_ref[...], o_ref[...], do, lse_ref[...], rows, cols,
                            scale=scale, rate=rate, n_heads=n_heads, T=T)
        dv_sc[...] += jnp.dot(pd.T.astype(do.dtype), do, preferred_element_type=_F32)
        dk_sc[...] += jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=_F32)

    @pl.when(qi == pl.num_programs(3) - 1)
    def _store():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(seed_ref, q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dq_ref, dq_sc, *, scale, rate, n_heads,
               bq, bk):
    qi, ki = pl.program_id(2), pl.program_id(3)
    T = k_ref.shape[0] * pl.num_programs(3)

    @pl.when(ki == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, _F32)

    @pl.when(ki * bk <= qi * bq + bq - 1)
    def _run():
        k = k_ref[...]
        rows, cols = _positions(qi, ki, bq, bk)
        _, ds = _grad_tile(seed_ref, q_ref[...], k, v_ref[...], o_ref[...], do_ref[...], lse_ref[...], rows, cols,
                           scale=scale, rate=rate, n_heads=n_heads, T=T)
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=_F32)

    @pl.when(ki == pl.num_programs(3) - 1)
    def _store():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


# Index maps use lax.div, not //: floor division lowers through sign(), whose Mosaic rule asks the
# device's TPU generation, which a program lowered on a CPU host (jax.export) does not have.
def _call(kernel, q, *, inner_is_q: bool, in_kinds, out_kinds, out_shape, scratch, interpret, name):
    """pallas_call over grid (B, H, outer blocks, inner blocks); `*_kinds` name each operand's tiling:
    'q' (query rows), 'k' (key rows) or 'lse' (query rows, LANES wide)."""
    B, H, T, K = q.shape
    bq = bk = min(BLOCK, T)
    n = T // bq

    def index(kind):
        def at(b, h, i, j, seed_ref):
            qi, ki = (j, i) if inner_is_q else (i, j)
            if kind == "k" and not inner_is_q:  # a tile skipped above the diagonal keeps the last key block
                return b, h, jnp.minimum(ki, jax.lax.div(qi * bq + bq - 1, bk)), 0  # it needed: no new DMA
            if kind != "k" and inner_is_q:  # (dK/dV) and the first query block needed, before it
                return b, h, jnp.maximum(qi, jax.lax.div(ki * bk, bq)), 0
            return b, h, qi if kind != "k" else ki, 0
        return at

    def spec(kind):
        return pl.BlockSpec((None, None, bq, LANES if kind == "lse" else K), index(kind))

    grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=(B, H, n, n),
                                             in_specs=[spec(k) for k in in_kinds],
                                             out_specs=[spec(k) for k in out_kinds],
                                             scratch_shapes=[pltpu.VMEM(s, _F32) for s in scratch])
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))

    def call(interpret):
        return pl.pallas_call(functools.partial(kernel, bq=bq, bk=bk), grid_spec=grid_spec, out_shape=out_shape,
                              compiler_params=params, interpret=interpret, name=name)
    if interpret is not None:
        return call(interpret)
    # the plain interpreter off TPUs: pltpu.InterpretParams' io_callbacks carry an ordered effect that
    # lax.platform_dependent cannot lower for TPU alone (JAX 0.10.2: "incorrect set of output tokens")
    return lambda *args: jax.lax.platform_dependent(*args, tpu=call(False), default=call(True))


def _forward(q, k, v, seed, scale, rate, n_heads, interpret):
    B, H, T, K = q.shape
    kw = dict(scale=scale, rate=rate, n_heads=n_heads)
    rows = min(BLOCK, T)
    return _call(functools.partial(_forward_kernel, **kw), q, inner_is_q=False, in_kinds=("q", "k", "k"),
                 out_kinds=("q", "lse"), out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                                                    jax.ShapeDtypeStruct((B, H, T, LANES), _F32)],
                 scratch=[(rows, LANES), (rows, LANES), (rows, K)], interpret=interpret,
                 name="flash_tpu_forward")(seed, q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, seed, scale, rate, n_heads, interpret):
    """(B, H, T, K) in and out; `seed` int32[4] as in ``flash._flash``, `n_heads` global."""
    return _forward(q, k, v, seed, scale, rate, n_heads, interpret)[0]


def _flash_fwd(q, k, v, seed, scale, rate, n_heads, interpret):
    o, lse = _forward(q, k, v, seed, scale, rate, n_heads, interpret)
    return o, (q, k, v, seed, o, lse)


def _flash_bwd(scale, rate, n_heads, interpret, res, do):
    q, k, v, seed, o, lse = res
    K, rows = q.shape[3], min(BLOCK, q.shape[2])
    do = do.astype(q.dtype)
    kw = dict(scale=scale, rate=rate, n_heads=n_heads)
    kinds = ("q", "k", "k", "q", "q", "lse")
    dk, dv = _call(functools.partial(_dkdv_kernel, **kw), q, inner_is_q=True, in_kinds=kinds, out_kinds=("k", "k"),
                   out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                   scratch=[(rows, K), (rows, K)], interpret=interpret,
                   name="flash_tpu_backward_dkdv")(seed, q, k, v, o, do, lse)
    dq = _call(functools.partial(_dq_kernel, **kw), q, inner_is_q=False, in_kinds=kinds, out_kinds=("q",),
               out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)], scratch=[(rows, K)], interpret=interpret,
               name="flash_tpu_backward_dq")(seed, q, k, v, o, do, lse)[0]
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def kernel(q_BTHK, k_BTHK, v_BTHK, seed4, n_heads: int, *, scale: float, rate: float, interpret=None):
    """``flash.partitioned``'s kernel: this shard's (B, T, H, K) pieces, `seed4` uint32[4]."""
    to_bhtk = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    seed = jax.lax.bitcast_convert_type(seed4, jnp.int32)  # SMEM scalars are 32-bit signed
    out = _flash(to_bhtk(q_BTHK), to_bhtk(k_BTHK), to_bhtk(v_BTHK), seed, scale, rate, n_heads, interpret)
    return to_bhtk(out)


def flash_attention(q_BTHK, k_BTHK, v_BTHK, *, scale: float, dropout_rate: float = 0.0, dropout_key=None,
                    interpret=None) -> jax.Array:
    """Causal softmax(scale · QK^T) V with attention dropout drawn from `dropout_key`, as
    ``flash.flash_attention`` (the same mask), on TPUs; (B, T, H, K) in and out, in q's dtype."""
    T, K = q_BTHK.shape[1], q_BTHK.shape[3]
    if (why := supported(T, K)) is not None:
        raise ValueError(f"flash_tpu.flash_attention: {why}")
    rate = float(dropout_rate) if dropout_key is not None else 0.0
    seed = flash.key_bits(dropout_key) if dropout_key is not None else jnp.zeros((2,), jnp.uint32)
    run = functools.partial(kernel, scale=float(scale), rate=rate, interpret=interpret)
    return flash.partitioned(run, q_BTHK, k_BTHK.astype(q_BTHK.dtype), v_BTHK.astype(q_BTHK.dtype), seed)
