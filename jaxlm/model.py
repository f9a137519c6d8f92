"""GPT-2 in Flax NNX, top to bottom as in Radford et al. (2019) and Hugging Face's GPT2LMHeadModel.

    tokens ─ wte + wpe ─ dropout ─┬─ n_layer × Block ─ ln_f ─ tied head (wteᵀ) ─> logits (fp32)
    Block:  x + drop(attn(ln_1(x)))  then  x + drop(mlp(ln_2(x)))      (pre-LN, eps 1e-5)

Parameter names follow Hugging Face (wte, wpe, h[i].ln_1, attn.c_attn, attn.c_proj, ln_2,
mlp.c_fc, mlp.c_proj, ln_f), and Linear kernels are (in, out) like HF's Conv1D, so weights move
both ways without transposes (see ``jaxlm.hf``); c_attn's output axis is kept as (3, n_head,
head_dim), HF's 3·n_embd reshaped. Every dtype comes from the precision policy.

Every parameter and each large activation (``ACTIVATIONS``: residual, qkv, mlp, logits,
vocab_table) declares its logical axes where it is made; ``jaxlm.sharding`` maps them to the
mesh in a train step, and outside one they mean nothing.

Use it functionally (Flax's fast pattern): ``graphdef, params = create(cfg, policy, seed)`` once,
then ``apply(graphdef, params, tokens)`` inside ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import attention as attn_lib
from jaxlm import naming, precision
from jaxlm.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The model's shape and behaviour. Field names are HF's GPT2Config names where one exists."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_by_inverse_layer_idx: bool = False
    query_key_layer_scaling: bool = False
    attention_impl: str = "auto"
    remat: str = "none"  # see REMAT_POLICIES
    # The token table has vocab_size rows rounded up to a multiple of this; the extra rows start
    # at zero and their logits are masked, so the function is the unpadded model's (1 = no padding;
    # 128 makes GPT-2's 50257 an aligned 50304 for the tensor cores and for tensor parallelism).
    vocab_multiple: int = 128
    # The loss takes the head (logits, log-softmax, cross-entropy) this many sequence positions at
    # a time, every batch row at once, and recomputes each chunk's logits in the backward pass, so
    # the full float32 (B, T, V) logits and their gradient never exist at once (0 = one chunk of
    # the whole sequence). The same function up to float32 summation order.
    loss_chunk: int = 128
    # --- stability switches (Wortsman et al. 2023); off by default = GPT-2 as HF defines it ---------
    qk_norm: bool = False  # LayerNorm (over head_dim, one scale/bias shared by the heads) on q and k; not HF-exportable
    z_loss: float = 0.0  # coefficient of mean(log² Z) of the output softmax added to the training loss (PaLM)
    attn_logit_softcap: float = 0.0  # c·tanh(score/c) on the scaled scores before masking (Gemma 2); 0 = off
    # --- Cramming's switches (configs/crammed.py); the defaults are GPT-2's ---------------------
    use_bias: bool = True  # biases in the Linear layers (False: none; HF export writes zeros)
    mlp_kind: str = "gelu"  # gelu | gated_gelu: GELU(x W_a) * (x W_b), c_fc's 4d outputs split in two halves
    ln_embed: bool = False  # a LayerNorm on the embedding's output (not in GPT-2, not HF-exportable)
    ln_final: bool = True  # ln_f before the head (False: none, not HF-exportable)

    def __post_init__(self):
        for f in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "vocab_multiple"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"model.{f}: must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                f"choose n_head among the divisors of n_embd, e.g. "
                f"{[h for h in range(1, min(self.n_embd, 64) + 1) if self.n_embd % h == 0][-4:]}"
            )
        for f in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            v = getattr(self, f)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"model.{f}: a dropout rate in [0, 1), got {v!r}")
        if self.attention_impl not in attn_lib.IMPLEMENTATIONS:
            raise ConfigError(
                f"model.attention_impl: unknown {self.attention_impl!r}; "
                f"allowed: {', '.join(attn_lib.IMPLEMENTATIONS)}"
            )
        if self.mlp_kind not in MLP_KINDS:
            raise ConfigError(f"model.mlp_kind: unknown {self.mlp_kind!r}; allowed: {', '.join(MLP_KINDS)}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat: unknown {self.remat!r}; allowed: {', '.join(REMAT_POLICIES)}")
        if not isinstance(self.loss_chunk, int) or isinstance(self.loss_chunk, bool) or self.loss_chunk < 0:
            raise ConfigError(f"model.loss_chunk: sequence positions per loss chunk, >= 0 (0 = no chunking); "
                              f"got {self.loss_chunk!r}")
        for f in ("z_loss", "attn_logit_softcap"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ConfigError(f"model.{f}: a number >= 0 (0 = off), got {v!r}")
        if not isinstance(self.qk_norm, bool):
            raise ConfigError(f"model.qk_norm: True or False, got {self.qk_norm!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the token table (and columns of the logits): vocab_size rounded up to vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def replace(self, **kw) -> "GPT2Config":
        return dataclasses.replace(self, **kw)


# Activation rematerialisation per block (``jax.checkpoint`` policies): what the backward pass
# keeps from the forward pass and what it recomputes. Same function and gradients, other memory.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # keep every intermediate (fastest when it fits)
    # keep the weight matmuls' outputs; recompute the attention core (QK^T, softmax, dropout, PV),
    # LayerNorms and GELU: Megatron's "selective" recomputation, whose savings are the (B, H, T, T) scores
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
}

MLP_KINDS = ("gelu", "gated_gelu")

# Logical axes, the names jaxlm.sharding's one table maps to mesh axes:
#   batch, length    a batch of sequences          vocab, positions  the embedding tables' rows
#   embed            d_model of a weight matrix    act_embed         d_model of an activation, or of a
#   qkv, heads, head_dim   c_attn's output (3, H, K)                 vector added to one (bias, LayerNorm)
#   mlp              the MLP's hidden width
ACTIVATIONS: dict[str, tuple[str, ...]] = {
    "residual": ("batch", "length", "act_embed"),  # (B, T, D)
    "qkv": ("batch", "length", "qkv", "heads", "head_dim"),  # (B, T, 3, H, K)
    "mlp": ("batch", "length", "mlp"),  # (B, T, 4D)
    "logits": ("batch", "length", "vocab"),  # (B, T, V)
    "vocab_table": ("vocab", "act_embed"),  # (V, D): the tied token table as the forward uses it
}

# Sizes of the released GPT-2 family (vocab 50257, 1024 positions).
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=4),
    "small": dict(n_embd=768, n_layer=12, n_head=12),  # 124M
    "medium": dict(n_embd=1024, n_layer=24, n_head=16),  # 355M
    "large": dict(n_embd=1280, n_layer=36, n_head=20),  # 774M
    "xl": dict(n_embd=1600, n_layer=48, n_head=25),  # 1.5B
}


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


class Attention(nnx.Module):
    def __init__(self, cfg: GPT2Config, policy: precision.Policy, layer_idx: int, implementations, *, rngs: nnx.Rngs):
        self.cfg, self.policy, self.layer_idx = cfg, policy, layer_idx
        self.implementation, self.dropout_implementation = implementations  # see _attention_implementations
        self.collect_stats = False
        d = cfg.n_embd
        # One fused QKV projection whose output is laid out (3, n_head, head_dim): HF's (d, 3d)
        # Conv1D weight reshaped. The head axis is its own dim so tensor parallelism shards whole
        # heads of q, k and v alike (jaxlm/sharding.py); a flat 3d axis split over devices would
        # cut across q|k|v and cost a reshuffle of activations in every layer.
        self.c_attn = _linear(d, (3, cfg.n_head, cfg.head_dim), cfg.initializer_range, policy, rngs,
                              ("embed", "qkv", "heads", "head_dim"), ("qkv", "heads", "head_dim"), cfg.use_bias)
        # its input is the heads side by side (H·K), split over devices as c_attn's output is
        self.c_proj = _linear(d, d, cfg.initializer_range / math.sqrt(2 * cfg.n_layer), policy, rngs,
                              ("heads", "embed"), ("act_embed",), cfg.use_bias)
        if cfg.qk_norm:  # only then: with it off the parameters (and checkpoints) are GPT-2's
            self.q_norm = _layernorm(cfg, policy, rngs, cfg.head_dim, "head_dim")
            self.k_norm = _layernorm(cfg, policy, rngs, cfg.head_dim, "head_dim")

    def __call__(self, x_BTD, keys=(None, None), cache: attn_lib.KVCache | None = None):
        """(output, cache with this call's keys and values appended); `keys`: probabilities' and output's dropout."""
        cfg = self.cfg
        B, T, D = x_BTD.shape
        probs_key, out_key = keys
        if self.collect_stats and self.policy.fp8_matmuls:
            _sow_fp8(self, x_BTD)
        qkv_BT3HK = constrain(self.c_attn(x_BTD), "qkv")
        q_BTHK, k_BSHK, v_BSHK = qkv_BT3HK[:, :, 0], qkv_BT3HK[:, :, 1], qkv_BT3HK[:, :, 2]
        if cfg.qk_norm:
            q_BTHK, k_BSHK = self.q_norm(q_BTHK), self.k_norm(k_BSHK)
        mask_TS = None  # causal over the T positions
        if cache is not None:  # decoding: the queries also see every position written before
            mask_TS = cache.mask_TS(T)
            cache = cache.append(k_BSHK, v_BSHK)
            k_BSHK, v_BSHK = cache.k_BSHK, cache.v_BSHK
        with jax.named_scope("core"):  # QK^T, softmax, PV: the part cuDNN fuses
            out_BTHK, stats = attn_lib.attention(
                q_BTHK, k_BSHK, v_BSHK, policy=self.policy, layer_idx=self.layer_idx,
                inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx,
                query_key_layer_scaling=cfg.query_key_layer_scaling, softcap=cfg.attn_logit_softcap,
                implementation=self._implementation(probs_key), mask_TS=mask_TS,
                dropout_rate=cfg.attn_pdrop, dropout_key=probs_key,
                collect_stats=self.collect_stats,
            )
        if self.collect_stats:
            for name, value in (("attn_max", stats.max), ("attn_min", stats.min), ("nonfinite", stats.nonfinite)):
                self.sow(Stats, name, value)
            if self.policy.fp8_matmuls:
                _sow_fp8(self, out_BTHK.reshape(B, T, D))
        return dropout(self.c_proj(out_BTHK.reshape(B, T, D)), cfg.resid_pdrop, out_key), cache

    def _implementation(self, probs_key):
        if probs_key is None or self.cfg.attn_pdrop == 0:
            return self.implementation
        if self.dropout_implementation is None:  # attention_impl cannot drop out: say why
            attn_lib.resolve_implementation(**_resolve_args(self.cfg, self.policy), dropout=True)
        return self.dropout_implementation


class MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, policy: precision.Policy, *, rngs: nnx.Rngs):
        d = cfg.n_embd
        # gated_gelu (Cramming's GLU): c_fc's 4d outputs are two halves, GELU(a) * b, so the hidden width is 2d
        # and c_proj is (2d, d): fewer parameters than GPT-2's MLP, as in Cramming (which keeps the width).
        self.gated = cfg.mlp_kind == "gated_gelu"
        hidden = 2 * d if self.gated else 4 * d
        self.c_fc = _linear(d, 4 * d, cfg.initializer_range, policy, rngs, ("embed", "mlp"), ("mlp",), cfg.use_bias)
        self.c_proj = _linear(hidden, d, cfg.initializer_range / math.sqrt(2 * cfg.n_layer), policy, rngs,
                              ("mlp", "embed"), ("act_embed",), cfg.use_bias)
        self.resid_pdrop = cfg.resid_pdrop
        self.fp8_stats = policy.fp8_matmuls
        self.collect_stats = False

    def __call__(self, x_BTD, key=None):
        h_BTF = constrain(self.c_fc(x_BTD), "mlp")
        if self.collect_stats and self.fp8_stats:
            _sow_fp8(self, x_BTD)
        if self.gated:
            a_BTF, b_BTF = jnp.split(h_BTF, 2, axis=-1)
            h_BTF = jax.nn.gelu(a_BTF, approximate=True) * b_BTF
        else:
            h_BTF = jax.nn.gelu(h_BTF, approximate=True)  # HF "gelu_new"
        if self.collect_stats and self.fp8_stats:
            _sow_fp8(self, h_BTF)
        return dropout(self.c_proj(h_BTF), self.resid_pdrop, key)


