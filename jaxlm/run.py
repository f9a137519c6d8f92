"""A whole run: the one place that wires data, trainer, checkpoints and telemetry together.

    result = run.run(cfg, workdir)                                  # train (or resume) to train.steps

``run`` validates the config, builds the mesh, prepares the token cache, builds the
:class:`~jaxlm.train.Trainer`, restores the newest checkpoint or initialises and saves step 0, then
runs :func:`jaxlm.train.loop` with checkpointing and preemption on every step. A finished run is
read back by ``jaxlm.saved_run``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp

from jaxlm import attention as attn_lib
from jaxlm import budget as budget_lib
from jaxlm import checkpoint, data, distributed, evalsets, files, lease, paths, preemption, saved_run, sharding, telemetry, train
from jaxlm import config as config_lib
from jaxlm.data import splits
from jaxlm.errors import CheckpointError, ConfigError, DataError, JaxlmError


def run(cfg, workdir, *, log: Callable[[str], None] | None = None) -> train.LoopResult:
    """Prepares data, builds the trainer on the mesh, initialises or resumes, and trains.

    SIGTERM/SIGINT are handled from the start: during preparation the run stops at once (exit 0,
    nothing half-written kept), during training it saves the current step and stops. The run holds
    the workdir's lease (``jaxlm.lease``) from before it writes anything there to its end: a second
    run on the same workdir ends at once with a LeaseError naming this one.
    """
    is_main = jax.process_index() == 0
    say = log or (lambda s: print(s, flush=True) if is_main else None)
    with preemption.Signals() as signals:
        try:
            with lease.Lease(workdir, log=say):  # one run per workdir; released on every way out
                result = _run(cfg, paths.path(workdir), say, signals)
        except preemption.Interrupted as e:
            say(f"interrupted by {e} before training started; run the same command again to start or resume")
            result = train.LoopResult(None, 0, f"interrupted by {e}", preempted=True)
        except JaxlmError as e:  # on every process the same line: this one's, with its index
            if jax.process_count() == 1:
                raise
            if not distributed.claim_error_line():
                distributed.await_exit()
            message = distributed.process_prefix() + str(e)
            distributed.publish_failure(message)
            raise type(e)(message) from None
        except Exception as e:
            if not distributed.claim_error_line():  # the watchdog printed a peer's failure and ends this process
                distributed.await_exit()
            if (peer := distributed.peer_failure()) is not None:  # a consequence of a peer's failure
                distributed.publish_failure(peer)
                raise JaxlmError(peer) from None
            distributed.publish_failure(f"{distributed.process_prefix()}failed: {checkpoint.describe(e)} (its "
                                        "log file, WORKDIR/logs, has the traceback)")
            raise
    distributed.publish_done()
    return result


def last_step(cfg, budget, replay) -> float:
    """The run's last step: a replay's, else train.steps; under a budget the meter ends the run, at its
    step cap train.max_steps or, without one, at no step known in advance (math.inf)."""
    if replay is not None:
        return len(replay)
    return cfg.train.steps if budget is None else int(cfg.train.max_steps) or math.inf


def _run(cfg, workdir, say, signals: preemption.Signals) -> train.LoopResult:
    is_main = jax.process_index() == 0
    config_lib.validate(cfg, backend=jax.default_backend())
    config_lib.check_corpus(cfg)
    paths.check_url(workdir, "--workdir")
    paths.check_url(cfg.data.cache_dir, "data.cache_dir")
    mesh = sharding.make_mesh(cfg.mesh)
    config_lib.check_size(cfg, cfg.data.vocab_size, *sharding.memory(mesh))  # before minutes of building a model
    eval_sets = evalsets.parse_eval_sets(cfg.train.eval_sets)  # before the cache: a bad entry or file fails first
    evalsets.check_files(eval_sets, cfg.data)
    cache = data.prepare(cfg, workdir, log=say)
    signals.check()
    vocab = cache.manifest["vocab_size"]
    config_lib.check_vocab(cfg, vocab, cache.tokenizer_spec)
    trainer = train.Trainer(cfg, mesh, vocab)  # its GPT2Config checks the model against the real vocabulary
    say(_describe(trainer, mesh))
    set_fns = evalsets.callbacks(eval_sets, cfg, cache.tokenizer, trainer, log=say)  # each read once, before any save
    ent = cache.manifest["splits"]["train"].get("unigram_entropy")
    if ent is not None:
        say(f"data: {cache.manifest['splits']['train']['tokens']:,} training tokens; unigram entropy {ent:.3f} nats "
            "(a model that ignores context cannot go below it)")
    if held := splits.describe(cache.manifest):  # a validation split cut from the corpus's tail
        say(held)

    meta = telemetry.jsonable({
        "config": config_lib.to_dict(cfg), "versions": telemetry.package_versions(),
        "jaxlm_commit": telemetry.git_commit(config_lib.SOURCE_ROOT), "environment": telemetry.environment(mesh),
        "precision": trainer.policy.to_dict(), "n_params": trainer.n_params,
        "flops_per_token": trainer.flops_per_token, "attention_impl": trainer.attention,
        "data": {"cache": str(cache.path), "cache_url": _cache_url(cfg, workdir, cache), "tokenizer": cache.tokenizer_spec,
                 "vocab_size": vocab,
                 "eos_id": cache.manifest["eos_id"], "tokenizer_sha256": cache.manifest["tokenizer_sha256"],
                 "splits": cache.manifest["splits"]},
    })
    if jax.process_index() == 0:  # the run's own copy: it decodes wherever its directory goes
        saved_run.keep_tokenizer(workdir, cache.tokenizer_spec)
    replay = replay_fractions(cfg.train.budget_replay) if cfg.train.budget_replay else None
    ckpt = checkpoint.Checkpointer(workdir, cfg, abstract_state=train.abstract_state(trainer), meta=meta,
                                   signals=signals, last_step=last_step(cfg, trainer.budget, replay))
    if jax.process_count() > 1:
        ckpt.vote = preemption.StopVote(mesh)
        distributed.set_resume_hint(lambda: checkpoint.resume_hint(ckpt.directory))
    tele = None
    try:
        restored = ckpt.restore_latest(allow_config_change=bool(cfg.checkpoint.allow_config_change),
                                       current_config=meta["config"])
        loader = data.train_loader(cache, cfg)
        epoch_len = len(loader.rows)
        if isinstance(cache, data.MixtureCache):  # over the run's rows; a budget without a step cap: the first epoch's
            say(cache.describe(ckpt.total * cfg.train.batch_size) if math.isfinite(ckpt.total) else
                cache.describe(epoch_len, whole_run=False))

        max_steps = int(cfg.train.max_steps)
        clock = budget_lib.CLOCKS[cfg.train.get("budget_clock", "wall")]
        meter = (budget_lib.Meter(trainer.budget, clock=clock, max_steps=max_steps)
                 if trainer.budget is not None and replay is None else None)
        say(_epochs(trainer, epoch_len, len(replay) if replay is not None else max_steps if meter else cfg.train.steps))

        def data_state(step):
            d = {"next_index": int(step), "epoch": int(step) * trainer.batch_size // epoch_len}
            return d if meter is None else {**d, "budget": meter.state()}  # the budget spent, for resume

        if restored is not None:
            state, saved_data, saved_meta, start = restored
            if int(saved_data["next_index"]) != start:
                raise CheckpointError(f"checkpoint {start}: loader state {saved_data} does not match the step")
            if meter is not None:
                meter = budget_lib.Meter(trainer.budget, **saved_data.get("budget", {}), clock=clock, max_steps=max_steps,
                                         step=start)
            say(f"resumed from the checkpoint at step {start} in {ckpt.directory}"
                + (f" (budget spent: {trainer.budget.describe(meter.spent)})" if meter is not None else "")
                + _mesh_change(saved_meta.get("environment") or {}, mesh))
        else:
            state = trainer.init(jnp.asarray(cfg.train.seed, jnp.uint32))
            start = 0
            if meter is None:  # (under a budget, after the check that the warmup fits, below)
                ckpt.save(0, state, data_state(0))
        signals.check()
        loader.set_state(data_state(start))  # batch k is the one step k consumes
        batches = data.device_prefetch(loader, trainer.batch_sharding)
        eval_fn = _validation_batches(cache, cfg, trainer, say)
        components = _component_validation_batches(cache, cfg, trainer) if eval_fn is not None else None

        total = last_step(cfg, trainer.budget, replay)
        tele = telemetry.Telemetry(workdir, cfg, total_steps=total if meter is None else max_steps,
                                   start_step=start, run_metadata=meta)
        if tele.dashboard:
            say(tele.dashboard)
        ckpt.before_save = lambda: tele.sync(force=True)
        result = train.LoopResult(state, start, budget_spent=meter is not None and meter.done)
        if start < total and not result.budget_spent:
            t0 = time.perf_counter()
            first = next(batches)
            knobs = trainer.knobs(0.0 if replay is None else replay[start])
            trainer.train_step.lower(state, first, *knobs).compile()
            tele.log(start, {telemetry.COMPILE_TIME: time.perf_counter() - t0})
            if meter is not None:  # what will end the run, at the measured step cost; the warmup must fit
                say(_budget_start(trainer, state, first, meter, start))
                if restored is None:
                    ckpt.save(0, state, data_state(0))
            batches = _chain([first], batches)
            signals.training()  # from here a signal saves the current step and stops
            result = train.loop(trainer, state, batches, tele, eval_batches=eval_fn, eval_components=components,
                                eval_sets=set_fns,
                                on_step=lambda step, st: tele.on_step(step, st) or ckpt.on_step(step, st, data_state(step)),
                                meter=meter, replay=replay)
            if result.budget_spent and not result.stopped:  # the final checkpoint of a budgeted run
                ckpt.save(result.step, result.state, data_state(result.step))
                ckpt.manager.wait_until_finished()
        result.preempted = ckpt.preempted or signals.received is not None
        finished = result.stopped or result.step >= total or result.budget_spent
        if is_main and not result.preempted and finished:
            files.atomic_write_json(workdir / "done.json", {"step": result.step, "stopped": result.stopped,
                                                            **({"budget": meter.state()} if meter else {})})
        if result.stopped:
            logging.getLogger("jaxlm").info("stopped: %s", result.stopped)  # every process's log file
            tele.message(f"stopped: {result.stopped}")
        else:
            tele.message(f"done: step {result.step} of {total}; run directory {workdir}" if meter is None else
                         f"done: budget {trainer.budget.describe(meter.spent)} spent at step {result.step}"
                         + (f" (the step cap train.max_steps={max_steps:,})" if result.step == max_steps else "")
                         + f"; run directory {workdir}")
    finally:
        _close(tele, ckpt, failing=sys.exc_info()[0] is not None)
    return result


# How long a run that is failing waits for its sinks and checkpointer to close: after a full disk a
# library's writer thread (Orbax's, TensorBoard's) may never finish, and the error must still be said.
CLOSE_ON_ERROR_S = 60.0


def _close(tele, ckpt, failing: bool) -> None:
    """Closes the telemetry and the checkpointer (waiting for a save in flight); on the way out of an
    error, for at most CLOSE_ON_ERROR_S on a daemon thread, then the error goes on regardless."""
    def close():
        if tele is not None:
            tele.close()
        ckpt.close()

    if not failing:
        return close()

    def close_quietly():  # (what fails here is the same failure again: the log file has it)
        try:
            close()
        except Exception:
            logging.getLogger("jaxlm").info("closing after a failure failed too", exc_info=True)

    worker = threading.Thread(target=close_quietly, daemon=True, name="jaxlm-close")
    worker.start()
    worker.join(CLOSE_ON_ERROR_S)


def _mesh_change(saved_env: dict, mesh) -> str:
    """'; the mesh changed: ...' when the checkpoint was written on another mesh or process count."""
    was, now = (saved_env.get("mesh"), saved_env.get("process_count")), (dict(mesh.shape), jax.process_count())
    if was[0] is None or was == now:
        return ""
    return (f"; the mesh changed: saved on {was[0]} over {was[1]} process(es), now {now[0]} over {now[1]} "
            "(the state is resharded on restore, its fingerprints checked)")


def _cache_url(cfg, workdir, cache) -> str | None:
    """The token directory's URL when the cache root is an object store (cache.path is its local mirror)."""
    root = data.cache_root(cfg, workdir)
    if not paths.is_remote(root):
        return None
    return str(root / cache.path.relative_to(paths.mirror(root)).as_posix())


