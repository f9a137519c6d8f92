"""Hugging Face GPT-2 interop, both directions, without importing torch or transformers.

    cfg, policy, graphdef, params = hf.load_pretrained("path/to/hf_dir", regime="fp16")
    hf.save_pretrained("out_dir", cfg, policy, params)   # transformers.GPT2LMHeadModel loads it

A checkpoint from elsewhere is untrusted input: safetensors is read by preference; a PyTorch
``pytorch_model.bin`` only through ``torch.load(weights_only=True)`` (torch must be installed for
that; it is never a plain pickle load). Names and shapes are checked tensor by tensor.

The two HF attention flags map as follows:
* ``scale_attn_by_inverse_layer_idx`` -> ``GPT2Config.scale_attn_by_inverse_layer_idx`` (same semantics);
* ``reorder_and_upcast_attn`` -> the precision policy: a low-precision regime becomes its
  ``*_upcast`` variant (fp32 scores). On export it is set when the policy upcasts the scores.
  Note: recent transformers honours ``reorder_and_upcast_attn`` only with
  ``attn_implementation="eager"``.

A config.json written before transformers had the two flags (Mistral trained with 4.5, so its released
runs' configs lack them) is read as transformers reads it, both False (OpenAI's GPT-2), with one
warning: Mistral's models need both True (``ATTENTION_PRESETS["mistral"]``; ``jaxlm.hf_import
--attn_flags=mistral`` sets them, ``attention_flags`` decides).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as save_safetensors

from jaxlm import files, naming, precision
from jaxlm import model as model_lib
from jaxlm.errors import CheckpointError, ConfigError

TOKEN_TABLE = "wte.embedding"  # (padded_vocab_size, D) here, (vocab_size, D) in HF
# jaxlm flat name -> HF name (after the "transformer." prefix); {i} is the layer.
_GLOBAL = {
    "wte.embedding": "wte.weight",
    "wpe.embedding": "wpe.weight",
    "ln_f.scale": "ln_f.weight",
    "ln_f.bias": "ln_f.bias",
}
_PER_LAYER = {
    "ln_1.scale": "ln_1.weight", "ln_1.bias": "ln_1.bias",
    "attn.c_attn.kernel": "attn.c_attn.weight", "attn.c_attn.bias": "attn.c_attn.bias",
    "attn.c_proj.kernel": "attn.c_proj.weight", "attn.c_proj.bias": "attn.c_proj.bias",
    "ln_2.scale": "ln_2.weight", "ln_2.bias": "ln_2.bias",
    "mlp.c_fc.kernel": "mlp.c_fc.weight", "mlp.c_fc.bias": "mlp.c_fc.bias",
    "mlp.c_proj.kernel": "mlp.c_proj.weight", "mlp.c_proj.bias": "mlp.c_proj.bias",
}
# HF's fused QKV output is one flat axis of 3·n_embd (q | k | v, heads in order within each);
# jaxlm keeps it as (3, n_head, head_dim) so tensor parallelism can shard heads. Same numbers, reshaped.
_FLAT_OUTPUT = ("attn.c_attn.kernel", "attn.c_attn.bias")
# HF buffers that are not parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def name_map(n_layer: int) -> dict[str, str]:
    """jaxlm flat parameter name -> HF GPT2Model parameter name."""
    out = dict(_GLOBAL)
    for i in range(n_layer):
        out.update({f"h.{i}.{k}": f"h.{i}.{v}" for k, v in _PER_LAYER.items()})
    return out


def hf_shape(ours: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape HF stores jaxlm's parameter `ours` (of `shape`) in."""
    if ours.endswith(_FLAT_OUTPUT):
        return (shape[0], int(np.prod(shape[1:]))) if ours.endswith("kernel") else (int(np.prod(shape)),)
    return tuple(shape)


# --- config ---------------------------------------------------------------------------------

def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> model_lib.GPT2Config:
    def bad(field, found, want):
        raise CheckpointError(f"{source}: {field}={found!r} is not supported by jaxlm's GPT-2 (needs {want})")

    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        bad("activation_function", hf.get("activation_function"), "'gelu_new'")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        bad("n_inner", hf.get("n_inner"), f"None or 4*n_embd={4 * hf['n_embd']}")
    if not hf.get("scale_attn_weights", True):
        bad("scale_attn_weights", False, "True")
    if hf.get("add_cross_attention", False):
        bad("add_cross_attention", True, "False")
    return model_lib.GPT2Config(
        vocab_size=hf["vocab_size"],
        n_positions=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_embd=hf["n_embd"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        embd_pdrop=hf.get("embd_pdrop", 0.1),
        attn_pdrop=hf.get("attn_pdrop", 0.1),
        resid_pdrop=hf.get("resid_pdrop", 0.1),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        initializer_range=hf.get("initializer_range", 0.02),
        scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
    )


def check_exportable(cfg: model_lib.GPT2Config) -> None:
    """Fails naming the switches that make the model a function HF's GPT2LMHeadModel cannot compute."""
    not_gpt2 = unexportable(cfg)
    if not_gpt2:
        raise CheckpointError(f"this model cannot be exported as a Hugging Face GPT-2: {'; '.join(not_gpt2)}; "
                              "keep the checkpoint in jaxlm's format")


def config_to_hf(cfg: model_lib.GPT2Config, policy: precision.Policy,
                 eos_token_id: int | None = None) -> dict[str, Any]:
    check_exportable(cfg)
    eos = cfg.vocab_size - 1 if eos_token_id is None else eos_token_id
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_positions,
        "n_ctx": cfg.n_positions,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "embd_pdrop": cfg.embd_pdrop,
        "attn_pdrop": cfg.attn_pdrop,
        "resid_pdrop": cfg.resid_pdrop,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "initializer_range": cfg.initializer_range,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx,
        "reorder_and_upcast_attn": policy.upcasts_attention,
        "tie_word_embeddings": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }


ATTENTION_FLAGS = ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn")
# --attn_flags of jaxlm.hf_import: Mistral's released runs trained with both (its stability fix); OpenAI's with neither
ATTENTION_PRESETS = {"mistral": dict.fromkeys(ATTENTION_FLAGS, True), "gpt2": dict.fromkeys(ATTENTION_FLAGS, False)}
# how to decide the flags where a model is loaded for eval/probe/harness --hf, which take no flag for them
LOADER_FIX = ("add both to its config.json (true for a Mistral model, false for OpenAI's GPT-2), or import it with "
              "python -m jaxlm.hf_import --attn_flags=mistral|gpt2 and use the run (--workdir)")


def attention_flags(hf: dict[str, Any], preset: str | None = None, *, source: str = "config.json",
                    fix: str = LOADER_FIX) -> dict[str, bool]:
    """The two HF attention flags of a model: `preset`'s ('mistral' | 'gpt2') if given, else config.json's.
    A flag config.json lacks is read as False, as transformers reads it, with one warning naming the
    flags and `fix`, how to decide them: never a silent guess."""
    if preset:
        if preset not in ATTENTION_PRESETS:
            raise ConfigError(f"--attn_flags={preset!r}: unknown; one of {', '.join(ATTENTION_PRESETS)} (mistral: "
                              f"{' and '.join(ATTENTION_FLAGS)} True; gpt2: both False)")
        return dict(ATTENTION_PRESETS[preset])
    missing = [f for f in ATTENTION_FLAGS if f not in hf]
    if missing:  # warn_explicit: one line, without a source line under it
        warnings.warn_explicit(
            f"{source} has no {' / '.join(missing)} (written by a transformers older than these flags, as Mistral's "
            f"released runs were): read as False, OpenAI's GPT-2, the wrong function for a Mistral model; {fix}",
            UserWarning, "jaxlm.hf", 0)
    return {f: bool(hf.get(f, False)) for f in ATTENTION_FLAGS}


def policy_for(hf: dict[str, Any], regime: str = "fp32", **overrides) -> precision.Policy:
    """The policy for `regime`, upcast to fp32 scores if the HF model asks for reorder_and_upcast_attn."""
    if hf.get("reorder_and_upcast_attn") and not overrides.get("attn_dtype"):
        regime = precision.upcast_regime(regime)
    return precision.policy(regime, **overrides)


# --- weights --------------------------------------------------------------------------------

