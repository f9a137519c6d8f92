"""The model's shape and behaviour (``GPT2Config``), the sizes of the GPT-2 family and the per-block
rematerialisation policies: what a config's ``model`` section holds (configs/base.py copies its fields)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from jaxlm import attention as attn_lib
from jaxlm import precision
from jaxlm.errors import ConfigError


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
    # The blocks as one block of stacked parameters (leading n_layer axis) run by a scan (jaxlm.scan):
    # the program holds one block, so compile time does not grow with depth. The same function and
    # numbers as the Python loop over n_layer blocks; the stacked parameters are an internal layout
    # (HF export and checkpoints of the other layout convert at their boundary, jaxlm.scan).
    scan_layers: bool = False
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
    # --- the speedrun's switches (modded-nanogpt; configs/speedrun.py); the defaults are GPT-2's ------
    qk_norm_kind: str = "layernorm"  # model.qk_norm's norm: layernorm | rms (RMSNorm with a gain, modded-nanogpt's)
    rope: bool = False  # rotary position embeddings on q and k (jaxlm.layers.rope), no wpe; not HF-exportable
    rope_base: float = 10000.0  # RoPE's θ_j = rope_base^(-2j/head_dim)
    zero_init_proj: bool = False  # attn.c_proj and mlp.c_proj kernels start at zero: each block starts as the identity
    tie_word_embeddings: bool = True  # False: an own head lm_head (D, V), not the token table's transpose; not HF-exportable
    logit_softcap: float = 0.0  # c·tanh(logit/c) on the output logits (Gemma 2, modded-nanogpt); 0 = off

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
        if self.qk_norm_kind not in QK_NORM_KINDS:
            raise ConfigError(f"model.qk_norm_kind: unknown {self.qk_norm_kind!r}; allowed: {', '.join(QK_NORM_KINDS)}")
        if self.rope and self.head_dim % 2:
            raise ConfigError(f"model.rope rotates pairs of dims, but the head size n_embd/n_head={self.head_dim} is "
                              "odd; choose n_head so that n_embd/n_head is even, or model.rope=False")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat: unknown {self.remat!r}; allowed: {', '.join(REMAT_POLICIES)}")
        if not isinstance(self.loss_chunk, int) or isinstance(self.loss_chunk, bool) or self.loss_chunk < 0:
            raise ConfigError(f"model.loss_chunk: sequence positions per loss chunk, >= 0 (0 = no chunking); "
                              f"got {self.loss_chunk!r}")
        if isinstance(self.rope_base, bool) or not isinstance(self.rope_base, (int, float)) or not self.rope_base > 1:
            raise ConfigError(f"model.rope_base: RoPE's base, a number > 1 (e.g. 10000), got {self.rope_base!r}")
        for f in ("z_loss", "attn_logit_softcap", "logit_softcap"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ConfigError(f"model.{f}: a number >= 0 (0 = off), got {v!r}")
        for f in ("qk_norm", "scan_layers", "rope", "zero_init_proj", "tie_word_embeddings"):
            if not isinstance(getattr(self, f), bool):
                raise ConfigError(f"model.{f}: True or False, got {getattr(self, f)!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def proj_std(self) -> float:
        """The output projections' (attn and mlp c_proj) init: GPT-2's initializer_range/sqrt(2·n_layer), so the
        residual stream's variance does not grow with depth; 0 (zeros) with model.zero_init_proj, so each block
        starts as the identity and the residual stream as the embedding (modded-nanogpt)."""
        return 0.0 if self.zero_init_proj else self.initializer_range / math.sqrt(2 * self.n_layer)

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

MLP_KINDS = ("gelu", "gated_gelu", "relu2")  # jaxlm.layers.activation
QK_NORM_KINDS = ("layernorm", "rms")

# Sizes of the released GPT-2 family (vocab 50257, 1024 positions).
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=4),
    "small": dict(n_embd=768, n_layer=12, n_head=12),  # 124M
    "medium": dict(n_embd=1024, n_layer=24, n_head=16),  # 355M
    "large": dict(n_embd=1280, n_layer=36, n_head=20),  # 774M
    "xl": dict(n_embd=1600, n_layer=48, n_head=25),  # 1.5B
}


def resolve_args(cfg: GPT2Config, policy: precision.Policy) -> dict:
    return dict(impl=cfg.attention_impl, policy=policy, head_dim=cfg.head_dim,
                query_key_layer_scaling=cfg.query_key_layer_scaling, softcap=cfg.attn_logit_softcap)


def attention_implementations(cfg: GPT2Config, policy: precision.Policy) -> tuple[str, str | None]:
    """The attention implementation without attention dropout and with it, decided once per model.

    They differ where cuDNN serves evaluation and the flash kernel the training passes, which drop
    attention probabilities out. None: `attention_impl` forces an implementation that cannot run a
    pass with attention dropout (cuDNN).
    """
    plain = attn_lib.resolve_implementation(**resolve_args(cfg, policy), dropout=False)
    if cfg.attn_pdrop == 0:
        return plain, plain
    try:
        return plain, attn_lib.resolve_implementation(**resolve_args(cfg, policy), dropout=True)
    except ConfigError:
        return plain, None


def approx_params(*, n_layer: int, n_embd: int, n_positions: int, vocab: int) -> int:
    """GPT-2's parameter count from its shape alone (token and position tables, 12·d² + 13·d per block,
    the final LayerNorm), before anything is built: what a size check needs."""
    return vocab * n_embd + n_positions * n_embd + n_layer * (12 * n_embd**2 + 13 * n_embd) + 2 * n_embd


def count_params(params, cfg: GPT2Config | None = None) -> int:
    """Parameters of `params`; given its config, without the token table's padding rows."""
    padding = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd if cfg is not None else 0
    return sum(int(x.size) for x in jax.tree.leaves(params)) - padding