def replay_fractions(run_dir) -> list[float]:
    """Every step's budget fraction of a finished budgeted run (its metrics.jsonl), for train.budget_replay."""
    path = paths.path(run_dir) / "metrics.jsonl"
    if not (paths.path(run_dir) / "done.json").exists() or not path.exists():
        raise ConfigError(f"train.budget_replay={str(run_dir)!r}: not a finished run (no done.json and "
                          "metrics.jsonl); replay a budgeted run that has finished")
    fractions: list[float] = []
    for r in telemetry.read_metrics(path)[0]:
        fs = r.get(telemetry.STEP_FRACTIONS)
        if fs is None:
            continue
        if r[telemetry.STEP] != len(fractions) + len(fs):
            raise ConfigError(f"train.budget_replay: {path} has a gap before step {r[telemetry.STEP]}; it cannot be "
                              "replayed step by step")
        fractions.extend(float(x) for x in fs)
    if not fractions:
        raise ConfigError(f"train.budget_replay: {path} logs no per-step budget fractions; was it a budgeted run "
                          "(train.budget)?")
    done = json.loads((paths.path(run_dir) / "done.json").read_text())
    if int(done.get("step", -1)) != len(fractions):
        raise ConfigError(f"train.budget_replay: {path} logs {len(fractions)} steps, done.json says {done.get('step')}")
    return fractions


