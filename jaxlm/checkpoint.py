"""Checkpoints: Orbax CheckpointManager, Mistral's schedule, exact resume, preemption.

``WORKDIR/checkpoints/<step>/`` holds three items:

* ``state`` -- the whole TrainState (params, optimizer state, step, RNG, loss scale), saved
  sharded and restored onto the current mesh (``StandardSave``/``StandardRestore``);
* ``data``  -- the loader state ``{"next_index", "epoch"}`` (batch k is the one step k consumes);
* ``meta``  -- the resolved config, jaxlm commit, package versions, devices and mesh.

Saves are asynchronous (training goes on while Orbax writes) and atomic: Orbax writes into a
temporary directory and renames it when complete, so a save killed midway is never listed.
Each checkpoint's ``meta`` records a fingerprint of every array (its bit patterns summed modulo
2**32), checked on restore. A checkpoint that fails to restore (a truncated file) or whose contents
do not match its fingerprints (bytes flipped on disk) is renamed ``<step>.corrupt-<time>`` with a
one-line warning naming the cause, and the previous one is used. A read that fails for another
cause (permission, out of memory, a transient object-store error: :func:`not_damage`) keeps the
checkpoint and stops with one error line.

A checkpoint of parameters alone (``jaxlm.hf_import``: a model trained elsewhere, one checkpoint per
step) holds ``{"params": ...}`` as its ``state``, with the same fingerprints and ``meta[PARAMS_ONLY]``
set: ``saved_run.load_run`` and ``restore_params`` read it; a full restore (resuming training) refuses it
with one error (:func:`params_only_error`).

When to save (``checkpoint.stages``, Mistral's by default): at step 0, at the final step, and
when ``step % every == 0`` for the first stage ``(every, until)`` with ``until >= step`` (past the
last stage, its ``every``); plus a time-based "latest" save every ``latest_every_minutes`` that
the next one replaces. What to keep (``keep``/``keep_every``): all schedule steps (0) or the
last N plus every M-th; always the newest.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
import time
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from jaxlm import config as config_lib
from jaxlm import naming, paths, preemption, telemetry
from jaxlm import scan as scan_lib
from jaxlm.errors import CheckpointError

MISTRAL_STAGES = ((10, 100), (50, 2000), (100, 20000), (1000, 400000))

def describe(error: BaseException) -> str:
    """'Type: message' of the innermost exception of a chain (for a failed Orbax read, TensorStore's own
    message, not the spec of the array it was reading), on one line, at most about 300 characters."""
    seen = set()
    while (nxt := error.__cause__ or error.__context__) is not None and id(nxt) not in seen:
        seen.add(id(error))
        error = nxt
    text = config_lib.one_line(error)
    return f"{type(error).__name__}: {text[:300] + '...' if len(text) > 300 else text}"


# What a failed read says when the cause is not the checkpoint's bytes: access, memory, or an object
# store's transient trouble (gRPC/TensorStore status names and HTTP reasons, as they appear in messages)
_NOT_DAMAGE = (("PERMISSION_DENIED", "permission denied"), ("UNAUTHENTICATED", "permission denied"),
               ("Permission denied", "permission denied"), ("RESOURCE_EXHAUSTED", "out of memory or a quota"),
               ("out of memory", "out of memory"), ("Out of memory", "out of memory"),
               ("UNAVAILABLE", "a transient object-store error"), ("DEADLINE_EXCEEDED", "a transient object-store error"),
               ("Service Unavailable", "a transient object-store error"), ("Too Many Requests", "a quota"))
_NOT_DAMAGE_HTTP = {401: "permission denied", 403: "permission denied", 429: "a quota",
                    500: "a transient object-store error", 502: "a transient object-store error",
                    503: "a transient object-store error", 504: "a transient object-store error"}


def not_damage(error: BaseException) -> str | None:
    """Why a failed restore says nothing about the checkpoint itself (permission, memory, a transient
    object-store error), or None when it may be damage (a truncated or corrupt file)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, PermissionError):
            return "permission denied"
        if isinstance(e, MemoryError):
            return "out of memory"
        if isinstance(e, (TimeoutError, ConnectionError)):
            return "a transient object-store error"
        if getattr(e, "code", None) in _NOT_DAMAGE_HTTP:  # gcsfs's HttpError
            return _NOT_DAMAGE_HTTP[e.code]
        text = str(e)
        for marker, why in _NOT_DAMAGE:
            if marker in text:
                return why
        e = e.__cause__ or e.__context__
    return None


