"""The rules a config's values obey beyond their types, as tables: every numeric field's range
(``RANGES``), the fields with a fixed set of values (``CHOICES``); a corpus and tokenizer named before
a run (``check_corpus``); a model that fits its devices and its tokenizer (``check_size``,
``check_vocab``). ``jaxlm.config.validate`` applies the tables before anything compiles.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from jaxlm.errors import ConfigError
from jaxlm.model_config import approx_params

# Every form of a single data source (data.source's errors and the CLIs' help list them from here: the
# readers are jaxlm/data/sources.py's), its kinds' names, and a mixture of them (data.source only).
SOURCE_FORMS = ("stdlib, files:GLOB, jsonl:GLOB, tfds:NAME[:SPLIT], parquet:GLOB, hf:DIR (a datasets directory), "
                "tokens:GLOB (token shards), tokens:DIR (nanoGPT's train.bin + val.bin [+ meta.pkl])")
SOURCE_NAMES = tuple(dict.fromkeys(k.split(":")[0].split()[0] for k in SOURCE_FORMS.split(", ")))
# Fields with a fixed set of values (the first is the schema's default).
CHOICES: dict[str, tuple[str, ...]] = {
    "optim.warmup": ("linear", "log"),
    "optim.decay_mask": ("matrices", "all"),
    "train.budget_clock": ("wall", "process"),
}
# Every numeric field's range, checked in one place before anything else (NaN and infinities never pass):
# "> x", ">= x", or an interval "[a, b)", "(a, b]", "[a, b]". tests/test_config_ranges.py checks that every
# numeric field of the schema is here.
RANGES: dict[str, str] = {
    "model.n_layer": ">= 1", "model.n_embd": ">= 1", "model.n_head": ">= 1", "model.n_positions": ">= 1",
    "model.vocab_size": ">= 0", "model.vocab_multiple": ">= 1", "model.loss_chunk": ">= 0",
    "model.embd_pdrop": "[0, 1)", "model.attn_pdrop": "[0, 1)", "model.resid_pdrop": "[0, 1)",
    "model.layer_norm_epsilon": "> 0", "model.initializer_range": "> 0", "model.attn_logit_softcap": ">= 0",
    "model.z_loss": ">= 0", "model.rope_base": "> 1", "model.logit_softcap": ">= 0",
    "precision.loss_scale_init": ">= 1", "precision.loss_scale_window": ">= 1",
    "precision.loss_scale_hysteresis": ">= 1", "precision.loss_scale_min": "> 0",
    "train.steps": ">= 1", "train.batch_size": ">= 1", "train.micro_batch_size": ">= 0", "train.seq_len": ">= 1",
    "train.seed": ">= 0", "train.eval_every": ">= 0", "train.eval_batches": ">= 0", "train.max_steps": ">= 0",
    "train.batch_ramp": "[0, 1]",
    "data.seed": ">= -1", "data.val_fraction": "[0, 1)", "data.vocab_size": ">= 1", "data.tokenizer_max_docs": ">= 1",
    "data.tokenizer_max_chars": ">= 1", "data.max_docs": ">= 0", "data.prefetch": ">= 0", "data.workers": ">= 0",
    "optim.lr": "> 0", "optim.b1": "[0, 1)", "optim.b2": "[0, 1)", "optim.eps": "> 0", "optim.weight_decay": ">= 0",
    "optim.clip_norm": ">= 0", "optim.warmup_steps": ">= 0", "optim.final_lr_ratio": "[0, 1]",
    "optim.budget_peak": "[0, 1)", "optim.budget_decay": "(0, 1]", "optim.muon_lr": "> 0",
    "optim.muon_momentum": "[0, 1)",
    "mesh.data": ">= -1", "mesh.fsdp": ">= -1", "mesh.tensor": ">= -1",
    "checkpoint.keep": ">= 0", "checkpoint.keep_every": ">= 0", "checkpoint.latest_every_minutes": ">= 0",
    "distributed.lost_after_s": ">= 0", "distributed.heartbeat_timeout_s": "> 0",
    "distributed.shutdown_timeout_s": "> 0", "distributed.init_timeout_s": "> 0",
    "log.every": ">= 1", "log.stats_every": ">= 0", "log.profile_steps": ">= 0", "log.profile_start": ">= 0",
    "log.peak_tflops": ">= 0",
}
# Where a config names no corpus or tokenizer: what to set (one error line, before anything runs).
GPT2_TOKENIZER = "hf:DIR, a directory with GPT-2's vocab.json and merges.txt (or its tokenizer.json)"
REPRODUCE = "the README's \"Reproduce Mistral's numbers\" shows the commands"


def in_range(value, spec: str) -> bool:
    """Whether a number lies in a RANGES spec ("> 0", ">= -1", "[0, 1)", ...); never for NaN or infinities."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if spec.startswith((">=", ">")):
        bound = float(spec.lstrip(">= "))
        return value >= bound if spec.startswith(">=") else value > bound
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    return (value >= lo if spec[0] == "[" else value > lo) and (value <= hi if spec[-1] == "]" else value < hi)


