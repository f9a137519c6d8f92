"""GPT-2 in Flax NNX, top to bottom as in Radford et al. (2019) and Hugging Face's GPT2LMHeadModel.

    tokens ─ wte + wpe ─ dropout ─┬─ n_layer × Block ─ ln_f ─ tied head (wteᵀ) ─> logits (fp32)
    Block:  x + drop(attn(ln_1(x)))  then  x + drop(mlp(ln_2(x)))      (pre-LN, eps 1e-5)

Switches, off by default (GPT2Config): Wortsman et al.'s qk_norm and softcaps; Cramming's (configs/crammed.py);
the speedrun's (configs/speedrun.py): RoPE instead of wpe, ReLU², zero-init c_proj, an untied head lm_head.

Parameter names follow Hugging Face (wte, wpe, h[i].ln_1, attn.c_attn, attn.c_proj, ln_2,
mlp.c_fc, mlp.c_proj, ln_f), and Linear kernels are (in, out) like HF's Conv1D, so weights move
both ways without transposes (see ``jaxlm.hf``); c_attn's output axis is kept as (3, n_head,
head_dim), HF's 3·n_embd reshaped. Every dtype comes from the precision policy.

Every parameter and each large activation (``ACTIVATIONS``: residual, qkv, mlp, logits,
vocab_table) declares its logical axes where it is made (``jaxlm.layers``); ``jaxlm.sharding`` maps
them to the mesh in a train step, and outside one they mean nothing. The config and sizes are in
``jaxlm.model_config``; the n_layer blocks run as a Python loop or, with ``model.scan_layers``, as a
scan over one block of stacked parameters (``jaxlm.scan``: the same numbers, a program that does not
grow with depth).

Use it functionally (Flax's fast pattern): ``graphdef, params = create(cfg, policy, seed)`` once,
then ``apply(graphdef, params, tokens)`` inside ``jax.jit``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import attention as attn_lib
from jaxlm import layers, model_config, naming, precision
from jaxlm import scan as scan_lib
from jaxlm.errors import ConfigError
from jaxlm.layers import ACTIVATIONS, check_token_ids, constrain, z_loss  # noqa: F401  (re-exported)
from jaxlm.model_config import MLP_KINDS, REMAT_POLICIES, SIZES, GPT2Config, count_params  # noqa: F401  (re-exported)


class Attention(nnx.Module):
    def __init__(self, cfg: GPT2Config, policy: precision.Policy, layer_idx: int, implementations, *, rngs: nnx.Rngs):
        self.cfg, self.policy, self.layer_idx = cfg, policy, layer_idx
        self.implementation, self.dropout_implementation = implementations  # see model_config.attention_implementations
        self.collect_stats = False
        d = cfg.n_embd
        # One fused QKV projection whose output is laid out (3, n_head, head_dim): HF's (d, 3d)
        # Conv1D weight reshaped. The head axis is its own dim so tensor parallelism shards whole
        # heads of q, k and v alike (jaxlm/sharding.py); a flat 3d axis split over devices would
        # cut across q|k|v and cost a reshuffle of activations in every layer.
        self.c_attn = layers.linear(d, (3, cfg.n_head, cfg.head_dim), cfg.initializer_range, policy, rngs,
                              ("embed", "qkv", "heads", "head_dim"), ("qkv", "heads", "head_dim"), cfg.use_bias)
        # its input is the heads side by side (H·K), split over devices as c_attn's output is
        self.c_proj = layers.linear(d, d, cfg.proj_std, policy, rngs, ("heads", "embed"), ("act_embed",),
                                    cfg.use_bias)
        if cfg.qk_norm:  # only then: with it off the parameters (and checkpoints) are GPT-2's
            self.q_norm = layers.qk_norm(cfg, policy, rngs)
            self.k_norm = layers.qk_norm(cfg, policy, rngs)

    def __call__(self, x_BTD, keys=(None, None), cache: attn_lib.KVCache | None = None, layer_idx=None, rope=None):
        """(output, cache with this call's keys and values appended); `keys`: probabilities' and output's
        dropout; `layer_idx`: this layer's index, a traced int32 in the layer scan (default: the block's);
        `rope`: the rotary tables of these positions (``layers.rope_tables``) with model.rope."""
        cfg = self.cfg
        B, T, D = x_BTD.shape
        probs_key, out_key = keys
        if self.collect_stats and self.policy.fp8_matmuls:
            layers.sow_fp8(self, x_BTD)
        qkv_BT3HK = constrain(self.c_attn(x_BTD), "qkv")
        q_BTHK, k_BSHK, v_BSHK = qkv_BT3HK[:, :, 0], qkv_BT3HK[:, :, 1], qkv_BT3HK[:, :, 2]
        if cfg.qk_norm:
            q_BTHK, k_BSHK = self.q_norm(q_BTHK), self.k_norm(k_BSHK)
        if rope is not None:  # rotated before the cache: cached keys keep their positions' rotation
            q_BTHK, k_BSHK = layers.rope(q_BTHK, rope), layers.rope(k_BSHK, rope)
        mask_TS = None  # causal over the T positions
        if cache is not None:  # decoding: the queries also see every position written before
            mask_TS = cache.mask_TS(T)
            cache = cache.append(k_BSHK, v_BSHK)
            k_BSHK, v_BSHK = cache.k_BSHK, cache.v_BSHK
        implementation = self._implementation(probs_key)
        core = functools.partial(
            attn_lib.attention, q_BTHK, k_BSHK, v_BSHK, policy=self.policy, n_layer=cfg.n_layer,
            inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx,
            query_key_layer_scaling=cfg.query_key_layer_scaling, softcap=cfg.attn_logit_softcap,
            implementation=implementation, mask_TS=mask_TS, dropout_rate=cfg.attn_pdrop, dropout_key=probs_key,
            collect_stats=self.collect_stats)
        layer_idx = self.layer_idx if layer_idx is None else layer_idx
        with jax.named_scope("core"):  # QK^T, softmax, PV: the part cuDNN fuses
            if isinstance(layer_idx, int) or not self._static_scale(implementation):
                out_BTHK, stats = core(layer_idx=layer_idx)
            else:  # the kernels take the layer's scale as a constant: one branch per layer, the core only
                out_BTHK, stats = jax.lax.switch(
                    layer_idx, [functools.partial(core, layer_idx=i) for i in range(cfg.n_layer)])
        if self.collect_stats:
            for name, value in (("attn_max", stats.max), ("attn_min", stats.min), ("nonfinite", stats.nonfinite)):
                self.sow(layers.Stats, name, value)
            if self.policy.fp8_matmuls:
                layers.sow_fp8(self, out_BTHK.reshape(B, T, D))
        return layers.dropout(self.c_proj(out_BTHK.reshape(B, T, D)), cfg.resid_pdrop, out_key), cache

    def _static_scale(self, implementation: str) -> bool:
        """Whether `implementation` needs this layer's score scale as a Python float (a kernel's constant)."""
        layer_scaled = self.cfg.scale_attn_by_inverse_layer_idx or self.cfg.query_key_layer_scaling
        return layer_scaled and implementation in ("flash", "cudnn")

    def _implementation(self, probs_key):
        if probs_key is None or self.cfg.attn_pdrop == 0:
            return self.implementation
        if self.dropout_implementation is None:  # attention_impl cannot drop out: say why
            attn_lib.resolve_implementation(**model_config.resolve_args(self.cfg, self.policy), dropout=True)
        return self.dropout_implementation


class MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, policy: precision.Policy, *, rngs: nnx.Rngs):
        d = cfg.n_embd
        # gated_gelu (Cramming's GLU): c_fc's 4d outputs are two halves, GELU(a) * b, so the hidden width is 2d
        # and c_proj is (2d, d): fewer parameters than GPT-2's MLP, as in Cramming (which keeps the width).
        self.kind = cfg.mlp_kind
        hidden = 2 * d if self.kind == "gated_gelu" else 4 * d
        self.c_fc = layers.linear(d, 4 * d, cfg.initializer_range, policy, rngs, ("embed", "mlp"), ("mlp",), cfg.use_bias)
        self.c_proj = layers.linear(hidden, d, cfg.proj_std, policy, rngs, ("mlp", "embed"), ("act_embed",),
                                    cfg.use_bias)
        self.resid_pdrop = cfg.resid_pdrop
        self.fp8_stats = policy.fp8_matmuls
        self.collect_stats = False

    def __call__(self, x_BTD, key=None):
        h_BTF = constrain(self.c_fc(x_BTD), "mlp")
        if self.collect_stats and self.fp8_stats:
            layers.sow_fp8(self, x_BTD)
        h_BTF = layers.activation(self.kind, h_BTF)  # gelu: HF's "gelu_new"
        if self.collect_stats and self.fp8_stats:
            layers.sow_fp8(self, h_BTF)
        return layers.dropout(self.c_proj(h_BTF), self.resid_pdrop, key)


class Block(nnx.Module):
    def __init__(self, cfg: GPT2Config, policy: precision.Policy, layer_idx: int, implementations, *,
                 rngs: nnx.Rngs):
        self.ln_1 = layers.layernorm(cfg, policy, rngs)
        self.attn = Attention(cfg, policy, layer_idx, implementations, rngs=rngs)
        self.ln_2 = layers.layernorm(cfg, policy, rngs)
        self.mlp = MLP(cfg, policy, rngs=rngs)
        self.collect_stats = False
        self.collect_residuals = False

    def __call__(self, x_BTD, key=None, cache: attn_lib.KVCache | None = None, layer_idx=None, rope=None):
        """(x + attn(ln_1(x)), then + mlp(ln_2(x)); this layer's updated cache). `layer_idx`, `rope`: see Attention."""
        *attn_keys, mlp_key = layers.split(key, 3)
        # named scopes ("attn", "attn/core", "mlp", ...) label the compiled ops: jaxlm.profiling sums by them
        with jax.named_scope("attn"):
            a_BTD, cache = self.attn(self.ln_1(x_BTD), attn_keys, cache, layer_idx, rope)
            x_BTD = constrain(x_BTD + a_BTD, "residual")
        with jax.named_scope("mlp"):
            x_BTD = constrain(x_BTD + self.mlp(self.ln_2(x_BTD), mlp_key), "residual")
        if self.collect_stats:
            self.sow(layers.Stats, "resid_rms", layers.rms(x_BTD))
        if self.collect_residuals:
            self.sow(layers.Residual, "residual", x_BTD)
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
        self.wte = nnx.Embed(cfg.padded_vocab_size, cfg.n_embd, embedding_init=layers.zero_padded(init, cfg.vocab_size),
                             embedding_metadata=layers.axes("vocab", "embed"), **emb)
        self.wpe = None if cfg.rope else nnx.Embed(  # model.rope: positions rotate q and k instead
            cfg.n_positions, cfg.n_embd, embedding_init=init, embedding_metadata=layers.axes("positions", "embed"), **emb)
        impls = model_config.attention_implementations(cfg, policy)
        blocks = [Block(cfg, policy, i, impls, rngs=rngs) for i in range(cfg.n_layer)]
        # model.scan_layers: one block of the same parameters stacked, run by a scan (jaxlm.scan)
        self.h = scan_lib.stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.ln_f = layers.layernorm(cfg, policy, rngs) if cfg.ln_final else None  # model.ln_final
        self.ln_embed = layers.layernorm(cfg, policy, rngs) if cfg.ln_embed else None  # model.ln_embed (Cramming)
        # model.tie_word_embeddings=False: an own head, (D, V) as HF's lm_head.weight transposed (Conv1D's layout)
        self.lm_head = None if cfg.tie_word_embeddings else layers.linear(
            cfg.n_embd, cfg.padded_vocab_size, cfg.initializer_range, policy, rngs, ("embed", "vocab"), (), False)

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
        x_BTD, head_VD, new_cache = self.trunk(tokens_BT, positions_BT=positions_BT, dropout_key=dropout_key,
                                               cache=cache)
        with jax.named_scope("head"):
            logits_BTV = self._head(x_BTD, head_VD)
        return logits_BTV if cache is None else (logits_BTV, new_cache)

    def token_losses(self, tokens_BT, targets_BT, *, positions_BT=None, dropout_key=None):
        """Per-token cross-entropy of `targets_BT` and log Z (the log-sum-exp of the logits), both
        float32 (B, T); the head runs ``cfg.loss_chunk`` positions at a time (see GPT2Config)."""
        x_BTD, head_VD, _ = self.trunk(tokens_BT, positions_BT=positions_BT, dropout_key=dropout_key)
        def head(x_BcD):  # named as the unchunked head is: jaxlm.profiling sums the parts by scope
            with jax.named_scope("head"):
                return self._head(x_BcD, head_VD)

        with jax.named_scope("loss"):
            return layers.chunked_cross_entropy(head, x_BTD, targets_BT, self.cfg.loss_chunk)

    def trunk(self, tokens_BT, *, positions_BT=None, dropout_key=None, cache=None):
        """Everything before the head: (ln_f's output (B, T, D), the head's (V, D) table as it uses it,
        the updated cache or None)."""
        cfg = self.cfg
        if positions_BT is None:
            positions_BT = _positions(cfg, tokens_BT.shape[-1], cache)
        keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.n_layer + 1)  # blocks', embedding's
        # The token embedding is also the head (unless untied): lay it out once for both uses.
        wte_VD = constrain(self.wte.embedding[...], "vocab_table")
        head_VD = wte_VD if self.lm_head is None else constrain(self.lm_head.kernel[...].T, "vocab_table")
        with jax.named_scope("embed"):
            x_BTD = jnp.take(wte_VD.astype(self.policy.compute_dtype), tokens_BT, axis=0)
            if self.wpe is not None:
                x_BTD = x_BTD + self.wpe(positions_BT)
            if self.ln_embed is not None:
                x_BTD = self.ln_embed(x_BTD)
            x_BTD = layers.dropout(constrain(x_BTD, "residual"), cfg.embd_pdrop, None if keys is None else keys[-1])
        if self.collect_residuals:
            self.sow(layers.Residual, "residual", x_BTD)
        capture = layers.Stats if self.collect_stats else layers.Residual if self.collect_residuals else None
        rope = layers.rope_tables(positions_BT, cfg.head_dim, cfg.rope_base) if cfg.rope else None
        x_BTD, new_cache, sown = scan_lib.run(self.h, x_BTD, keys=None if keys is None else keys[:-1], cache=cache,
                                              remat=self._block_fn(cache, rope), capture=capture)
        if capture is not None:  # what the blocks sowed, stacked (n_layer, ...): see apply
            self.sow(capture, "layers", sown)
        return x_BTD if self.ln_f is None else self.ln_f(x_BTD), head_VD, new_cache

    def _block_fn(self, cache, rope):
        """Block.__call__ (given the rotary tables), rematerialised per model.remat when that can pay off."""
        call = Block.__call__ if rope is None else functools.partial(Block.__call__, rope=rope)
        policy = REMAT_POLICIES[self.cfg.remat]
        if policy is None or cache is not None or self.collect_stats or self.collect_residuals:
            return call
        return nnx.remat(call, policy=policy)

    def _head(self, x_BTD, head_VD):
        """Float32 logits against the head's table (the token table, tied; or lm_head's), soft-capped with
        model.logit_softcap; the table's padding rows masked."""
        cfg, compute = self.cfg, self.policy.compute_dtype
        logits_BTV = precision.einsum("btd,vd->btv", x_BTD.astype(compute), head_VD.astype(compute),
                                      out_dtype=precision.FP32, precision=self.policy.matmul_precision)
        logits_BTV = layers.softcap(constrain(logits_BTV, "logits"), cfg.logit_softcap)
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
    start = 0 if cache is None else scan_lib.cache_index(cache)
    return start + jnp.arange(T)[None, :]


