"""Causal flash attention with attention dropout inside the kernel (Pallas; Triton on GPUs).

Why a kernel of our own: cuDNN's fused attention in JAX takes its dropout seed as a compile-time
constant (``jax._src.cudnn.fused_attention_stablehlo``: ``seed: int`` in the backend config), so
every step would draw the same mask unless the step were recompiled; ``jax.nn.dot_product_attention``
has no dropout at all. Here the mask is a counter-based hash of (the layer's dropout key, batch
row, head, query position, key position): a pure function of the key that the forward pass and
both backward kernels regenerate, that the reference path (``jaxlm.attention``) draws
identically, and whose drop rate is `rate` to 2^-32 (a uint32 threshold, not a rounded rate).
The key is the trainer's (train.seed, step, micro-batch) key split per layer, so resume is exact.

FlashAttention-2's algorithm (Dao, 2023): the forward pass walks key blocks with an online
softmax in float32 and stores only the output and the log-sum-exp per query; the backward pass
recomputes the probabilities block by block. With dropout, P·M/keep multiplies V; the row sums
D = rowsum(dO ⊙ O) still equal Σ_j P_ij dP_ij, so the usual backward holds with the mask applied
to dP. Scores and softmax are float32 (the ``*_upcast`` regimes' function); PV and the gradient
matmuls take the compute dtype with float32 accumulation.

Shapes: q, k, v (B, T, H, K), one sequence length (self-attention, causal), K a power of two >= 16,
T a multiple of the block sizes. ``interpret=True`` runs the same kernels on any backend (tests).

On a mesh (inside ``sharding.use_mesh``) the kernel runs under ``shard_map``: q, k, v are split as
``LOGICAL_RULES`` lays out (batch, length, heads, head_dim) -- batch over (data, fsdp), heads over
tensor, which is how the model's qkv activation already lies, so no collective is added. Each shard
hashes its *global* batch row and head (its offsets from ``lax.axis_index``), so the mask is one
function of (key, global row, global head, query, key) on every mesh and a run resumed on another
mesh draws the same masks.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxlm import naming, precision

BLOCK_Q, BLOCK_K = 64, 64  # query and key rows per program and per loop step, both passes
_NEG = 0.7 * float(precision.finfo_min(precision.FP32))  # masked scores: finite, so exp() is 0, never NaN


def _fmix32(x):
    """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with probability ~1/2."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def keep_mask(seed, bh, rows, cols, n_keys: int, rate: float):
    """True where attention probability (row, col) of batch·head `bh` is kept. `seed`: uint32[2]
    (a raw PRNG key's bits); `bh`, `rows`, `cols` broadcast. Drops with probability
    round(rate·2^32)/2^32."""
    u32 = jnp.uint32
    stream = _fmix32(seed[0] ^ _fmix32(jnp.asarray(bh).astype(u32) * u32(0x9E3779B9) + seed[1]))
    counter = jnp.asarray(rows).astype(u32) * u32(n_keys) + jnp.asarray(cols).astype(u32)
    bits = _fmix32(_fmix32(counter ^ stream) + seed[1])
    return bits >= u32(min(round(rate * 2.0**32), 2**32 - 1))


def key_bits(key) -> jax.Array:
    """uint32[2] of a PRNG key, raw (``jax.random.PRNGKey``) or typed (``jax.random.key``)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return key.reshape(-1)[:2].astype(jnp.uint32)


def reference_keep_mask(key, B: int, H: int, T: int, S: int, rate: float) -> jax.Array:
    """(B, H, T, S) bool: the kernel's mask, drawn with whole arrays (the reference path's dropout)."""
    seed = key_bits(key)
    bh = (jnp.arange(B)[:, None] * H + jnp.arange(H)[None, :])[:, :, None, None]
    return keep_mask(seed, bh, jnp.arange(T)[:, None], jnp.arange(S)[None, :], S, rate)


def supported(T: int, head_dim: int) -> str | None:
    """Why the kernel cannot run these shapes, or None."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head size {head_dim} is not a power of two >= 16"
    if T % min(BLOCK_Q, T) or T % min(BLOCK_K, T) or T < 16:
        return f"sequence length {T} is not a multiple of {BLOCK_Q} (or a power of two >= 16 below it)"
    return None