def _sow_fp8(module: nnx.Module, x_in) -> None:
    """Sows what e4m3 current scaling does to the input of one fp8 matmul (``precision.fp8_stats``)."""
    for name, value in precision.fp8_stats(x_in, precision.E4M3).items():
        module.sow(Stats, "fp8_" + name, value)


class Block(nnx.Module):
    def __init__(self, cfg: GPT2Config, policy: precision.Policy, layer_idx: int, implementations, *,
                 rngs: nnx.Rngs):
        self.ln_1 = _layernorm(cfg, policy, rngs)
        self.attn = Attention(cfg, policy, layer_idx, implementations, rngs=rngs)
        self.ln_2 = _layernorm(cfg, policy, rngs)
        self.mlp = MLP(cfg, policy, rngs=rngs)
        self.collect_stats = False
        self.collect_residuals = False

    def __call__(self, x_BTD, key=None, cache: attn_lib.KVCache | None = None):
        """(x + attn(ln_1(x)), then + mlp(ln_2(x)); this layer's updated cache)."""
        *attn_keys, mlp_key = _split(key, 3)
        # named scopes ("attn", "attn/core", "mlp", ...) label the compiled ops: jaxlm.profiling sums by them
        with jax.named_scope("attn"):
            a_BTD, cache = self.attn(self.ln_1(x_BTD), attn_keys, cache)
            x_BTD = constrain(x_BTD + a_BTD, "residual")
        with jax.named_scope("mlp"):
            x_BTD = constrain(x_BTD + self.mlp(self.ln_2(x_BTD), mlp_key), "residual")
        if self.collect_stats:
            self.sow(Stats, "resid_rms", _rms(x_BTD))
        if self.collect_residuals:
            self.sow(Residual, "residual", x_BTD)
        return x_BTD, cache


