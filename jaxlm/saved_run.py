"""A finished run read back: a checkpoint onto this machine's devices, and the tokenizer it was trained with.

    cfg, trainer, state, meta, step = saved_run.load_run(workdir, step)   # a checkpoint, read-only
    tok = tokenizer.load(saved_run.tokenizer_spec(meta, workdir))        # the run's tokenizer

``load_run`` restores any saved step of a run directory onto this machine's devices, whatever mesh or
process count wrote it (eval, generate, export, the harness and the probes use it). The tokenizer lives
in the token cache (the machine's, or the bucket's for a run in one); ``keep_tokenizer`` also copies it
into ``WORKDIR/tokenizer`` when a run starts, so a run directory copied to another machine, or whose
cache was pruned, still decodes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from jaxlm import checkpoint, paths, sharding, train
from jaxlm import config as config_lib
from jaxlm.data import tokenizer as tok_lib
from jaxlm.errors import CheckpointError

KEPT = "tokenizer"  # WORKDIR/tokenizer: the run's copy of its tokenizer's files


def keep_tokenizer(workdir, spec: str) -> None:
    """Copies the tokenizer `spec` names (a file, or an hf: directory) into WORKDIR/tokenizer, once (a local
    workdir; a run in a bucket keeps its cache there)."""
    if paths.is_remote(workdir):
        return
    source = tok_lib.spec_path(spec)
    target = Path(workdir) / KEPT / source.name
    if target.exists() or not source.exists():
        return
    tmp = target.with_name(f".{source.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if source.is_dir() else shutil.copy2)(source, tmp)
    tmp.rename(target)


def tokenizer_spec(meta: dict, workdir=None) -> str:
    """The tokenizer a run was trained with, as ``tokenizer.load`` takes it: on this machine (in the token
    cache, else the run's own copy in WORKDIR/tokenizer), or fetched from the run's object-store cache
    into the local mirror."""
    spec, url = meta["data"]["tokenizer"], meta["data"].get("cache_url")
    path = tok_lib.spec_path(spec)
    kept = Path(workdir) / KEPT / path.name if workdir is not None and not paths.is_remote(workdir) else None
    if not path.exists() and kept is not None and kept.exists():
        return spec.replace(str(path), str(kept), 1)
    if path.exists() or not url:
        return spec
    root, key = url.rsplit("/tokens/", 1)
    local = paths.mirror(root) / "tokens" / key
    paths.pull(url, local)
    return spec.replace(meta["data"]["cache"], str(local), 1)


def load_run(workdir, step: int | None = None, mesh=None, *, params_only: bool = False):
    """Restores a run's checkpoint (the newest if `step` is None) onto `mesh` (default: all local
    devices, one data-parallel axis), whatever mesh or process count wrote it.

    Returns (cfg, trainer, state, meta, step): the config is the one saved with the checkpoint.
    With `params_only` the state holds the parameters only (its other fields None): for evaluation,
    a third of the bytes read and held under AdamW. A checkpoint of parameters alone (an imported run,
    ``jaxlm.hf_import``) gives such a state whatever `params_only` says.
    """
    steps = checkpoint.saved_steps(workdir)
    directory = paths.path(workdir) / "checkpoints"
    if not steps:
        raise CheckpointError(f"{directory}: no complete checkpoint; train the run first (python -m jaxlm.main)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"{directory}: no checkpoint for step {step}; available: {steps}")
    meta = checkpoint.read_meta(workdir, step)
    cfg = config_lib.from_dict(meta["config"])
    cfg.checkpoint.async_save = False
    if mesh is None:
        cfg.mesh.update({"data": -1, "fsdp": 1, "tensor": 1})
        mesh = sharding.make_mesh(cfg.mesh)
    trainer = train.Trainer(cfg, mesh, vocab_size=int(meta["data"]["vocab_size"]))
    ckpt = checkpoint.Checkpointer(workdir, cfg, abstract_state=train.abstract_state(trainer), read_only=True)
    try:
        alone = bool(meta.get(checkpoint.PARAMS_ONLY))  # the checkpoint holds parameters only
        signature = checkpoint.state_signature(checkpoint.params_tree(ckpt.abstract_state.params)) if alone else ckpt.signature
        if meta.get("state_signature") not in (None, signature):
            raise CheckpointError(checkpoint.other_layout(directory / str(step), meta, []))
        if params_only or alone:
            state = train.TrainState(step=None, params=_params_or_fail(ckpt, step), opt_state=None, rng=None,
                                     loss_scale=None, nonfinite=None)
        else:
            state, _, meta, step = ckpt.restore_or_fail(step)
    finally:
        ckpt.manager.close()
    return cfg, trainer, state, meta, step


def load_params(workdir, step: int, trainer: train.Trainer):
    """The parameters of one more checkpoint of the run `trainer` was built for (``load_run``'s), onto
    its mesh: no new trainer, no optimizer state (``eval --all-steps``)."""
    ckpt = checkpoint.Checkpointer(workdir, trainer.cfg, abstract_state=train.abstract_state(trainer), read_only=True)
    try:
        return _params_or_fail(ckpt, step)
    finally:
        ckpt.manager.close()


def _params_or_fail(ckpt: checkpoint.Checkpointer, step: int):
    try:
        return ckpt.restore_params(step)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint {ckpt.directory / str(step)}: its parameters cannot be read "
                              f"({checkpoint.describe(e)}); choose another --step (saved: {ckpt.steps()})") from None
