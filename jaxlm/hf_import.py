"""Hugging Face GPT-2 checkpoints (a released run, e.g. Mistral's: one directory per step) as a read-only
jaxlm run: library and CLI.

    python -m jaxlm.hf_import --hf=DIR --workdir=RUN [--attn_flags=mistral|gpt2] [--tokenizer=hf:DIR]
        [--step=N] [--config=configs/gpt2_small.py --config.data.source=SPEC ...]

DIR is one Hugging Face GPT-2 directory (config.json + model.safetensors or pytorch_model.bin), a
directory of ``checkpoint-<step>/`` subdirectories (as ``huggingface-cli download REPO --revision
checkpoint-<step> --local-dir DIR/checkpoint-<step>`` leaves them) or a glob of such directories. RUN
becomes what ``eval``, ``probe``, ``harness``, ``generate`` and ``export --workdir`` read, unchanged:

* ``checkpoints/<step>/``: per step a checkpoint of the parameters alone, written by jaxlm's
  Checkpointer (Orbax, atomic) with the fingerprints a trained run's parameters have; its meta is
  marked ``checkpoint.PARAMS_ONLY``, so resuming training from it is one error;
* ``tokenizer/``: the model's tokenizer (the directory's own, or ``--tokenizer``), written through
  ``tokenizer_export``; the run's ``data.tokenizer`` names it;
* the token cache of ``data.source`` in that tokenizer (the machine's cache unless ``data.cache_dir``):
  the run's validation split (``eval`` without ``--data``) and the probe's texts;
* ``run.json``: the config (the model section from config.json, the rest from ``--config``, by default
  the schema's) and ``import``: each step's source directory, the attention flags and how they were
  decided, and config.json itself.

The attention flags (``scale_attn_by_inverse_layer_idx``, ``reorder_and_upcast_attn``): ``--attn_flags``
sets both (mistral: True, gpt2: False); without it config.json's are used, and a config.json that lacks
them (transformers 4.5 wrote none: Mistral's runs) warns once and reads them as False
(``hf.attention_flags``). ``reorder_and_upcast_attn`` is a precision matter in jaxlm: the regime
becomes its ``*_upcast`` variant (``hf.policy_for``; fp32 has nothing to upcast).

Steps are imported in order with a progress bar (stderr); a step already in RUN is never rewritten
(skipped and counted), so an import cut short, even by kill -9, completes when run again, identical
to one never interrupted. A rerun whose config, flags or tokenizer differ from RUN's is refused.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import re
import shutil
import sys
from pathlib import Path

import jax
import ml_collections
from absl import flags
from tqdm import tqdm

from jaxlm import checkpoint, cli, data, files, hf, lease, paths, precision, sharding, telemetry, train
from jaxlm import config as config_lib
from jaxlm.data import tokenizer as tok_lib
from jaxlm.data import tokenizer_export
from jaxlm.errors import CheckpointError, ConfigError

STEP_DIR = re.compile(r"checkpoint-(\d+)")
TOOL = "python -m jaxlm.hf_import"
FIX = ("pass --attn_flags=mistral for Mistral's runs (both True) or --attn_flags=gpt2 to confirm False (a new "
       "--workdir if this one was imported already)")
# Fields of the model section that config.json does not give and that keep HF's function: from --config.
# Every other field not in config.json keeps GPT2Config's default (GPT-2 as Hugging Face computes it).
IMPLEMENTATION = ("attention_impl", "remat", "scan_layers", "vocab_multiple", "loss_chunk", "query_key_layer_scaling",
                  "z_loss")


def find_sources(spec: str, step: int | None = None) -> list[tuple[int, Path]]:
    """(step, directory) of every checkpoint `spec` names, ordered by step: a model directory (its step
    from a ``checkpoint-<step>`` name, else `step`), a directory of ``checkpoint-<step>`` ones, or a glob."""
    if any(c in spec for c in "*?["):
        dirs = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_dir())
        if not dirs:
            raise ConfigError(f"--hf={spec}: the glob matches no directory")
    elif (Path(spec) / "config.json").is_file():
        dirs = [Path(spec)]
    elif Path(spec).is_dir():
        dirs = sorted(d for d in Path(spec).iterdir() if d.is_dir() and STEP_DIR.fullmatch(d.name))
        if not dirs:
            raise ConfigError(f"--hf={spec}: neither a Hugging Face model directory (config.json) nor a directory of "
                              "checkpoint-<step>/ ones")
    else:
        raise ConfigError(f"--hf={spec}: no such directory")
    if step is not None and len(dirs) > 1:
        raise ConfigError(f"--step={step} names the step of one model directory; --hf={spec} has {len(dirs)}, each "
                          "with its step in its name")
    out = {}
    for d in dirs:
        m = STEP_DIR.fullmatch(d.name)
        if m is None and step is None:
            raise ConfigError(f"{d}: its name gives no step (checkpoint-<step>); pass --step=N")
        s = step if step is not None else int(m.group(1))
        if s in out:
            raise ConfigError(f"--hf={spec}: step {s} twice ({out[s]} and {d})")
        if not (d / "config.json").is_file():
            raise CheckpointError(f"{d}: no config.json; a download cut short? (huggingface-cli download ... "
                                  "--local-dir resumes it)")
        out[s] = d
    return sorted(out.items())


def decide_flags(sources, preset: str | None) -> tuple[dict[str, bool], str, dict]:
    """(the attention flags, how they were decided, the first step's config.json) for a series: one
    warning at most, and every step's config.json must agree with the flags it states and the model."""
    configs = [(d, hf.read_config(d)) for _, d in sources]
    first_dir, first = configs[0]
    decided = hf.attention_flags(first, preset, source=str(first_dir / "config.json"), fix=FIX)
    how = (f"--attn_flags={preset}" if preset else "config.json" if all(f in first for f in hf.ATTENTION_FLAGS)
           else "absent from config.json: read as False (transformers' default), with a warning")
    model = hf.config_from_hf({**first, **decided}, str(first_dir / "config.json"))
    for d, c in configs:
        said = {f: bool(c[f]) for f in hf.ATTENTION_FLAGS if f in c}
        clash = {f: v for f, v in said.items() if v != decided[f]}
        if clash:
            raise ConfigError(f"{d / 'config.json'} says {clash}, but {how} gives {decided}; import the checkpoints "
                              "that differ into another --workdir, or drop --attn_flags")
        if hf.config_from_hf({**c, **decided}, str(d / "config.json")) != model:
            raise ConfigError(f"{d / 'config.json'}: another model than {first_dir / 'config.json'} describes; one "
                              "run holds the checkpoints of one model")
    return decided, how, first


def run_config(base: ml_collections.ConfigDict, hf_cfg: dict, attn: dict[str, bool], tokenizer: str):
    """The imported run's config: the model from config.json (with the decided flags), the rest from
    `base`; the tokenizer `tokenizer` (a spec), the regime upcast where reorder_and_upcast_attn asks."""
    cfg = base.copy_and_resolve_references()
    model = dataclasses.asdict(hf.config_from_hf({**hf_cfg, **attn}))
    model.update({k: base.model[k] for k in IMPLEMENTATION})
    cfg.model.update(model)
    if attn["reorder_and_upcast_attn"] and not cfg.precision.attn_dtype:
        cfg.precision.regime = precision.upcast_regime(cfg.precision.regime)
    cfg.data.update(tokenizer=tokenizer, tokenizer_kind="none", vocab_size=model["vocab_size"])
    cfg.train.seq_len = min(cfg.train.seq_len, model["n_positions"])
    cfg.mesh.update(data=-1, fsdp=1, tensor=1)  # (a reader builds its own mesh: saved_run.load_run)
    cfg.checkpoint.async_save = False
    config_lib.validate(cfg, backend=jax.default_backend())
    config_lib.check_corpus(cfg)
    return cfg


def save_tokenizer(spec: str, workdir: Path) -> str:
    """The tokenizer of `spec` written as WORKDIR/tokenizer (once: a rerun must give the same one);
    returns its spec there."""
    tok = tok_lib.load(spec)
    target = workdir / "tokenizer"
    if not target.is_dir():
        scratch = workdir / ".tokenizer-tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        tokenizer_export.save_for_hf(tok, scratch)
        scratch.rename(target)  # whole or not at all
    saved = tokenizer_export.for_model_dir(target)
    if tok_lib.load(saved).sha256 != tok.sha256:
        raise ConfigError(f"{target} holds another tokenizer than {spec}: this run was imported with another one; "
                          "use a new --workdir")
    return saved


def run_meta(cfg, trainer: train.Trainer, cache, info: dict) -> dict:
    """What a trained run records (run.json and every checkpoint's meta), and `info` as ``import``."""
    return telemetry.jsonable({
        "config": config_lib.to_dict(cfg), "versions": telemetry.package_versions(),
        "jaxlm_commit": telemetry.git_commit(config_lib.SOURCE_ROOT), "environment": telemetry.environment(trainer.mesh),
        "precision": trainer.policy.to_dict(), "n_params": trainer.n_params, "flops_per_token": trainer.flops_per_token,
        "attention_impl": trainer.attention,
        "data": {"cache": str(cache.path), "cache_url": None, "tokenizer": cache.tokenizer_spec,
                 "vocab_size": cache.manifest["vocab_size"], "eos_id": cache.manifest["eos_id"],
                 "tokenizer_sha256": cache.manifest["tokenizer_sha256"], "splits": cache.manifest["splits"]},
        "import": info,
    })


def check_rerun(workdir: Path, cfg, attn: dict[str, bool]) -> dict:
    """The sources recorded by an import into `workdir` before ({} if none); one with another config or
    other attention flags is refused, as is a trained run."""
    old = _recorded(workdir)
    if old is None:
        return {}
    diffs = config_lib.config_differences(old["config"], config_lib.to_dict(cfg))
    if old["import"]["attention_flags"] != attn:
        diffs.append(f"attention flags {_flags(old['import']['attention_flags'])} -> {_flags(attn)}")
    if diffs:
        raise ConfigError(f"--workdir={workdir} was imported with another config: {'; '.join(diffs)}; import into a new "
                          "--workdir")
    return old["import"]["sources"]


def _recorded(workdir: Path) -> dict | None:
    """run.json of an import into `workdir` before (None: there was none); a trained run is refused."""
    path = workdir / "run.json"
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    if "import" not in old:
        raise ConfigError(f"--workdir={workdir}: a trained run, not an imported one; import into a new --workdir")
    return old


def _flags(attn: dict) -> str:
    return ", ".join(f"{f}={attn[f]}" for f in hf.ATTENTION_FLAGS)


def import_hf(spec: str, workdir, base=None, *, attn_flags: str | None = None, tokenizer: str | None = None,
              step: int | None = None, log=print, progress: bool = True) -> dict:
    """Imports the checkpoints `spec` names (``find_sources``) into the run directory `workdir`; `base`:
    the config of everything but the model (default: the schema). Returns {"imported", "skipped": steps}."""
    if paths.is_remote(str(workdir)):
        raise ConfigError(f"--workdir={workdir}: an imported run is written locally (copy it to the bucket after)")
    workdir = Path(workdir)
    sources = find_sources(str(spec), step)
    attn, how, first = decide_flags(sources, attn_flags)
    _recorded(workdir)  # (before anything is written there)
    with lease.Lease(workdir, log=log):  # one writer per workdir, as training (a second import is refused)
        return _import_into(workdir, sources, attn, how, first, base, tokenizer, log, progress)


def _import_into(workdir: Path, sources, attn, how, first, base, tokenizer, log, progress: bool) -> dict:
    tok_spec = save_tokenizer(tokenizer or tokenizer_export.for_model_dir(sources[0][1]), workdir)
    cfg = run_config(base if base is not None else config_lib.schema(), first, attn, tok_spec)
    before = check_rerun(workdir, cfg, attn)
    if paths.is_remote(str(data.cache_root(cfg, workdir))):
        raise ConfigError("data.cache_dir: an imported run keeps its token cache locally; leave data.cache_dir empty "
                          "or give a local directory")
    cache = data.prepare(cfg, workdir, log=log)
    trainer = train.Trainer(cfg, sharding.make_mesh(cfg.mesh), cache.manifest["vocab_size"])
    if cache.tokenizer().vocab_size > trainer.model_cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {cache.tokenizer().vocab_size} tokens, the model "
                          f"{trainer.model_cfg.vocab_size}: not the model's tokenizer (see --tokenizer)")
    info = {"tool": TOOL, "sources": {**before, **{str(s): str(d.resolve()) for s, d in sources}}, "attention_flags": attn,
            "attention_flags_from": how, "tokenizer_from": str(tokenizer or sources[0][1].resolve()),
            "hf_config": first}
    meta = run_meta(cfg, trainer, cache, info)
    files.atomic_write_json(workdir / "run.json", meta, indent=2, sort_keys=True)
    meta["import"] = {k: v for k, v in info.items() if k != "sources"}  # (each checkpoint's meta names its own)
    return _import_steps(workdir, sources, trainer, meta, log, progress)