class GPT2(nnx.Module):
    """GPT2LMHeadModel. Call with int tokens (B, T); returns float32 logits (B, T, padded_vocab_size).

    Logits past ``vocab_size`` (the table's padding, ``GPT2Config.vocab_multiple``) hold the float32
    minimum: no softmax, loss or sampler gives them weight. ``logits()`` returns (B, T, vocab_size).
    """

    def __init__(self, cfg: GPT2Config, policy: precision.Policy, *, rngs: nnx.Rngs):
        self.cfg, self.policy = cfg, policy
        self.collect_stats = False
        self.collect_residuals = False
        init = nnx.initializers.normal(cfg.initializer_range)
        emb = dict(dtype=policy.compute_dtype, param_dtype=policy.param_dtype, rngs=rngs)
        self.wte = nnx.Embed(cfg.padded_vocab_size, cfg.n_embd, embedding_init=_zero_padded(init, cfg.vocab_size),
                             embedding_metadata=_axes("vocab", "embed"), **emb)
        self.wpe = nnx.Embed(cfg.n_positions, cfg.n_embd, embedding_init=init,
                             embedding_metadata=_axes("positions", "embed"), **emb)
        impls = _attention_implementations(cfg, policy)
        self.h = nnx.List([Block(cfg, policy, i, impls, rngs=rngs) for i in range(cfg.n_layer)])
        self.ln_f = _layernorm(cfg, policy, rngs) if cfg.ln_final else None  # model.ln_final
        self.ln_embed = _layernorm(cfg, policy, rngs) if cfg.ln_embed else None  # model.ln_embed (Cramming)

    def __call__(
        self,
        tokens_BT: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        cache: tuple[attn_lib.KVCache, ...] | None = None,
    ):
        """Logits for `tokens_BT`; given a `cache` (``empty_cache``), (logits, the cache with these tokens).

        `dropout_key=None` means evaluation (no dropout). Positions default to 0.. (after the
        cache's filled positions). Per-layer statistics: ``apply(..., collect_stats=True)``.
        """
        x_BTD, wte_VD, new_cache = self.trunk(tokens_BT, positions_BT=positions_BT, dropout_key=dropout_key,
                                              cache=cache)
        with jax.named_scope("head"):
            logits_BTV = self._head(x_BTD, wte_VD)
        return logits_BTV if cache is None else (logits_BTV, new_cache)

    def token_losses(self, tokens_BT, targets_BT, *, positions_BT=None, dropout_key=None):
        """Per-token cross-entropy of `targets_BT` and log Z (the log-sum-exp of the logits), both
        float32 (B, T); the head runs ``cfg.loss_chunk`` positions at a time (see GPT2Config)."""
        x_BTD, wte_VD, _ = self.trunk(tokens_BT, positions_BT=positions_BT, dropout_key=dropout_key)
        def head(x_BcD):  # named as the unchunked head is: jaxlm.profiling sums the parts by scope
            with jax.named_scope("head"):
                return self._head(x_BcD, wte_VD)

        with jax.named_scope("loss"):
            return chunked_cross_entropy(head, x_BTD, targets_BT, self.cfg.loss_chunk)

    def trunk(self, tokens_BT, *, positions_BT=None, dropout_key=None, cache=None):
        """Everything before the head: (ln_f's output (B, T, D), the token table as the head uses it,
        the updated cache or None)."""
        cfg = self.cfg
        if positions_BT is None:
            positions_BT = _positions(cfg, tokens_BT.shape[-1], cache)
        keys = _split(dropout_key, cfg.n_layer + 1)
        # The token embedding is also the head: lay it out once for both uses.
        wte_VD = constrain(self.wte.embedding[...], "vocab_table")
        with jax.named_scope("embed"):
            x_BTD = jnp.take(wte_VD.astype(self.policy.compute_dtype), tokens_BT, axis=0) + self.wpe(positions_BT)
            if self.ln_embed is not None:
                x_BTD = self.ln_embed(x_BTD)
            x_BTD = dropout(constrain(x_BTD, "residual"), cfg.embd_pdrop, keys[-1])
        if self.collect_residuals:
            self.sow(Residual, "residual", x_BTD)
        block_fn = self._block_fn(cache)
        new_cache = []
        for i, block in enumerate(self.h):
            x_BTD, layer_cache = block_fn(block, x_BTD, keys[i], None if cache is None else cache[i])
            new_cache.append(layer_cache)
        return x_BTD if self.ln_f is None else self.ln_f(x_BTD), wte_VD, None if cache is None else tuple(new_cache)

    def _block_fn(self, cache):
        """Block.__call__, rematerialised per model.remat when that can pay off (a differentiated pass)."""
        policy = REMAT_POLICIES[self.cfg.remat]
        if policy is None or cache is not None or self.collect_stats or self.collect_residuals:
            return Block.__call__
        return nnx.remat(Block.__call__, policy=policy)

    def _head(self, x_BTD, wte_VD):
        """Float32 logits against the tied token table; the table's padding rows masked."""
        cfg, compute = self.cfg, self.policy.compute_dtype
        logits_BTV = precision.einsum("btd,vd->btv", x_BTD.astype(compute), wte_VD.astype(compute),
                                      out_dtype=precision.FP32, precision=self.policy.matmul_precision)
        logits_BTV = constrain(logits_BTV, "logits")
        if cfg.padded_vocab_size != cfg.vocab_size:  # masked, not sliced: a slice would reshard the vocab dim
            real_V = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
            logits_BTV = jnp.where(real_V, logits_BTV, jnp.finfo(logits_BTV.dtype).min)
        return logits_BTV