# --- the functional interface: split once, jit over plain state -------------------------------

def create(cfg: GPT2Config, policy: precision.Policy, seed: int | jax.Array = 0):
    """Initialise GPT-2 as GPT-2/Mistral do; returns (graphdef, params) for ``apply``.

    `params` is a plain nested dict of arrays (``params["h"][0]["attn"]["c_attn"]["kernel"]``; with
    model.scan_layers ``params["h"]["attn"]["c_attn"]["kernel"]`` of all layers stacked, the same
    numbers), which optax, Orbax and the sharding rules take as is (``param_axes`` gives each one's
    logical axes; ``per_layer`` the loop's layout).
    """
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    graphdef, state = nnx.split(GPT2(cfg, policy, rngs=nnx.Rngs(params=key)))
    return graphdef, nnx.to_pure_dict(state)


def abstract(cfg: GPT2Config, policy: precision.Policy):
    """(graphdef, params as ShapeDtypeStructs) without allocating anything."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT2(cfg, policy, rngs=nnx.Rngs(0))))
    return graphdef, nnx.to_pure_dict(state)


def per_layer(params):
    """`params` (or any pytree holding parameter dicts) in the loop's layout, 'h.0.attn...' (a no-op
    if they are): the names Hugging Face and the loop's checkpoints use."""
    return scan_lib.to_layout(params, stacked=False)