def _import_steps(workdir: Path, sources, trainer: train.Trainer, meta: dict, log, progress: bool) -> dict:
    """Writes each step not in the run yet, in order; the others are left exactly as they are."""
    abstract = train.abstract_state(trainer).params
    keep_all = ml_collections.ConfigDict({"train": {"steps": 0}, "checkpoint": {
        "stages": ((1, 1),), "keep": 0, "keep_every": 0, "async_save": False, "latest_every_minutes": 0.0}})
    ckpt = checkpoint.Checkpointer(workdir, keep_all, abstract_state=checkpoint.params_tree(abstract))
    try:
        have = set(ckpt.steps())
        todo = [(s, d) for s, d in sources if s not in have]
        skipped = [s for s, _ in sources if s in have]
        shardings = jax.tree.map(lambda a: a.sharding, abstract)
        for s, d in tqdm(todo, desc="importing", unit="step", file=sys.stderr, disable=not progress):
            _, params = hf.params_from_hf(hf.read_tensors(d), trainer.model_cfg, trainer.policy, source=str(d))
            ckpt.meta = {**meta, checkpoint.PARAMS_ONLY: True, "import_source": str(d.resolve())}
            ckpt.save(s, checkpoint.params_tree(jax.device_put(params, shardings)), {"imported_from": str(d.resolve())})
    finally:
        ckpt.close()
    log(f"imported {len(todo)} step(s) into {workdir / 'checkpoints'}"
        + (f"; skipped {len(skipped)} already there" if skipped else ""))
    return {"imported": [s for s, _ in todo], "skipped": skipped}