def _positions(cfg: GPT2Config, T: int, cache):
    if T > cfg.n_positions:
        raise ConfigError(
            f"sequence length {T} exceeds model.n_positions={cfg.n_positions}; "
            "use a shorter train.seq_len or a model with more positions"
        )
    start = 0 if cache is None else cache[0].index
    return start + jnp.arange(T)[None, :]


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


def _split(key, n: int) -> tuple:
    return tuple(jax.random.split(key, n)) if key is not None else (None,) * n


def _resolve_args(cfg: GPT2Config, policy: precision.Policy) -> dict:
    return dict(impl=cfg.attention_impl, policy=policy, head_dim=cfg.head_dim,
                query_key_layer_scaling=cfg.query_key_layer_scaling, softcap=cfg.attn_logit_softcap)


def _attention_implementations(cfg: GPT2Config, policy: precision.Policy) -> tuple[str, str | None]:
    """The attention implementation without attention dropout and with it, decided once per model.

    They differ where cuDNN serves evaluation and the flash kernel the training passes, which drop
    attention probabilities out. None: `attention_impl` forces an implementation that cannot run a
    pass with attention dropout (cuDNN).
    """
    plain = attn_lib.resolve_implementation(**_resolve_args(cfg, policy), dropout=False)
    if cfg.attn_pdrop == 0:
        return plain, plain
    try:
        return plain, attn_lib.resolve_implementation(**_resolve_args(cfg, policy), dropout=True)
    except ConfigError:
        return plain, None