_ORPHAN_FILTERS_INSTALLED = []


def _drop_orphaned_read_errors() -> None:
    """After a failed restore, reads Orbax had in flight fail later, each printing a traceback ('Event
    loop is closed', an unretrieved task exception, an unraisable coroutine): hundreds of lines about
    the checkpoint just reported and set aside. From then on this process drops exactly those."""
    if _ORPHAN_FILTERS_INSTALLED:
        return
    _ORPHAN_FILTERS_INSTALLED.append(True)
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def orphan(exc) -> bool:
        text = str(exc)
        return "Event loop is closed" in text or "Encountered error while reading array index" in text

    sys.excepthook = lambda t, v, tb: None if orphan(v) else excepthook(t, v, tb)
    sys.unraisablehook = lambda u: None if orphan(u.exc_value) else unraisablehook(u)
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addFilter(lambda r: not (r.exc_info and orphan(r.exc_info[1])))


def _checksum(x: jax.Array) -> jax.Array:
    """The sum of an array's bit patterns as unsigned integers, modulo 2**32: exact, and independent of
    the order of summation (so of the sharding), and changed by any single damaged value."""
    if x.dtype == jnp.bool_:
        bits = x
    else:
        bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
    return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)


_checksums = jax.jit(lambda tree: jax.tree.map(_checksum, tree))


def fingerprints(state) -> dict[str, int]:
    """{leaf name: checksum} of a train state: saved with each checkpoint, verified on restore."""
    return {k: int(v) for k, v in naming.flat(jax.device_get(_checksums(state))).items()}


def on_schedule(step: int, stages, total_steps: int) -> bool:
    """Whether `step` is a scheduled checkpoint (step 0, the final step, or the stage rule)."""
    if step == 0 or step == total_steps:
        return True
    if not stages:
        return False
    for every, until in stages:
        if step <= until:
            return step % every == 0
    return step % stages[-1][0] == 0


def schedule(stages, total_steps: int) -> list[int]:
    return [s for s in range(total_steps + 1) if on_schedule(s, stages, total_steps)]


class _OnSchedule:
    """Orbax preservation policy: keeps the checkpoints on the stage schedule up to `total` (any horizon,
    also math.inf, which no list of steps could hold)."""

    def __init__(self, stages, total):
        self.stages, self.total = stages, total

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        return [on_schedule(c.step, self.stages, self.total) for c in checkpoints]


def state_signature(abstract_state) -> str:
    """A hash of the train state's leaf paths, shapes and dtypes: equal signatures restore into each other."""
    leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    text = "\n".join(f"{jax.tree_util.keystr(p)} {tuple(x.shape)} {x.dtype}" for p, x in leaves)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


PARAMS_ONLY = "params_only"  # meta key: the checkpoint's state is params_tree(params), nothing else


def params_tree(params) -> dict:
    """The state of a checkpoint of parameters alone (its fingerprints are named 'params.<name>', as a
    train state's are)."""
    return {"params": params}


def params_only_error(path) -> str:
    """Why checkpoint `path`, of parameters alone, cannot be restored as a whole train state."""
    return (f"checkpoint {path} holds parameters only (imported: no optimizer state, RNG or data position), so "
            "training cannot resume from it; evaluate, probe, sample or export it, and train in another --workdir")


