"""Validating and interpreting configs (the values live in ``configs/``; the schema is ``configs/base.py``).

Everything here runs before JAX compiles anything, so a typo costs a second, not a queue slot.
Each error names the field, what was found, and what would fix it.
"""

from __future__ import annotations

import difflib
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any

import ml_collections

from jaxlm import model as model_lib
from jaxlm import precision
from jaxlm.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


def _schema() -> ml_collections.ConfigDict:
    if str(REPO_ROOT) not in sys.path:  # configs/ is importable from a source checkout anywhere
        sys.path.insert(0, str(REPO_ROOT))
    from configs import base

    return base.get_config()


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
    """Loads a config file's get_config() and applies dotted overrides {'train.steps': 5}; validated."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--config: no such file {path}")
    spec = importlib.util.spec_from_file_location(f"_jaxlm_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    for key, value in (overrides or {}).items():
        set_by_path(cfg, key, value)
    validate(cfg)
    return cfg


def with_overrides(cfg: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """A validated copy of `cfg` with dotted overrides applied; `cfg` is untouched."""
    new = cfg.copy_and_resolve_references()
    for key, value in overrides.items():
        set_by_path(new, key, value)
    validate(new)
    return new


def set_by_path(cfg: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        if p not in node:
            raise ConfigError(f"config.{dotted}: unknown section {p!r}{_did_you_mean(p, node.keys())}")
        node = node[p]
    if leaf not in node:
        raise ConfigError(f"config.{dotted}: unknown key{_did_you_mean(leaf, node.keys())}")
    with node.ignore_type():
        node[leaf] = value


def _did_you_mean(name, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(options))}"


def _check_schema(cfg, schema, prefix=""):
    for key in cfg.keys():
        field = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(f"config.{field}: unknown key{_did_you_mean(key, schema.keys())}")
        value, want = cfg[key], schema[key]
        if isinstance(want, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"config.{field}: must be a section, got {value!r}")
            _check_schema(value, want, field + ".")
        elif isinstance(want, bool) != isinstance(value, bool) or (
            isinstance(want, (int, float)) and not isinstance(value, (int, float))
        ) or (isinstance(want, str) and not isinstance(value, str)):
            raise ConfigError(
                f"config.{field}: expected {type(want).__name__} (like the default {want!r}), got {value!r}"
            )
        elif isinstance(want, int) and not isinstance(want, bool) and isinstance(value, float):
            if not float(value).is_integer():
                raise ConfigError(f"config.{field}: expected an integer, got {value!r}")


def validate(cfg: ml_collections.ConfigDict, *, backend: str | None = None, vocab_size: int | None = None) -> None:
    """Raises ConfigError naming the field for anything that cannot work; warns for what is risky."""
    _check_schema(cfg, _schema())
    model_config(cfg, vocab_size=vocab_size or cfg.model.vocab_size or cfg.data.vocab_size)
    pol = policy(cfg)
    t = cfg.train
    if t.seq_len > cfg.model.n_positions:
        raise ConfigError(
            f"train.seq_len={t.seq_len} exceeds model.n_positions={cfg.model.n_positions}; "
            "lower train.seq_len or raise model.n_positions"
        )
    for f in ("steps", "batch_size", "seq_len"):
        if t[f] <= 0:
            raise ConfigError(f"train.{f}: must be positive, got {t[f]}")
    if t.micro_batch_size and t.batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.micro_batch_size={t.micro_batch_size} does not divide train.batch_size={t.batch_size}"
        )
    for k in ("data", "fsdp", "tensor"):
        v = cfg.mesh[k]
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{k}: a positive size or -1 (the rest), got {v}")
    if sum(cfg.mesh[k] == -1 for k in ("data", "fsdp", "tensor")) > 1:
        raise ConfigError("mesh: at most one of data/fsdp/tensor may be -1")
    if cfg.optim.schedule not in ("linear", "cosine", "constant"):
        raise ConfigError(f"optim.schedule: unknown {cfg.optim.schedule!r}; allowed: linear, cosine, constant")
    if cfg.optim.warmup_steps < 0 or cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0 and optim.warmup_steps >= 0, got {cfg.optim.lr}, {cfg.optim.warmup_steps}")
    if cfg.log.wandb_mode not in ("disabled", "offline", "online"):
        raise ConfigError(f"log.wandb_mode: unknown {cfg.log.wandb_mode!r}; allowed: disabled, offline, online")
    if cfg.log.every <= 0:
        raise ConfigError(f"log.every: must be positive, got {cfg.log.every}")
    if cfg.data.on_missing_field not in ("fail", "skip"):
        raise ConfigError(f"data.on_missing_field: allowed: fail, skip; got {cfg.data.on_missing_field!r}")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {cfg.data.val_fraction}")
    if backend == "tpu" and pol.is_fp16:
        warnings.warn(
            f"precision.regime={cfg.precision.regime!r} uses fp16 on a TPU, which has no fast fp16 path; "
            "bf16 is the TPU-native regime (run it anyway for the ablation if that is the point)",
            stacklevel=2,
        )


def model_config(cfg: ml_collections.ConfigDict, vocab_size: int | None = None) -> model_lib.GPT2Config:
    """The typed model config; `vocab_size` fills model.vocab_size=0 (the tokenizer's size)."""
    m = dict(cfg.model)
    if not m["vocab_size"]:
        m["vocab_size"] = vocab_size or cfg.data.vocab_size
    return model_lib.GPT2Config(**m)


def policy(cfg: ml_collections.ConfigDict) -> precision.Policy:
    p = cfg.precision
    return precision.policy(
        p.regime,
        param_dtype=p.param_dtype or None,
        compute_dtype=p.compute_dtype or None,
        attn_dtype=p.attn_dtype or None,
    )


def set_xla_flags(cfg: ml_collections.ConfigDict) -> str:
    """Puts the XLA flags the config asks for into $XLA_FLAGS; returns them. Call it before JAX's
    backend starts (XLA reads the variable once, at its first use): train.deterministic adds
    --xla_gpu_deterministic_ops=true (no atomics in GPU reductions and scatters)."""
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    if cfg.train.deterministic and "xla_gpu_deterministic_ops" not in flags:
        flags = (flags + " --xla_gpu_deterministic_ops=true").strip()
    os.environ["XLA_FLAGS"] = flags
    return flags


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
    """A JSON-able plain dict of the resolved config (tuples become lists)."""
    return cfg.to_dict()