def _zero_padded(init, rows: int):
    """`init` for the first `rows` rows, zeros below: the same draw whatever the padding."""

    def f(key, shape, dtype):
        return jnp.pad(init(key, (rows, *shape[1:]), dtype), ((0, shape[0] - rows), (0, 0)))

    return f


def _axes(*names: str) -> dict:
    """Variable metadata declaring a parameter's logical axes (Flax's ``out_sharding``). Not applied
    when the parameter is made (no eager sharding: the model has no mesh); ``jaxlm.sharding`` reads it."""
    return {"out_sharding": names, "eager_sharding": False}


def _linear(d_in, d_out, std, policy, rngs, kernel_axes, bias_axes, use_bias=True):
    """A dense layer, kernel (d_in, *d_out); initialised as HF does whatever the output's shape. Its
    matmul is the policy's ``dot_general`` (float8 operands in the fp8 regime, else lax's).
    `use_bias=False` (model.use_bias): no bias parameter at all."""
    return nnx.LinearGeneral(
        d_in, d_out, use_bias=use_bias, dtype=policy.compute_dtype, param_dtype=policy.param_dtype,
        kernel_init=nnx.initializers.normal(std), bias_init=nnx.initializers.zeros_init(),
        precision=policy.matmul_precision, dot_general=policy.dot_general, rngs=rngs,
        kernel_metadata=_axes(*kernel_axes), bias_metadata=_axes(*bias_axes),
    )