def _blocks(T: int) -> tuple[int, int]:
    return min(BLOCK_Q, T), min(BLOCK_K, T)


def _causal(s, rows, cols):
    return jnp.where(rows[:, None] >= cols[None, :], s, _NEG)


def _bh(seed_ref, b, h, n_heads):
    """The global batch·head index of program (b, h): `seed_ref` holds (key bits, row offset, head offset)."""
    u32 = jnp.uint32
    return (seed_ref[2] + b.astype(u32)) * u32(n_heads) + seed_ref[3] + h.astype(u32)


def _dropped(p, seed_ref, bh, rows, cols, T, rate):
    """P ⊙ M / keep for one tile (identity at rate 0)."""
    if rate == 0.0:
        return p
    keep = keep_mask((seed_ref[0], seed_ref[1]), bh, rows[:, None], cols[None, :], T, rate)
    return jnp.where(keep, p * (1.0 / (1.0 - rate)), 0.0)


def _forward_kernel(seed_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, rate, n_heads, block_q, block_k):
    qb, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    T = k_ref.shape[0]
    bh = _bh(seed_ref, b, h, n_heads)
    q = q_ref[...]
    rows = qb * block_q + jnp.arange(block_q)

    def body(kb, carry):
        acc, m, row_sum = carry
        k = k_ref[pl.ds(kb * block_k, block_k), :]
        v = v_ref[pl.ds(kb * block_k, block_k), :]
        cols = kb * block_k + jnp.arange(block_k)
        s = _causal(plgpu.dot(q, k, trans_b=True) * scale, rows, cols)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        row_sum = alpha * row_sum + jnp.sum(p, axis=1)
        p = _dropped(p, seed_ref, bh, rows, cols, T, rate)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, row_sum

    f32 = precision.FP32
    init = (jnp.zeros(q.shape, f32), jnp.full((block_q,), _NEG, f32), jnp.zeros((block_q,), f32))
    acc, m, row_sum = jax.lax.fori_loop(0, jax.lax.div((qb + 1) * block_q + block_k - 1, block_k), body, init)
    o_ref[...] = (acc / row_sum[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(row_sum)


def _dkdv_kernel(seed_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale, rate,
                 n_heads, block_q, block_k):
    kb, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    T = q_ref.shape[0]
    bh = _bh(seed_ref, b, h, n_heads)
    k, v = k_ref[...], v_ref[...]
    cols = kb * block_k + jnp.arange(block_k)

    def body(qb, carry):
        dk, dv = carry
        sl = pl.ds(qb * block_q, block_q)
        q, do, lse, delta = q_ref[sl, :], do_ref[sl, :], lse_ref[sl], delta_ref[sl]
        rows = qb * block_q + jnp.arange(block_q)
        p = jnp.exp(_causal(plgpu.dot(q, k, trans_b=True) * scale, rows, cols) - lse[:, None])
        dv = dv + plgpu.dot(_dropped(p, seed_ref, bh, rows, cols, T, rate).astype(do.dtype), do, trans_a=True)
        dp = _dropped(plgpu.dot(do, v, trans_b=True), seed_ref, bh, rows, cols, T, rate)
        ds = p * (dp - delta[:, None]) * scale
        dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    f32 = precision.FP32
    zeros = jnp.zeros(k.shape, f32)
    dk, dv = jax.lax.fori_loop(jax.lax.div(kb * block_k, block_q), T // block_q, body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(seed_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, rate, n_heads,
               block_q, block_k):
    qb, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    T = k_ref.shape[0]
    bh = _bh(seed_ref, b, h, n_heads)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    rows = qb * block_q + jnp.arange(block_q)

    def body(kb, dq):
        k = k_ref[pl.ds(kb * block_k, block_k), :]
        v = v_ref[pl.ds(kb * block_k, block_k), :]
        cols = kb * block_k + jnp.arange(block_k)
        p = jnp.exp(_causal(plgpu.dot(q, k, trans_b=True) * scale, rows, cols) - lse[:, None])
        dp = _dropped(plgpu.dot(do, v, trans_b=True), seed_ref, bh, rows, cols, T, rate)
        ds = p * (dp - delta[:, None]) * scale
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    dq = jax.lax.fori_loop(0, jax.lax.div((qb + 1) * block_q + block_k - 1, block_k), body,
                           jnp.zeros(q.shape, precision.FP32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _specs(T, K, block_q, block_k):
    """BlockSpecs over grid (block, b, h): a tile of rows, all rows, per-row vectors, the seed."""
    def rows(n):
        return pl.BlockSpec((None, n, None, K), lambda i, b, h: (b, i, h, 0))
    whole = pl.BlockSpec((None, T, None, K), lambda i, b, h: (b, 0, h, 0))
    vec = lambda n: pl.BlockSpec((None, None, n), lambda i, b, h: (b, h, i))  # noqa: E731
    vec_whole = pl.BlockSpec((None, None, T), lambda i, b, h: (b, h, 0))
    seed = pl.BlockSpec((4,), lambda i, b, h: (0,))
    return rows, whole, vec, vec_whole, seed


def _call(kernel, grid, in_specs, out_specs, out_shape, interpret, name):
    """The pallas_call; `interpret` None: Triton where the program is lowered for CUDA, interpreted
    elsewhere -- chosen at lowering (``lax.platform_dependent``), so a step traced on a CPU host and
    exported for GPUs holds the Triton kernels."""
    def call(interpret):
        # Triton's compiler parameters also choose the Triton backend (not Mosaic GPU) on a GPU
        return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                              compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2), interpret=interpret,
                              name=name)
    if interpret is not None:
        return call(interpret)
    return lambda *args: jax.lax.platform_dependent(*args, cuda=call(False), default=call(True))


def _forward(q, k, v, seed, scale, rate, n_heads, interpret):
    B, T, H, K = q.shape
    bq, bk = _blocks(T)
    rows, whole, vec, _, seed_spec = _specs(T, K, bq, bk)
    kernel = functools.partial(_forward_kernel, scale=scale, rate=rate, n_heads=n_heads, block_q=bq, block_k=bk)
    return _call(kernel, (T // bq, B, H), [seed_spec, rows(bq), whole, whole], [rows(bq), vec(bq)],
                 [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, T), precision.FP32)],
                 interpret, "flash_forward")(seed, q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, seed, scale, rate, n_heads, interpret):
    """`seed`: uint32[4], the key's bits and this shard's first global batch row and head; `n_heads`: global."""
    return _forward(q, k, v, seed, scale, rate, n_heads, interpret)[0]


def _flash_fwd(q, k, v, seed, scale, rate, n_heads, interpret):
    o, lse = _forward(q, k, v, seed, scale, rate, n_heads, interpret)
    return o, (q, k, v, seed, o, lse)


def _flash_bwd(scale, rate, n_heads, interpret, res, do):
    q, k, v, seed, o, lse = res
    B, T, H, K = q.shape
    bq, bk = _blocks(T)
    rows, whole, vec, vec_whole, seed_spec = _specs(T, K, bq, bk)
    f32 = precision.FP32
    delta = jnp.einsum("bthk,bthk->bht", o.astype(f32), do.astype(f32))  # rowsum(dO ⊙ O)
    do = do.astype(q.dtype)
    kw = dict(scale=scale, rate=rate, n_heads=n_heads, block_q=bq, block_k=bk)
    dk, dv = _call(functools.partial(_dkdv_kernel, **kw), (T // bk, B, H),
                   [seed_spec, whole, rows(bk), rows(bk), whole, vec_whole, vec_whole], [rows(bk), rows(bk)],
                   [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                   interpret, "flash_backward_dkdv")(seed, q, k, v, do, lse, delta)
    dq = _call(functools.partial(_dq_kernel, **kw), (T // bq, B, H),
               [seed_spec, rows(bq), whole, whole, rows(bq), vec(bq), vec(bq)], rows(bq),
               jax.ShapeDtypeStruct(q.shape, q.dtype), interpret, "flash_backward_dq")(seed, q, k, v, do, lse, delta)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


AXES_BTHK = ("batch", "length", "heads", "head_dim")  # q, k, v's logical axes (jaxlm.sharding.LOGICAL_RULES)


def shard_offset(axis, local: int) -> jax.Array:
    """Inside ``shard_map``: the global index of this shard's first element along a dim split over
    mesh `axis` (a name, a tuple of names, major first, or None) in pieces of `local`."""
    if axis is None:
        return jnp.zeros((), jnp.int32)
    return jax.lax.axis_index(axis if isinstance(axis, tuple) else (axis,)) * local


def partitioned(kernel, q, k, v, seed):
    """``kernel(q, k, v, seed4, n_heads)`` on this shard's (B, T, H, K) pieces, under ``shard_map`` when a
    mesh layout is installed (``sharding.use_mesh``); `seed4` carries the shard's global row and head
    offsets after the key's two words, and `n_heads` is the global head count."""
    B, T, H, K = q.shape
    spec = naming.layout_of(AXES_BTHK, q.shape, "the flash kernel's q, k and v")
    mesh = jax.sharding.get_abstract_mesh()
    if spec is None or mesh.empty or not any(spec):
        return kernel(q, k, v, jnp.concatenate([seed, jnp.zeros((2,), jnp.uint32)]), H)
    if spec[1] is not None or spec[3] is not None:
        raise ValueError(f"flash_attention: sequence and head size must not be split, got {spec}")

    def local(q, k, v, seed):
        offsets = jnp.stack([shard_offset(spec[0], q.shape[0]), shard_offset(spec[2], q.shape[2])])
        return kernel(q, k, v, jnp.concatenate([seed, offsets.astype(jnp.uint32)]), H)

    P = jax.sharding.PartitionSpec
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P()), out_specs=spec,
                         check_vma=False)(q, k, v, seed)


def kernel(q_BTHK, k_BTHK, v_BTHK, seed4, n_heads: int, *, scale: float, rate: float, interpret=None):
    """``partitioned``'s kernel: this shard's (B, T, H, K) pieces, `seed4` uint32[4]."""
    return _flash(q_BTHK, k_BTHK, v_BTHK, seed4, scale, rate, n_heads, interpret)


def flash_attention(q_BTHK, k_BTHK, v_BTHK, *, scale: float, dropout_rate: float = 0.0, dropout_key=None,
                    interpret: bool | None = None) -> jax.Array:
    """Causal softmax(scale · QK^T) V with attention dropout drawn from `dropout_key` (see
    ``keep_mask``); (B, T, H, K) in and out, in q's dtype. No key or rate 0: no dropout. `interpret`:
    None runs Triton on CUDA and the interpreter elsewhere (see ``_call``); a bool forces one."""
    T, K = q_BTHK.shape[1], q_BTHK.shape[3]
    if (why := supported(T, K)) is not None:
        raise ValueError(f"flash_attention: {why}")
    rate = float(dropout_rate) if dropout_key is not None else 0.0
    seed = key_bits(dropout_key) if dropout_key is not None else jnp.zeros((2,), jnp.uint32)
    if not math.isfinite(scale):
        raise ValueError(f"flash_attention: scale {scale}")
    run = functools.partial(kernel, scale=float(scale), rate=rate, interpret=interpret)
    return partitioned(run, q_BTHK, k_BTHK.astype(q_BTHK.dtype), v_BTHK.astype(q_BTHK.dtype), seed)