class Checkpointer:
    """Owns the Orbax manager of one run directory and the decisions of when to save."""

    def __init__(self, workdir, cfg, *, abstract_state=None, meta: dict | None = None, read_only: bool = False,
                 signals: "preemption.Signals | None" = None, last_step: float | None = None):
        self.cfg, self.meta = cfg, meta or {}
        self.directory = paths.resolve(workdir) / "checkpoints"  # Orbax writes gs:// directly (tensorstore)
        # the run's last step, the schedule's horizon (run.last_step): train.steps unless the run says
        # otherwise (a budget's step cap, or math.inf: a budget without one ends at no known step)
        self.total = int(cfg.train.steps) if last_step is None else last_step
        self.before_save: Callable[[], None] | None = None
        stages = tuple(tuple(int(x) for x in s) for s in cfg.checkpoint.stages)
        self.stages = stages
        self.abstract_state = abstract_state
        self.signature = state_signature(abstract_state) if abstract_state is not None else None
        # the parameters' other layout (model.scan_layers, jaxlm.scan): its checkpoints restore converted
        self.other_layout = scan_lib.other_layout(abstract_state) if abstract_state is not None else None
        self.other_signature = state_signature(self.other_layout[0]) if self.other_layout else None
        keep, keep_every = int(cfg.checkpoint.keep), int(cfg.checkpoint.keep_every)
        if keep:
            policies = [ocm.LatestN(n=keep)] + ([ocm.EveryNSteps(interval_steps=keep_every)] if keep_every else [])
        else:  # keep every scheduled step; a time-based save lives until the next save replaces it
            policies = [_OnSchedule(stages, self.total), ocm.LatestN(n=1)]
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=bool(cfg.checkpoint.async_save),
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=not read_only, create=not read_only, read_only=read_only,
            save_interval_steps=0 if read_only else 1,  # (what Orbax sets, with a warning, for read_only)
        )
        with _without_read_only_notice():
            self.manager = ocp.CheckpointManager(self.directory, options=options,
                                                 item_names=("state", "data", "meta"))
        self._last_save_time = time.monotonic()
        self.signals = signals  # SIGTERM/SIGINT seen during training (None: not watched)
        # Multi-process: a preemption.StopVote, so a signal to any one process stops all at one step
        self.vote = None
        self._latest_voted = False
        self.preempted = False  # on_step stopped the run for a signal (here or, by the vote, elsewhere)

    # --- saving --------------------------------------------------------------------------------

    def save(self, step: int, state, data_state: dict) -> None:
        if step in self.manager.all_steps():
            return
        if self.before_save is not None:  # the run's metrics history, written up to this step first
            self.before_save()
        meta = dict(self.meta, step=step, state_signature=self.signature, fingerprints=fingerprints(state))
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)
        self._last_save_time, self._latest_voted = time.monotonic(), False

    def on_step(self, step: int, state, data_state: dict) -> str | None:
        """Saves when due; on a pending SIGTERM/SIGINT saves, waits, and returns why to stop."""
        asked = self.signals.received if self.signals is not None else None
        minutes = float(self.cfg.checkpoint.latest_every_minutes)
        latest_due = minutes > 0 and time.monotonic() - self._last_save_time >= 60 * minutes
        if self.vote is not None:  # every process reads the same votes for the same step: a signal
            # anywhere, and the time-based save by process 0's clock (each host's clock would differ)
            mine = latest_due and jax.process_index() == 0 and not self._latest_voted
            self._latest_voted = self._latest_voted or mine  # (one vote per time-based save)
            stop, latest_due = self.vote.cast(asked is not None, mine)
            asked = (asked or "a signal to another process") if stop else None
        if asked or self._multihost_preemption(step):
            self.preempted = True
            self.save(step, state, data_state)
            self.manager.wait_until_finished()
            return (f"preempted by {asked or 'the cluster'}: checkpoint for step {step} saved in "
                    f"{self.directory}; run the same command again to resume")
        if on_schedule(step, self.stages, self.total) or latest_due:
            self.save(step, state, data_state)
        if step == self.total:
            self.manager.wait_until_finished()
        return None

    def _multihost_preemption(self, step: int) -> bool:
        # JAX's preemption sync point makes every host agree on the same step; Orbax's check
        # returns False unless jax.distributed is initialised, hence our own signal handler too.
        return jax.process_count() > 1 and self.manager.reached_preemption(step)

    # --- restoring ------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, *, allow_config_change: bool = False, current_config: dict | None = None):
        """(state, data_state, meta, step) of the newest checkpoint that restores, or None if none exist.

        The checks come first and read only the small ``meta`` item: a checkpoint of a different
        config, or of a train state of another structure (its recorded signature), is an error,
        never taken for a corrupt one. Only a checkpoint whose meta or arrays fail to read although
        the structure matches is corrupt: it is moved aside and the previous one used.
        """
        for step in reversed(self.steps()):
            try:
                meta = self.read_meta(step)
            except Exception as e:
                self._set_aside_if_damaged(step, e)
                continue
            if meta.get(PARAMS_ONLY):
                raise CheckpointError(params_only_error(self.directory / str(step)))
            diffs = []
            if current_config is not None:
                diffs = config_lib.config_differences(meta.get("config", {}), current_config)
                if diffs and not allow_config_change:
                    raise CheckpointError(
                        f"{self.directory}: the config differs from the one this run was started with, in ways "
                        "that change its results: " + "; ".join(diffs) +
                        ". Use a new --workdir, revert these fields, or pass "
                        "--config.checkpoint.allow_config_change=True (e.g. to extend train.steps)")
            if meta.get("state_signature") not in (None, self.signature, self.other_signature):
                raise CheckpointError(other_layout(self.directory / str(step), meta, diffs) + " Use a new --workdir")
            _drop_orphaned_read_errors()  # were this restore to fail
            try:
                return self.restore(step)
            except Exception as e:  # same structure, yet unreadable: corrupt, unless the cause lies elsewhere
                self._set_aside_if_damaged(step, e)
        return None

    def _set_aside_if_damaged(self, step: int, error: Exception) -> None:
        why = not_damage(error)
        if why is not None:  # the checkpoint may be fine: keep it, stop, say what to fix
            raise CheckpointError(f"checkpoint {self.directory / str(step)} could not be read ({describe(error)}): "
                                  f"{why}, not damage, so it is kept as it is; fix the cause and run the same "
                                  "command again") from None
        self._set_aside(step, error)

    def _set_aside(self, step: int, error: Exception) -> None:
        bad = self.directory / str(step)
        aside = bad.with_name(f"{step}.corrupt-{int(time.time())}")
        # warn_explicit: one line, without a source line under it
        warnings.warn_explicit(f"checkpoint {bad} cannot be restored ({describe(error)}); moved to "
                               f"{aside.name}, using the previous one", UserWarning, "jaxlm.checkpoint", 0)
        if jax.process_index() == 0 and bad.exists():
            bad.rename(aside)
        self.manager.reload()

    def restore(self, step: int):
        """(state, data_state, meta, step) of checkpoint `step`, its contents checked against the
        fingerprints saved with it (CheckpointError naming the leaves that differ)."""
        if self.abstract_state is None:
            raise CheckpointError("restore needs the abstract train state")
        meta = self.read_meta(step)
        if meta.get(PARAMS_ONLY):
            raise CheckpointError(params_only_error(self.directory / str(step)))
        convert = self.other_signature is not None and meta.get("state_signature") == self.other_signature
        target = self.other_layout[0] if convert else self.abstract_state
        r = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        saved = r["meta"].get("fingerprints")
        if saved is not None:
            now = fingerprints(r["state"])
            bad = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
            if bad:
                raise CheckpointError(f"contents differ from the fingerprints saved with the checkpoint "
                                      f"(damaged on disk) in {len(bad)} array(s): {', '.join(bad[:4])}")
        state = self.other_layout[1](r["state"]) if convert else r["state"]  # into this run's layout
        return state, r["data"], r["meta"], step

    def restore_params(self, step: int):
        """The parameters of checkpoint `step` only (no optimizer state: a third of the bytes read
        and held under AdamW), checked against the fingerprints saved with them."""
        item = {"params": self.abstract_state.params}
        r = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True),
            meta=ocp.args.JsonRestore()))
        saved = {k: v for k, v in (r["meta"].get("fingerprints") or {}).items() if k.startswith("params.")}
        now = fingerprints({"params": r["state"]["params"]})
        bad = sorted(k for k in saved if saved[k] != now.get(k))
        if bad:
            raise CheckpointError(f"checkpoint {self.directory / str(step)}: parameters differ from the fingerprints "
                                  f"saved with them (damaged on disk) in {len(bad)} array(s): {', '.join(bad[:4])}")
        return r["state"]["params"]

    def restore_or_fail(self, step: int):
        """``restore``, a damaged checkpoint being a CheckpointError that names it and the cause."""
        _drop_orphaned_read_errors()  # were the read to fail
        try:
            return self.restore(step)
        except Exception as e:
            raise CheckpointError(f"checkpoint {self.directory / str(step)} cannot be read ({describe(e)}); "
                                  f"choose another --step (saved: {self.steps()})") from None

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def other_layout(path, meta: dict, diffs: list[str]) -> str:
    """Why a checkpoint whose train state has other shapes cannot be restored, and what to do."""
    written, this = meta.get("jaxlm_commit", "unknown"), telemetry.git_commit(config_lib.SOURCE_ROOT)
    why = [f"config differences: {'; '.join(diffs)}"] if diffs else []
    if written != this or written.endswith("+dirty"):  # +dirty: uncommitted changes, so maybe another layout
        why.append(f"it was written by jaxlm {written}, this is {this}: if the parameter layout changed between "
                   "them, read it with the jaxlm that wrote it (`python -m jaxlm.export` turns it into the Hugging "
                   "Face format, which every jaxlm reads)")
    return (f"checkpoint {path} holds a train state of another structure or shape than this run builds "
            f"({'; '.join(why) or 'same config and jaxlm commit'}).")