def _layernorm(cfg, policy, rngs, features=None, axis_name="act_embed"):
    # Flax computes LayerNorm statistics in at least float32 whatever `dtype` is. The variance is
    # E[(x - mean)^2], two passes as PyTorch computes it: Flax's fast E[x^2] - mean^2 loses the
    # variance to cancellation when the features share a large mean.
    return nnx.LayerNorm(features or cfg.n_embd, epsilon=cfg.layer_norm_epsilon, dtype=policy.compute_dtype,
                         param_dtype=policy.param_dtype, rngs=rngs, use_fast_variance=False,
                         scale_metadata=_axes(axis_name), bias_metadata=_axes(axis_name))


def constrain(x: jax.Array, kind: str) -> jax.Array:
    """Activation `x` of kind `kind` (``ACTIVATIONS``) laid out as the installed layout says (a train
    step's ``sharding.use_mesh``); the identity otherwise."""
    return naming.constrain(x, ACTIVATIONS[kind], f"the {kind} activation")


def _rms(x):
    x = x.astype(precision.FP32)
    return jnp.sqrt(jnp.mean(x * x))


# --- the functional interface: split once, jit over plain state -------------------------------

def create(cfg: GPT2Config, policy: precision.Policy, seed: int | jax.Array = 0):
    """Initialise GPT-2 as GPT-2/Mistral do; returns (graphdef, params) for ``apply``.

    `params` is a plain nested dict of arrays (``params["h"][0]["attn"]["c_attn"]["kernel"]``),
    which optax, Orbax and the sharding rules take as is (``param_axes`` gives each one's logical axes).
    """
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    graphdef, state = nnx.split(GPT2(cfg, policy, rngs=nnx.Rngs(params=key)))
    return graphdef, nnx.to_pure_dict(state)


