"""Configs: loading, overriding and validating them (the values live in ``jaxlm/configs/``; the schema,
every key with its default, is ``jaxlm/configs/base.py``).

Configs are ``ml_collections.ConfigDict``s used as designed: locked (an unknown key is an error that
suggests the nearest known one) and typed (a value of the wrong type is refused when it is set).
``validate`` adds what types cannot say (ranges, combinations) and runs before JAX compiles
anything, so a typo costs a second, not a queue slot. Each error names the field, what was found,
and what would fix it.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import traceback
import warnings
from pathlib import Path
from typing import Any

import ml_collections

from jaxlm import budget, config_rules, configs, precision, sharding
from jaxlm import model as model_lib
from jaxlm.config_rules import check_corpus, check_size, check_vocab, get_by_path  # noqa: F401  (config.X for the tools)
from jaxlm.configs import base
from jaxlm.errors import ConfigError, JaxlmError

# The jaxlm source tree (its git commit is recorded with every run).
SOURCE_ROOT = Path(__file__).resolve().parent.parent
# Where `configs/NAME.py` is found when it is not a path from the working directory.
CONFIGS_DIR = Path(configs.__file__).resolve().parent

# Config fields that never change a run's results; everything else must match on resume.
NEUTRAL_FIELDS = (
    "log.", "checkpoint.", "mesh.", "distributed.", "train.eval_every", "train.eval_batches", "train.seeds",
    "train.eval_sets", "train.stop_on_nonfinite", "data.prefetch", "data.workers", "data.cache_dir", "data.tfds_data_dir",
    "model.attention_impl", "model.remat", "model.loss_chunk", "train.deterministic", "data.remote_reads",
    "model.scan_layers",  # the same function; a checkpoint of the other layout restores through jaxlm.scan
)
# What a field meant in configs saved before it existed, where that differs from its default.
# Any other field absent from a saved config reads as its default (a new field's default must
# reproduce the behaviour from before it existed, or be listed here).
ABSENT_MEANS: dict[str, Any] = {
    "model.vocab_multiple": 1,  # token tables were not padded
}


def schema() -> ml_collections.ConfigDict:
    """Every key jaxlm knows, with its default (``jaxlm/configs/base.py``), unlocked."""
    return base.get_config()


def resolve_path(path: str | os.PathLike) -> Path:
    """A config file: `path` itself, else the same relative path under the packaged ``jaxlm/configs/``
    (so ``--config=configs/tiny.py`` works from any directory)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_absolute() and p.parts and p.parts[0] == CONFIGS_DIR.name:
        packaged = CONFIGS_DIR.joinpath(*p.parts[1:])
        if packaged.is_file():
            return packaged
    known = ", ".join(sorted(f"configs/{f.name}" for f in CONFIGS_DIR.glob("[!_]*.py")))
    raise ConfigError(f"--config={path}: no such file (the packaged configs are {known})")


def read_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """A config file's ``get_config()``; a file that does not run (a syntax error, a NameError, ...) or
    has no ``get_config`` is one ConfigError naming the file and line."""
    path = resolve_path(path)
    spec = importlib.util.spec_from_file_location(f"_jaxlm_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        if not callable(get_config):
            raise ConfigError(f"{path}: defines no get_config(); a config file defines get_config() returning an "
                              "ml_collections.ConfigDict (e.g. configs/tiny.py; every key: jaxlm/configs/base.py)")
        cfg = get_config()
    except JaxlmError:
        raise
    except SyntaxError as e:  # the file itself, or a module it imports
        raise ConfigError(f"{e.filename}:{e.lineno}: {e.msg} (a Python syntax error in the config file)") from None
    except Exception as e:  # what running the file raised: where in it, and what
        frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename) == path]
        where = f"{path}:{frames[-1].lineno}" if frames else str(path)
        raise ConfigError(f"{where}: {type(e).__name__}: {one_line(e)} (running the config file)") from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned a {type(cfg).__name__}, not an ml_collections.ConfigDict")
    return cfg