def _budget_start(trainer, state, batch, meter, start: int) -> str:
    """Under a budget, before training: optim.warmup_steps must fit in the budget at the measured step
    cost (one ConfigError if they do not), and the startup line says what will end the run, the budget
    or the step cap train.max_steps, with the budget fraction where a cap stops it (budget.cap_note).
    A wall-clock step is timed (at the full batch) on a copy of the state, only where the warmup or a
    step cap needs it. Under train.batch_ramp a step's cost is taken as its micro-batches' share of a
    full one: the warmup is checked at the cost of the steps at hand, the steps by the ramp's average."""
    warm, ramp = int(trainer.cfg.optim.warmup_steps), float(trainer.cfg.train.batch_ramp)
    knobs = trainer.knobs(1.0)
    unit = "s" if meter.budget.kind == "time" else "FLOPs"
    if meter.budget.kind == "flops":
        per_step = int(knobs[0]["micro_batches"]) * trainer.micro * trainer.seq_len * trainer.flops_per_token
    elif start < warm or meter.max_steps:
        scratch = jax.tree.map(jnp.copy, state)
        scratch, m = trainer.train_step(scratch, batch, *knobs)  # (compiled already; warms the caches)
        jax.block_until_ready(m)
        t = time.perf_counter()
        scratch, m = trainer.train_step(scratch, batch, *knobs)
        jax.block_until_ready(m)
        per_step = time.perf_counter() - t
        del scratch
    else:
        per_step = None
    ramped = ramp > 0 and per_step is not None and trainer.batch_size > trainer.micro
    full = now = per_step
    if ramped:
        now, per_step = budget_lib.ramp_step_cost(full, trainer.batch_size // trainer.micro, ramp, meter.fraction)
    left = meter.budget.total - meter.spent
    if start < warm and warm * now >= left:
        raise ConfigError(
            f"train.budget={trainer.cfg.train.budget!r} is shorter than the warmup: optim.warmup_steps={warm} "
            f"at the measured {now:.3g} {unit}/step need {warm * now:.3g} {unit} of the "
            f"{left:.3g} left; raise the budget or lower optim.warmup_steps")
    note = budget_lib.cap_note(meter.budget, meter.max_steps, start, meter.spent, per_step)
    if ramped:
        note += (f"; under train.batch_ramp={ramp:g} a step is taken to cost its micro-batches' share of a full "
                 f"batch's {full:.3g} {unit}: "
                 f"{per_step:.3g} {unit}/step on average over the ramp")
    if start < warm:
        note += f"; the warmup takes about {warm * per_step / meter.budget.total:.1%} of the budget"
    return note


def _describe(trainer: train.Trainer, mesh) -> str:
    """The startup line: model size, precision, attention, remat, mesh and devices."""
    mc = trainer.model_cfg
    padded = f", token table padded to {mc.padded_vocab_size} rows" if mc.padded_vocab_size != mc.vocab_size else ""
    return (f"model: GPT-2 {trainer.n_params:,} parameters ({mc.n_layer} layers, d={mc.n_embd}, vocab "
            f"{mc.vocab_size}{padded}); precision {trainer.policy.describe()}; "
            f"attention {attn_lib.describe(trainer.attention, dict(mesh.shape))}, "
            f"remat {mc.remat}; mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].device_kind} "
            "device(s)")


def _epochs(trainer, epoch_len: int, steps: int) -> str:
    """The startup line that says how many times the run will read its training rows (`steps` = 0: a
    budget with no step cap, whose step count is known only as it runs)."""
    if not steps:
        return (f"data: {epoch_len:,} training rows of {trainer.batch_size} per step; "
                "the budget decides how many steps (the progress line shows the epoch)")
    n = steps * trainer.batch_size / epoch_len
    line = (f"data: {steps:,} steps x {trainer.batch_size} rows = {n:.3g} epochs of the {epoch_len:,} training rows"
            + (" (at most: the budget may stop it sooner)" if trainer.budget else ""))
    if n > 1:  # memorising: the training loss falls below the validation loss
        line = f"warning: {line}; each row is read about {n:.0f} times (more text, or fewer train.steps, avoid it)"
    return line


def _validation_batches(cache, cfg, trainer, say):
    """A function giving the periodic evaluation's batches (None when evaluation is off)."""
    if not cfg.train.eval_every:
        return None
    try:
        val = data.eval_loader(cache, cfg, batch_size=trainer.micro)
    except DataError as e:
        why = str(e)
        if cache.manifest["splits"]["validation"]["sequences"] < trainer.micro:  # what to change, not just the count
            why = splits.too_small(cache.manifest, trainer.micro, cfg.train.seq_len, cfg.data.val_fraction,
                                   cfg.data.get("val_source", ""))
        say(f"warning: periodic evaluation is off: {why}")
        return None
    n_eval = _eval_batch_count(cfg, val)
    which = f"all {n_eval}" if not cfg.train.eval_batches else f"{n_eval}"
    say(f"periodic evaluation: every {cfg.train.eval_every} steps, mean loss over {which} validation batches of "
        f"{trainer.micro} x {cfg.train.seq_len}-token windows (python -m jaxlm.eval scores every token of the "
        "validation text with a sliding window; the two estimates differ slightly)")
    return lambda: (data.to_global(val.batch(i), trainer.batch_sharding) for i in range(n_eval))


def _eval_batch_count(cfg, val) -> int:
    """train.eval_batches, at most the split's batches; 0: every batch of the split (the rows short of a
    last full batch are not read)."""
    return min(cfg.train.eval_batches, len(val)) if cfg.train.eval_batches else len(val)


def _component_validation_batches(cache, cfg, trainer):
    """{component index: its evaluation batches} of a mixture (``telemetry.EVAL_COMPONENT_LOSS``)."""
    out = {}
    for c, val in data.component_eval_loaders(cache, cfg, batch_size=trainer.micro).items():
        n = _eval_batch_count(cfg, val)
        out[c] = lambda val=val, n=n: (data.to_global(val.batch(i), trainer.batch_sharding) for i in range(n))
    return out


def _chain(head, tail):
    yield from head
    yield from tail