def abstract(cfg: GPT2Config, policy: precision.Policy):
    """(graphdef, params as ShapeDtypeStructs) without allocating anything."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT2(cfg, policy, rngs=nnx.Rngs(0))))
    return graphdef, nnx.to_pure_dict(state)


def apply(graphdef, params, tokens_BT, *, collect_stats: bool = False, collect_residuals: bool = False, **kwargs):
    """``GPT2.__call__`` on a (graphdef, params) pair; pure, so it jits.

    With `collect_stats=True` returns (output, stats): per layer (float32/bool of shape (n_layer,))
    resid_rms, attn_max, attn_min, nonfinite -- what explains an unstable run; in the fp8 regime also
    fp8_amax, fp8_saturated, fp8_underflow (over the layer's four Linear inputs: the largest amax and
    the worst fraction, see ``precision.fp8_stats``); and scalars logit_mean (the mean output logit
    over the vocabulary) and log_z (the mean log-partition function), the drift z-loss addresses.
    The modules sow them only then (a static flag), so without it the program has none of their ops.

    With `collect_residuals=True` (and not `collect_stats`) returns (output, residuals): the residual
    stream after the embedding (with its dropout) and after each block, stacked (n_layer + 1, B, T, D)
    in the compute dtype -- what ``jaxlm.probe`` reads. Sown only then, like the statistics.
    """
    model = nnx.merge(graphdef, params)
    if not isinstance(tokens_BT, jax.core.Tracer):  # called eagerly: check the ids (under jit the data path does)
        check_token_ids(tokens_BT, model.cfg.vocab_size)
    if collect_residuals:
        if collect_stats:
            raise ValueError("apply: collect_stats and collect_residuals are separate passes; ask for one")
        model.set_attributes(collect_residuals=True)
        out, sown = nnx.capture(model, Residual)(tokens_BT, **kwargs)
        embed = nnx.to_pure_dict(sown)["residual"][0]
        blocks = [nnx.to_pure_dict(sown["h"][i])["residual"][0] for i in range(model.cfg.n_layer)]
        return out, jnp.stack([embed, *blocks])
    if not collect_stats:
        return model(tokens_BT, **kwargs)
    model.set_attributes(collect_stats=True)
    out, sown = nnx.capture(model, Stats)(tokens_BT, **kwargs)
    layers = [nnx.to_pure_dict(sown["h"][i]) for i in range(model.cfg.n_layer)]  # each value: (sown once,)
    rms = jnp.stack([layer["resid_rms"][0] for layer in layers])
    attn = {k: jnp.stack([layer["attn"][k][0] for layer in layers]) for k in ("attn_max", "attn_min", "nonfinite")}
    stats = {"resid_rms": rms, "attn_max": attn["attn_max"], "attn_min": attn["attn_min"],
             "nonfinite": attn["nonfinite"] | ~jnp.isfinite(rms)}
    if model.policy.fp8_matmuls:
        for k in ("fp8_amax", "fp8_saturated", "fp8_underflow"):
            stats[k] = jnp.stack([jnp.max(jnp.stack([*layer["attn"][k], *layer["mlp"][k]])) for layer in layers])
    logits_BTV = out[0] if isinstance(out, tuple) else out
    real_V = jnp.arange(logits_BTV.shape[-1]) < model.cfg.vocab_size
    stats["logit_mean"] = jnp.sum(jnp.where(real_V, logits_BTV, 0.0)) / (logits_BTV[..., 0].size * model.cfg.vocab_size)
    stats["log_z"] = jnp.mean(jax.nn.logsumexp(logits_BTV, axis=-1))
    return out, stats


def z_loss(log_z_BT: jax.Array, coefficient: float) -> jax.Array:
    """coefficient · mean(log² Z), from the log-partition values ``token_losses`` returns (PaLM's
    auxiliary loss; padding logits hold the float32 minimum and add nothing to Z)."""
    return coefficient * jnp.mean(jnp.square(log_z_BT))


def token_losses(graphdef, params, tokens_BT, targets_BT, **kwargs):
    """(cross-entropy, log Z), float32 (B, T): what training, validation and evaluation score, without
    the full logits (``GPT2.token_losses``); pure, so it jits. `kwargs` as ``GPT2.__call__``'s."""
    model = nnx.merge(graphdef, params)
    if not isinstance(tokens_BT, jax.core.Tracer):
        check_token_ids(tokens_BT, model.cfg.vocab_size)
    return model.token_losses(tokens_BT, targets_BT, **kwargs)