def load(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
    """A config file's ``get_config()``, locked, with dotted overrides {'train.steps': 5}; validated."""
    cfg = read_file(path)
    cfg.lock()
    for key, value in (overrides or {}).items():
        set_by_path(cfg, key, value)
    note_explicit(cfg, overrides or {})
    validate(cfg)
    return cfg


def with_overrides(cfg: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """A validated copy of `cfg` with dotted overrides applied; `cfg` is untouched."""
    new = cfg.copy_and_resolve_references()
    new.lock()
    for key, value in overrides.items():
        set_by_path(new, key, value)
    note_explicit(new, overrides)
    validate(new)
    return new


def note_explicit(cfg: ml_collections.ConfigDict, keys) -> None:
    """What the user set explicitly (override keys) that a config file's value does not mean: under a
    budget an explicit train.steps is also the run's step cap (train.max_steps), unless that is set
    too. A step-based run has no cap to derive (its train.max_steps stays what the file says)."""
    budgeted = str(get_by_path(cfg, "train.budget", "none")).strip().lower() not in ("", "none")
    if budgeted and "train.steps" in keys and "train.max_steps" not in keys:
        cfg.train.max_steps = cfg.train.steps


def set_by_path(cfg: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """``cfg.<dotted> = value``, with ml_collections' key and type checks as ConfigErrors."""
    *parents, leaf = dotted.split(".")
    node = cfg
    try:
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)  # locked: an unknown key is refused, with ml_collections' suggestion
    except (AttributeError, KeyError) as e:
        hint = one_line(e)
        hint = hint[hint.index("Did you mean"):] if "Did you mean" in hint else hint
        raise ConfigError(f"config.{dotted}: unknown key; {hint}") from None
    except TypeError as e:
        raise ConfigError(f"config.{dotted}={value!r}: {one_line(e)}") from None


def from_dict(saved: dict) -> ml_collections.ConfigDict:
    """The config a run saved (``config.to_dict``), over today's schema: fields it lacks read as
    ``ABSENT_MEANS`` or their default; fields the schema no longer has are dropped."""
    cfg = schema()
    current = flatten(cfg.to_dict())
    values = {**{k: v for k, v in ABSENT_MEANS.items() if k in current}, **flatten(saved)}
    with cfg.ignore_type():  # JSON gives lists for tuples and ints for whole floats
        for key, value in values.items():
            if key in current:
                *parents, leaf = key.split(".")
                node = cfg
                for p in parents:
                    node = node[p]
                node[leaf] = tuple(_tuples(value)) if isinstance(current[key], list) else value
    cfg.lock()
    return cfg


def _tuples(v):
    return [tuple(_tuples(x)) if isinstance(x, (list, tuple)) else x for x in v]


def _did_you_mean(name, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(options))}"


def one_line(e: BaseException) -> str:
    """An exception's message on one line (ml_collections' and KeyError's messages are quoted reprs)."""
    text = str(e.args[0]) if len(e.args) == 1 else str(e)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return " ".join(text.replace("\\n", " ").replace("\\'", "'").split())


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"section.key": value} of a nested dict (tuples as lists, as JSON gives them back)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = _lists(v)
    return out


def _lists(v):
    return [_lists(x) for x in v] if isinstance(v, (list, tuple)) else v


def config_differences(saved: dict, current: dict) -> list[str]:
    """'field: saved -> current' for every result-changing field of `current` that differs from
    `saved` (a field `saved` lacks reads as ``ABSENT_MEANS`` or today's default)."""
    a, b = flatten(saved), flatten(current)
    defaults = flatten(schema().to_dict())
    diffs = []
    no_budget = all(str(d.get("train.budget", "none")).strip().lower() in ("", "none") for d in (a, b))
    for k in sorted(b):
        if k.startswith(NEUTRAL_FIELDS) or (k == "train.max_steps" and no_budget):  # (only a budget reads it)
            continue
        va = a.get(k, ABSENT_MEANS.get(k, defaults.get(k, "<absent>")))
        if va != b[k]:
            diffs.append(f"{k}: {va!r} -> {b[k]!r}")
    return diffs


def _check_keys(cfg, schema_cfg, prefix=""):
    """Unknown keys of a config not built from the schema (locked configs cannot have any)."""
    for key in cfg.keys():
        if key not in schema_cfg:
            raise ConfigError(f"config.{prefix}{key}: unknown key{_did_you_mean(key, schema_cfg.keys())}")
        if isinstance(schema_cfg[key], ml_collections.ConfigDict):
            if not isinstance(cfg[key], ml_collections.ConfigDict):
                raise ConfigError(f"config.{prefix}{key}: must be a section, got {cfg[key]!r}")
            _check_keys(cfg[key], schema_cfg[key], f"{prefix}{key}.")


def validate(cfg: ml_collections.ConfigDict, *, backend: str | None = None, vocab_size: int | None = None) -> None:
    """Raises ConfigError naming the field for anything that cannot work, in the shape of every config
    error (``--config.KEY=VALUE: what is wrong; what to do``); warns for what is risky."""
    try:
        _validate(cfg, backend=backend, vocab_size=vocab_size)
    except ConfigError as e:
        raise ConfigError(as_override(cfg, one_line(e))) from None


MISSING = object()  # get_by_path's default where a key must be told from a None value


def as_override(cfg, text: str) -> str:
    """A message that begins ``KEY: `` or ``KEY=VALUE: `` (KEY a field of `cfg`, VALUE its value) begun
    as the override that sets it, ``--config.KEY=VALUE: ``; any other message as it is."""
    m = re.match(r"(?:config\.)?([a-z_]+(?:\.[a-z_0-9]+)+)[=:]", text)
    value = get_by_path(cfg, m.group(1), MISSING) if m else MISSING
    if value is MISSING or isinstance(value, ml_collections.ConfigDict):
        return text
    key, shown = m.group(1), value if isinstance(value, str) else repr(value)
    for head in (f"{key}={value!r}: ", f"{key}={value}: ", f"{key}: "):
        if text.startswith(head) or text.startswith("config." + head):
            return f"--config.{key}={shown}: {text.split(head, 1)[1]}"
    return text