def layout_for(cfg: GPT2Config, params):
    """`params` of either layout in the one `cfg` runs (model.scan_layers)."""
    return scan_lib.to_layout(params, stacked=cfg.scan_layers)


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
        out, sown = nnx.capture(model, layers.Residual)(tokens_BT, **kwargs)
        sown = nnx.to_pure_dict(sown)  # the embedding's, and the blocks' stacked (each sown once)
        return out, jnp.concatenate([sown["residual"][0][None], sown["layers"][0]["residual"][0]])
    if not collect_stats:
        return model(tokens_BT, **kwargs)
    model.set_attributes(collect_stats=True)
    out, sown = nnx.capture(model, layers.Stats)(tokens_BT, **kwargs)
    logits_BTV = out[0] if isinstance(out, tuple) else out
    stats = layers.collected_stats(nnx.to_pure_dict(sown), logits_BTV, model.cfg.vocab_size, model.policy.fp8_matmuls)
    return out, stats


def token_losses(graphdef, params, tokens_BT, targets_BT, **kwargs):
    """(cross-entropy, log Z), float32 (B, T): what training, validation and evaluation score, without
    the full logits (``GPT2.token_losses``); pure, so it jits. `kwargs` as ``GPT2.__call__``'s."""
    model = nnx.merge(graphdef, params)
    if not isinstance(tokens_BT, jax.core.Tracer):
        check_token_ids(tokens_BT, model.cfg.vocab_size)
    return model.token_losses(tokens_BT, targets_BT, **kwargs)