# --- CLI ----------------------------------------------------------------------------------------

def define_flags():
    flags.DEFINE_string("hf", None, "A Hugging Face GPT-2 directory, a directory of checkpoint-<step>/ ones, or a glob.")
    flags.DEFINE_string("workdir", None, "The run directory to write (a rerun adds the missing steps).")
    flags.DEFINE_string("attn_flags", None, "mistral (scale_attn_by_inverse_layer_idx and reorder_and_upcast_attn "
                        "True) or gpt2 (both False); default: config.json's (a warning where it has none).")
    flags.DEFINE_string("tokenizer", None, "The model's tokenizer, hf:DIR or PATH.model (default: the first "
                        "checkpoint directory's own).")
    flags.DEFINE_integer("step", None, "The step of a single model directory whose name gives none.")
    cli.define_config("config", "The imported run's config for everything but the model (data.source: its "
                      "validation split and the probe's texts; precision.regime), e.g. configs/gpt2_small.py; "
                      "default: the schema's (configs/base.py).")


def main(argv):
    F = cli.FLAGS
    cli.require(hf=F.hf, workdir=F.workdir)
    if F.attn_flags is not None and F.attn_flags not in hf.ATTENTION_PRESETS:
        raise ConfigError(f"--attn_flags={F.attn_flags!r}: one of {', '.join(hf.ATTENTION_PRESETS)}")
    import_hf(F.hf, F.workdir, F.config, attn_flags=F.attn_flags, tokenizer=F.tokenizer, step=F.step,
              log=lambda s: print(s, file=sys.stderr, flush=True))


if __name__ == "__main__":
    cli.run(main, define_flags)