def unknown_key(dotted: str) -> str:
    """The message for a --config override of a key the schema lacks, with the closest key's name."""
    section = schema()
    for part in dotted.split("."):
        if not isinstance(section, ml_collections.ConfigDict) or part not in section:
            break
        section = section[part]
    options = section.keys() if isinstance(section, ml_collections.ConfigDict) else ()
    return f"unknown config key {part!r}{_did_you_mean(part, options) if options else ''}"


def _validate(cfg, *, backend, vocab_size) -> None:
    _check_keys(cfg, schema())
    config_rules.check_ranges(cfg)
    model_config(cfg, vocab_size=vocab_size or cfg.model.vocab_size or cfg.data.vocab_size)
    pol = policy(cfg)
    t = cfg.train
    if t.seq_len > cfg.model.n_positions:
        raise ConfigError(
            f"train.seq_len={t.seq_len} exceeds model.n_positions={cfg.model.n_positions}; "
            "lower train.seq_len or raise model.n_positions"
        )
    if t.micro_batch_size and t.batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.micro_batch_size={t.micro_batch_size} does not divide train.batch_size={t.batch_size}"
        )
    for k in sharding.AXES:
        v = cfg.mesh[k]
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{k}: a positive size or -1 (the rest), got {v}")
    if sum(cfg.mesh[k] == -1 for k in sharding.AXES) > 1:
        raise ConfigError(f"mesh: at most one of {'/'.join(sharding.AXES)} may be -1")
    if cfg.optim.schedule not in budget.BUDGET_SCHEDULES:
        raise ConfigError(f"optim.schedule: unknown {cfg.optim.schedule!r}; allowed: linear, cosine, constant "
                          "(and by budget fraction, with train.budget: triangle, wsd)")
    budget.validate(cfg)
    config_rules.check_choices(cfg)
    if budget.parse(cfg.train.budget) is not None and (cfg.optim.warmup != "linear" or cfg.optim.deepspeed_lag):
        raise ConfigError("optim.warmup=log and optim.deepspeed_lag shape step-based schedules (Mistral's); under "
                          "train.budget the schedule is by budget fraction: set optim.warmup=linear and "
                          "optim.deepspeed_lag=False, or train.budget=none")
    _check_stages(cfg.checkpoint.stages)
    d = cfg.distributed
    if d.lost_after_s < 0 or d.heartbeat_timeout_s <= d.lost_after_s or d.shutdown_timeout_s <= 0 \
            or d.init_timeout_s <= 0:
        raise ConfigError(f"distributed: lost_after_s={d.lost_after_s} must be >= 0 (0 = off) and below "
                          f"heartbeat_timeout_s={d.heartbeat_timeout_s} (the backstop), shutdown_timeout_s="
                          f"{d.shutdown_timeout_s} and init_timeout_s={d.init_timeout_s} positive")
    if cfg.log.wandb_mode not in ("disabled", "offline", "online"):
        raise ConfigError(f"log.wandb_mode: unknown {cfg.log.wandb_mode!r}; allowed: disabled, offline, online")
    for key in cfg.log.wandb_keys:
        if get_by_path(cfg, key, None) is None:
            raise ConfigError(f"log.wandb_keys: {key!r} is not a config key (e.g. 'optim.lr')")
    config_rules.check_val_source(cfg)
    if cfg.data.on_missing_field not in ("fail", "skip"):
        raise ConfigError(f"data.on_missing_field: allowed: fail, skip; got {cfg.data.on_missing_field!r}")
    for name, allowed in (("token_format", ("auto", "llmc", "raw")), ("remote_reads", ("auto", "stream", "download"))):
        if cfg.data.get(name, allowed[0]) not in allowed:
            raise ConfigError(f"data.{name}: allowed: {', '.join(allowed)}; got {cfg.data.get(name)!r}")
    if backend == "tpu" and pol.is_fp16:
        warnings.warn(
            f"precision.regime={cfg.precision.regime!r} uses fp16 on a TPU, which has no fast fp16 path; "
            "bf16 is the TPU-native regime (run it anyway for the ablation if that is the point)",
            stacklevel=2,
        )


def _check_stages(stages) -> None:
    """checkpoint.stages: (every, until) pairs of positive integers, `until` increasing."""
    example = "e.g. ((10, 100), (50, 2000)): every 10 steps until 100, then every 50 until 2000"
    prev = 0
    for stage in stages:
        if (not isinstance(stage, (tuple, list)) or len(stage) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in stage)):
            raise ConfigError(f"checkpoint.stages={tuple(stages)!r}: each stage is (every, until), two positive "
                              f"integers; {example}")
        if stage[1] <= prev:
            raise ConfigError(f"checkpoint.stages={tuple(stages)!r}: the stages' `until` must increase; {example}")
        prev = stage[1]


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
    flags = os.environ.get("XLA_FLAGS", "")
    if cfg.train.deterministic and "xla_gpu_deterministic_ops" not in flags:
        flags = (flags + " --xla_gpu_deterministic_ops=true").strip()
    os.environ["XLA_FLAGS"] = flags
    return flags


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
    """A JSON-able plain dict of the resolved config (tuples become lists)."""
    return cfg.to_dict()