def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a Hugging Face model directory."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json; expected a Hugging Face GPT-2 model directory")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not JSON ({e}); a download cut short?") from None


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a Hugging Face model directory, as float32 arrays by HF name."""
    return _read_tensors(Path(path))


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    st = sorted(path.glob("model*.safetensors"))
    if st:
        out = {}
        for f in st:
            with safe_open(str(f), framework="flax") as fh:
                for k in fh.keys():
                    out[k] = np.asarray(fh.get_tensor(k).astype(jnp.float32))
        return out
    pt = path / "pytorch_model.bin"
    if pt.exists():
        try:
            import torch  # optional: only pytorch_model.bin files need it
        except ImportError as e:
            raise CheckpointError(
                f"{pt}: reading a PyTorch checkpoint needs torch (pip install torch), or convert it to "
                "model.safetensors first"
            ) from e
        state = torch.load(str(pt), map_location="cpu", weights_only=True)
        return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}
    raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin in this directory")


def params_from_hf(tensors: dict[str, np.ndarray], cfg: model_lib.GPT2Config, policy: precision.Policy,
                   source: str = "checkpoint"):
    """(graphdef, params) of jaxlm from HF tensors; fails naming any missing/unknown/mis-shaped tensor."""
    graphdef, abstract = model_lib.abstract(cfg, policy)
    abstract = model_lib.per_layer(abstract)  # HF's names are per layer; model.scan_layers stacks them below
    want = naming.flat(abstract)
    ours_by_hf = {v: k for k, v in name_map(cfg.n_layer).items()}
    found: dict[str, np.ndarray] = {}
    unknown = []
    for name, arr in tensors.items():
        short = name.removeprefix("transformer.")
        if short.endswith(_IGNORED_SUFFIXES):
            continue
        if short == "lm_head.weight":
            wte = tensors.get("transformer.wte.weight", tensors.get("wte.weight"))
            if wte is not None and not np.array_equal(arr, wte):
                raise CheckpointError(f"{source}: lm_head.weight differs from wte.weight; jaxlm ties the LM head "
                                      "to the token embedding and cannot load an untied head")
            continue
        if short not in ours_by_hf:
            unknown.append(name)
            continue
        ours = ours_by_hf[short]
        shape = want[ours].shape
        if ours == TOKEN_TABLE:  # HF's table has vocab_size rows; ours may have padding rows (zero)
            shape = (cfg.vocab_size, *shape[1:])
        expected = hf_shape(ours, shape)
        if tuple(arr.shape) != expected:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(arr.shape)}, the config implies {expected} (jaxlm {ours})"
            )
        found[ours] = np.pad(arr.reshape(shape), [(0, w - h) for w, h in zip(want[ours].shape, shape)])
    if unknown:
        raise CheckpointError(f"{source}: tensors jaxlm's GPT-2 does not have: {', '.join(sorted(unknown)[:10])}")
    missing = [f"{name_map(cfg.n_layer)[k]} (jaxlm {k})" for k in want if k not in found]
    if missing:
        raise CheckpointError(f"{source}: missing tensors: {', '.join(missing[:10])}")

    def fill(path, leaf):
        return jnp.asarray(found[naming.param_name(path)], dtype=leaf.dtype)

    return graphdef, model_lib.layout_for(cfg, jax.tree_util.tree_map_with_path(fill, abstract))


def load_pretrained(path: str | os.PathLike, regime: str = "fp32", **policy_overrides):
    """Loads a local HF GPT-2 directory; returns (GPT2Config, Policy, graphdef, params). A config.json
    without the attention flags warns once (``attention_flags``)."""
    path = Path(path)
    hf = read_config(path)
    hf = {**hf, **attention_flags(hf, source=str(path / "config.json"))}  # one warning where config.json lacks them
    cfg = config_from_hf(hf, str(path / "config.json"))
    policy = policy_for(hf, regime, **policy_overrides)
    graphdef, params = params_from_hf(_read_tensors(path), cfg, policy, source=str(path))
    return cfg, policy, graphdef, params


def unexportable(cfg: model_lib.GPT2Config) -> list[str]:
    """Why `cfg`'s function is not a Hugging Face GPT2LMHeadModel's (empty: it is). model.use_bias=False
    is exported, as zero biases: the same function; model.z_loss only changes training,
    query_key_layer_scaling only the arithmetic and model.zero_init_proj (or optim.muon) only the
    initialisation (the training): they export."""
    why = [f"model.{f}={getattr(cfg, f)!r} (GPT2LMHeadModel has no such option)"
           for f in ("qk_norm", "attn_logit_softcap", "logit_softcap") if getattr(cfg, f)]
    if cfg.rope:
        why.append("model.rope=True (HF GPT-2 adds learned positions, wpe; it has no rotary embeddings)")
    if not cfg.tie_word_embeddings:
        why.append("model.tie_word_embeddings=False (HF GPT-2's head is the token table)")
    if cfg.mlp_kind != "gelu":
        why.append(f"model.mlp_kind={cfg.mlp_kind!r} (HF GPT-2's MLP is gelu_new without a gate)")
    if cfg.ln_embed:
        why.append("model.ln_embed=True (HF GPT-2 has no LayerNorm on the embedding)")
    if not cfg.ln_final:
        why.append("model.ln_final=False (HF GPT-2 always applies ln_f)")
    return why


def save_pretrained(out_dir: str | os.PathLike, cfg: model_lib.GPT2Config, policy: precision.Policy,
                    params, eos_token_id: int | None = None) -> Path:
    """Writes config.json + model.safetensors that transformers.GPT2LMHeadModel.from_pretrained loads."""
    check_exportable(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = naming.flat(model_lib.per_layer(params))  # HF's names are per layer (model.scan_layers stacks them)
    tensors = {}
    for ours, hf_name in name_map(cfg.n_layer).items():
        if ours not in flat and ours.endswith(".bias") and not cfg.use_bias:  # model.use_bias=False: zero biases
            kernel = flat[ours[: -len("bias")] + "kernel"]
            flat[ours] = np.zeros(kernel.shape[1:], np.float32)
        arr = np.asarray(jax.device_get(flat[ours]), np.float32)
        if ours == TOKEN_TABLE:
            arr = arr[: cfg.vocab_size]  # without the padding rows (GPT2Config.vocab_multiple)
        tensors["transformer." + hf_name] = np.ascontiguousarray(arr.reshape(hf_shape(ours, arr.shape)))
    files.atomic_write(out / "model.safetensors", save_safetensors(tensors, metadata={"format": "pt"}))
    files.atomic_write_json(out / "config.json", config_to_hf(cfg, policy, eos_token_id), indent=2)
    return out