@contextlib.contextmanager
def _without_read_only_notice():
    """Orbax's manager logs a warning that its directory is read only whenever it is built so, as every
    reader here (eval, generate, export, probe) builds it: that one record is dropped while it is built."""
    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")

    logger = logging.getLogger("absl")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _reader(workdir) -> "Checkpointer":
    """A read-only Checkpointer of a run directory, for its steps and metadata (no config needed)."""
    directory = paths.path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(f"--workdir={workdir}: no checkpoints directory; is this a jaxlm run directory?")
    probe = ml_collections.ConfigDict({"train": {"steps": 0}, "checkpoint": {
        "stages": (), "keep": 0, "keep_every": 0, "async_save": False, "latest_every_minutes": 0.0}})
    return Checkpointer(workdir, probe, read_only=True)


def resume_hint(directory) -> str:
    """'resume from the checkpoint at step N' (the newest complete one), for the lost-peer message.
    Lists the directory only (no Orbax manager, no barrier: it runs while peers may be gone): Orbax
    renames a finished step into place, and on an object store writes commit_success.txt last."""
    d = paths.path(directory)
    remote = paths.is_remote(directory)
    steps = [int(c.name) for c in d.iterdir() if c.name.isdigit() and (
        not remote or (c / "commit_success.txt").exists())] if d.exists() else []
    if not steps:
        return "start again (no complete checkpoint yet)"
    return f"resume from the checkpoint at step {max(steps)} in {d}"


def saved_steps(workdir) -> list[int]:
    """The complete checkpoints of a run directory (read-only; nothing is created or cleaned)."""
    reader = _reader(workdir)
    try:
        return reader.steps()
    finally:
        reader.manager.close()


def read_meta(workdir, step: int) -> dict:
    """The ``meta`` item (config, commit, versions, state signature) of one checkpoint, read-only."""
    reader = _reader(workdir)
    try:
        return reader.read_meta(step)
    finally:
        reader.manager.close()