def check_ranges(cfg) -> None:
    for key, spec in RANGES.items():
        value = get_by_path(cfg, key)
        if value is not None and not in_range(value, spec):
            what = "a finite number" if isinstance(value, float) and not math.isfinite(value) else "a number"
            allowed = f"in {spec}" if spec[0] in "[(" else spec
            raise ConfigError(f"{key}={value!r}: must be {what} {allowed}")


def check_choices(cfg) -> None:
    for key, allowed in CHOICES.items():
        value = get_by_path(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}: unknown {value!r}; allowed: {', '.join(allowed)}")


def check_corpus(cfg) -> None:
    """Before training or building a cache (not for a model's shape, as the benches read it): a config
    that names no corpus (data.source='') or trains no tokenizer and names none (data.tokenizer_kind=
    'none': the gpt2_* configs, whose tokenizer is GPT-2's) is one error line saying what to set."""
    d, missing = cfg.data, []
    if not str(d.source).strip():
        missing.append(f"--config.data.source=SPEC (your corpus: {SOURCE_FORMS})")
    if not d.tokenizer and d.tokenizer_kind == "none":
        missing.append(f"--config.data.tokenizer={GPT2_TOKENIZER}")
    if missing:
        what = "no corpus" if len(missing) == 1 and "source" in missing[0] else (
            "no tokenizer" if len(missing) == 1 else "no corpus and no tokenizer")
        raise ConfigError(f"this config names {what}: set {' and '.join(missing)}; {REPRODUCE}")


def check_val_source(cfg) -> None:
    """data.val_source: '' or a source spec (not a mixture, not data.source itself), for a source that
    is not a mixture (whose components hold out their own validation splits)."""
    v, source = str(cfg.data.get("val_source", "")).strip(), str(cfg.data.source).strip()
    if not v:
        return
    kind, _, rest = v.partition(":")
    if kind not in SOURCE_NAMES or bool(rest) == (kind == "stdlib"):
        raise ConfigError(f"data.val_source={v!r}: not a source spec; give one of {SOURCE_FORMS}, or '' to hold out "
                          "data.val_fraction")
    if v == source:
        raise ConfigError(f"data.val_source={v!r}: it is data.source, so the model would be evaluated on its training "
                          "text; name another corpus, or '' to hold out data.val_fraction")
    if source.startswith("mix:"):
        raise ConfigError(f"data.val_source={v!r}: data.source is a mixture, whose components hold out their own "
                          "validation splits (data.val_fraction); set data.val_source='' or train on one source")


def get_by_path(cfg: ml_collections.ConfigDict, dotted: str, default: Any = None) -> Any:
    """``cfg.<dotted>``, or `default` where a part of the path does not exist."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return default
        node = node[part]
    return node


# What training holds per parameter: fp32 master weights, AdamW's two moments and the gradients.
BYTES_PER_PARAM = 16


def check_size(cfg, vocab_size: int, memory_bytes: float, where: str) -> None:
    """Before a model is built: refuses one whose parameters and optimizer state alone exceed the
    devices' memory (activations not counted), which would otherwise take minutes to fail."""
    m = {k: cfg.model[k] for k in ("n_layer", "n_embd", "n_positions")}
    vocab = cfg.model.vocab_size or vocab_size
    n = approx_params(vocab=vocab, **m)
    need = n * BYTES_PER_PARAM
    if need > memory_bytes:
        raise ConfigError(
            f"model.n_layer={m['n_layer']}, model.n_embd={m['n_embd']} (vocabulary {vocab}): about {n:.3g} parameters, "
            f"whose weights and AdamW state alone need {need / 2**30:,.1f} GiB, more than the {memory_bytes / 2**30:,.1f} "
            f"GiB of {where}; choose a smaller model or more devices (mesh.fsdp shards it)")


def check_vocab(cfg, vocab_size: int, tokenizer: str) -> None:
    """model.vocab_size, when set, must hold every id of the tokenizer."""
    if cfg.model.vocab_size and cfg.model.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary of "
                          f"{vocab_size} ({tokenizer}): its ids up to {vocab_size - 1} would index past the token "
                          f"table; set model.vocab_size=0 (the tokenizer's) or at least {vocab_size}")