def empty_cache(cfg: GPT2Config, batch: int, dtype) -> tuple[attn_lib.KVCache, ...]:
    """A KV cache for ``GPT2.__call__``: per layer, room for n_positions keys and values, none filled."""
    return tuple(attn_lib.KVCache.empty(batch, cfg.n_positions, cfg.n_head, cfg.head_dim, dtype)
                 for _ in range(cfg.n_layer))


def param_axes(name: str) -> tuple[str, ...]:
    """Logical axes of the parameter `name` ('h.3.attn.c_attn.kernel'; a prefix such as 'params.' or
    an optimizer moment's path is ignored), as its module declared them. KeyError if there is none."""
    parts = [p for p in name.split(".") if not p.isdigit()]
    declared = _declared_axes()
    for i in range(len(parts)):
        if ".".join(parts[i:]) in declared:
            return declared[".".join(parts[i:])]
    raise KeyError(name)


@functools.cache
def _declared_axes() -> dict[str, tuple[str, ...]]:
    """{'h.attn.c_attn.kernel': axes, ...}: layer numbers left out, as the axes are the same in every
    layer and every size (read off a small abstract model with every optional parameter present)."""
    probe = GPT2Config(vocab_size=8, n_positions=8, n_embd=8, n_layer=1, n_head=2, attention_impl="reference",
                       qk_norm=True, ln_embed=True)
    _, state = nnx.split(nnx.eval_shape(lambda: GPT2(probe, precision.policy(), rngs=nnx.Rngs(0))))
    variables = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return {".".join(p for p in naming.param_name(path).split(".") if not p.isdigit()): v.get_metadata()["out_sharding"]
            for path, v in variables}


def count_params(params, cfg: GPT2Config | None = None) -> int:
    """Parameters of `params`; given its config, without the token table's padding rows."""
    padding = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd if cfg is not None else 0
    return sum(int(x.size) for x in jax.tree.leaves(params)) - padding


def check_token_ids(tokens, vocab_size: int) -> None:
    """Fails naming the offending ids if any token is outside [0, vocab_size): inside jit an id past
    the table would read a padding row or clamp (NaN logits, or the last row for -1), silently."""
    t = np.asarray(tokens)
    if t.size and (t.min() < 0 or t.max() >= vocab_size):
        bad = np.unique(t[(t < 0) | (t >= vocab_size)])
        raise DataError(f"token ids {bad[:8].tolist()} are outside the vocabulary [0, {vocab_size}); "
                        "tokenize with the model's own tokenizer")


def logits(graphdef, params, tokens_BT) -> jax.Array:
    """Float32 logits (B, T, vocab_size) of int tokens (B, T) or (T,), jit-compiled; no dropout.
    Token ids outside the vocabulary are an error."""
    check_token_ids(tokens_BT, nnx.merge(graphdef, params).cfg.vocab_size)
    tokens = jnp.asarray(tokens_BT, jnp.int32)
    squeeze = tokens.ndim == 1
    out = _jit_logits(graphdef, params, tokens[None] if squeeze else tokens)
    return out[0] if squeeze else out


@jax.jit(static_argnums=0)
def _jit_logits(graphdef, params, tokens):
    model = nnx.merge(graphdef, params)
    return model(tokens)[..., : model.cfg.vocab_size]