def empty_cache(cfg: GPT2Config, batch: int, dtype):
    """A KV cache for ``GPT2.__call__``: per layer, room for n_positions keys and values, none filled
    (a tuple of per-layer caches, or with model.scan_layers one stacked cache)."""
    return scan_lib.empty_cache(batch, cfg.n_positions, cfg.n_head, cfg.head_dim, dtype, cfg.n_layer,
                                stacked=cfg.scan_layers)


def param_axes(name: str) -> tuple[str, ...]:
    """Logical axes of the parameter `name` ('h.3.attn.c_attn.kernel'; a prefix such as 'params.' or
    an optimizer moment's path is ignored), as its module declared them; a stacked block's parameter
    ('h.attn.c_attn.kernel', model.scan_layers) has the 'layers' axis first. KeyError if there is none."""
    given = name.split(".")
    declared = _declared_axes()
    for i, part in enumerate(given):
        axes = declared.get(".".join(p for p in given[i:] if not p.isdigit()))
        if axes is not None:
            stacked = part == "h" and not given[i + 1].isdigit()
            return ("layers", *axes) if stacked else axes
    raise KeyError(name)


@functools.cache
def _declared_axes() -> dict[str, tuple[str, ...]]:
    """{'h.attn.c_attn.kernel': axes, ...}: layer numbers left out, as the axes are the same in every
    layer and every size (read off a small abstract model with every optional parameter present)."""
    probe = GPT2Config(vocab_size=8, n_positions=8, n_embd=8, n_layer=1, n_head=2, attention_impl="reference",
                       qk_norm=True, ln_embed=True, tie_word_embeddings=False)
    _, state = nnx.split(nnx.eval_shape(lambda: GPT2(probe, precision.policy(), rngs=nnx.Rngs(0))))
    variables = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return {".".join(p for p in naming.param_name(path).split(".") if not p.isdigit()): v.get_metadata()["out_sharding"]
            for path, v in variables}


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
