"""Train state, the train step (one jitted call), periodic validation, and the training loop.

The step, in order: micro-batches (a ``lax.scan`` when ``train.micro_batch_size`` is set) →
fp32 loss × loss scale → gradients → unscale → finite check → clip + AdamW (optax) → the update
is applied only if every gradient is finite (else the step is skipped and counted; in fp16 the
loss scale reacts) → metrics. Parameters and optimizer state are fp32 masters whatever the regime.
The state is donated; the host reads metrics only at log steps.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm import attention as attn_lib
from jaxlm import budget as budget_lib
from jaxlm import config as config_lib
from jaxlm import model as model_lib
from jaxlm import optim, precision, sharding, telemetry
from jaxlm.errors import ConfigError


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates attempted so far (skipped ones included)
    params: Any  # nested dict of fp32 master weights
    opt_state: Any
    rng: jax.Array  # uint32[2] key for dropout; each step folds in its step number
    loss_scale: dict  # see precision.loss_scale_init
    nonfinite: jax.Array  # int32: steps whose loss or gradients were non-finite


class Trainer:
    """Everything static about a run (model, policy, optimizer, mesh, shardings) and its compiled steps."""

    def __init__(self, cfg, mesh, vocab_size: int):
        self.cfg, self.mesh = cfg, mesh
        self.model_cfg = config_lib.model_config(cfg, vocab_size)
        self.policy = config_lib.policy(cfg)
        self.ls_cfg = precision.loss_scale_config(cfg, self.policy)
        # Under a budget AdamW's learning rate is set by each step from (step, f); see _train_step.
        self.budget = budget_lib.parse(cfg.train.budget)
        if self.budget is None:
            self.tx, self.schedule = optim.make(cfg.optim, cfg.train.steps)
        else:
            self.tx, self.schedule = optim.make_budgeted(cfg.optim), None
        self.graphdef, abstract_params = model_lib.abstract(self.model_cfg, self.policy)
        self.n_params = model_lib.count_params(abstract_params, self.model_cfg)  # the padding rows not counted
        self.seq_len = cfg.train.seq_len
        self.batch_size = cfg.train.batch_size
        self.micro = cfg.train.micro_batch_size or cfg.train.batch_size
        dp = sharding.data_parallel_size(mesh)
        if self.batch_size % dp or self.micro % dp:
            raise ConfigError(
                f"train.batch_size={self.batch_size} (micro-batch {self.micro}) is not divisible by the data-parallel "
                f"size mesh.data×mesh.fsdp={dp}; make it a multiple of {dp}"
            )
        m = self.model_cfg
        self.dropout = any(getattr(m, f) > 0 for f in ("embd_pdrop", "attn_pdrop", "resid_pdrop"))
        self.attention = attn_lib.resolve_implementation(  # what the training step's attention runs
            m.attention_impl, self.policy, head_dim=m.head_dim, dropout=m.attn_pdrop > 0,
            query_key_layer_scaling=m.query_key_layer_scaling, softcap=m.attn_logit_softcap)

        self.batch_sharding = sharding.batch_sharding(mesh)
        self.abstract_state = jax.eval_shape(self._init, jnp.zeros((), jnp.uint32))
        self.state_sharding = sharding.state_shardings(self.abstract_state, mesh)
        repl = sharding.replicated(mesh)
        self.init = jax.jit(self._init, out_shardings=self.state_sharding)
        knobs = () if self.budget is None else (repl,)  # the budget knobs (see knobs())
        self.train_step = jax.jit(self._train_step, in_shardings=(self.state_sharding, self.batch_sharding, *knobs),
                                  out_shardings=(self.state_sharding, repl), donate_argnums=0)
        self.eval_step = jax.jit(self._eval_step, in_shardings=(self.state_sharding.params, self.batch_sharding),
                                 out_shardings=repl)
        self.stats_step = jax.jit(self._stats_step, in_shardings=(self.state_sharding.params, self.batch_sharding),
                                  out_shardings=repl)

    def knobs(self, f: float | None) -> tuple:
        """The train step's arguments after (state, batch): none without a budget; under one, the budget
        fraction f and the micro-batches to train on (train.batch_ramp), as traced scalars, so a new f
        never recompiles."""
        if self.budget is None:
            return ()
        n = self.batch_size // self.micro
        k = budget_lib.active_micro_batches(f, n, float(self.cfg.train.batch_ramp))
        return ({"fraction": np.asarray(f, precision.FP32), "micro_batches": np.asarray(k, np.int32)},)

    @property
    def flops_per_token(self) -> float:
        m = self.model_cfg
        return telemetry.flops_per_token(self.n_params, m.n_layer, m.n_embd, self.seq_len)

    # --- pure functions (jitted above) ---------------------------------------------------------

    def _init(self, seed) -> TrainState:
        key = jax.random.PRNGKey(seed)
        init_key, dropout_key = jax.random.split(key)
        _, params = model_lib.create(self.model_cfg, self.policy, init_key)
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params), rng=dropout_key,
            loss_scale=precision.loss_scale_init(self.ls_cfg), nonfinite=jnp.zeros((), jnp.int32),
        )

    def _loss(self, params, batch_BT1, key, scale):
        tokens, targets = batch_BT1[:, :-1], batch_BT1[:, 1:]
        with sharding.use_mesh(self.mesh):  # the model's activation layouts (sharding.LOGICAL_RULES)
            nll, log_z = model_lib.token_losses(self.graphdef, params, tokens, targets,
                                                dropout_key=key if self.dropout else None)
        loss = nll.mean()
        # model.z_loss: trained on, not reported (the loss stays the cross-entropy, comparable across runs)
        objective = loss + model_lib.z_loss(log_z, self.model_cfg.z_loss) if self.model_cfg.z_loss else loss
        return objective * scale, loss

    @staticmethod
    def step_key(rng, step, micro_batch):
        """The dropout key of one micro-batch of one step: a pure function of (train.seed's rng, step,
        micro-batch), so a resumed run draws the same masks. The model splits it per layer."""
        return jax.random.fold_in(jax.random.fold_in(rng, step), micro_batch)

    def _grads(self, params, batch, rng, step, scale, active=None):
        """Mean loss and mean (scaled) gradients over the micro-batches of `batch`; with `active` (a traced
        int, train.batch_ramp) over its first `active` micro-batches only, the others not computed."""
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        n = self.batch_size // self.micro
        if n == 1:
            (_, loss), grads = grad_fn(params, batch, self.step_key(rng, step, 0), scale)
            return loss, grads
        # Micro-batch j takes rows j, j+n, j+2n, ...: each one spread over every data-parallel device.
        micro = batch.reshape(self.micro, n, -1).swapaxes(0, 1)
        micro = jax.lax.with_sharding_constraint(micro, sharding.microbatch_sharding(self.mesh))

        def body(carry, xs):
            g_acc, loss_acc = carry
            mb, i = xs
            (_, loss_i), g = grad_fn(params, mb, self.step_key(rng, step, i), scale)
            return (jax.tree.map(jnp.add, g_acc, g), loss_acc + loss_i), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        count = n
        if active is not None:  # the batch ramp: micro-batches past `active` are skipped (lax.cond), not computed
            full_body = body

            def body(carry, xs):
                return jax.lax.cond(xs[1] < active, full_body, lambda c, _: (c, None), carry, xs)

            count = active.astype(precision.FP32)
        (grads, loss), _ = jax.lax.scan(body, (zeros, jnp.zeros((), precision.FP32)), (micro, jnp.arange(n)))
        return loss / count, jax.tree.map(lambda g: g / count, grads)

    def _train_step(self, state: TrainState, batch, knobs: dict | None = None) -> tuple[TrainState, dict]:
        """One update; `knobs` (under a budget, see knobs()) carries the budget fraction and the micro-batch count."""
        scale = state.loss_scale["scale"]
        active = None if knobs is None or self.batch_size == self.micro else knobs["micro_batches"]
        loss, grads = self._grads(state.params, batch, state.rng, state.step, scale, active)
        opt_state_in = state.opt_state
        if knobs is None:  # the lr optax applies: its schedule counts applied updates (skipped ones keep the state)
            lr = self.schedule(state.step - state.nonfinite)
        else:  # under a budget: the learning rate of (step, f), set in AdamW's injected hyperparameters
            lr = float(self.cfg.optim.lr) * budget_lib.lr_factor(self.cfg.optim, state.step, knobs["fraction"])
            opt_state_in = optim.set_lr(opt_state_in, lr)
        with jax.named_scope("optimizer"):  # unscaling, the finite check, clipping, AdamW, the skip
            grads, finite, loss_scale = self._unscale(grads, loss, state.loss_scale)
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = self.tx.update(grads, opt_state_in, state.params)
            params = optax.apply_updates(state.params, updates)
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            new = TrainState(
                step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                rng=state.rng, loss_scale=loss_scale,
                nonfinite=state.nonfinite + (~finite).astype(jnp.int32),
            )
        clip = float(self.cfg.optim.clip_norm)
        with jax.named_scope("metrics"):  # the norms
            metrics = {
                telemetry.LOSS: loss,
                telemetry.LR: lr,
                telemetry.GRAD_NORM: grad_norm,
                telemetry.GRAD_NORM_CLIPPED: jnp.minimum(grad_norm, clip) if clip > 0 else grad_norm,
                telemetry.PARAM_NORM: optax.tree.norm(new.params),
                telemetry.UPDATE_NORM: jnp.where(finite, optax.tree.norm(updates), 0.0),
                telemetry.LOSS_SCALE: scale,
                telemetry.SKIPPED: new.loss_scale["skipped"],
                "finite": finite,
            }
            if knobs is not None:
                metrics[telemetry.BUDGET_FRACTION] = knobs["fraction"]
                metrics[telemetry.MICRO_BATCHES] = knobs["micro_batches"]
        return new, metrics

    def _unscale(self, grads, loss, loss_scale: dict):
        """(unscaled gradients, whether they and the loss are finite, the loss scale's next state). DeepSpeed
        ZeRO-2's order (precision.loss_scale_update_first) checks the scaled gradients and updates the scale
        first, then unscales by the new scale: halved gradients on a step where the scale doubles."""
        cast = lambda s: jax.tree.map(lambda g: (g / s).astype(self.policy.grad_dtype), grads)
        if self.ls_cfg.update_first:
            finite = precision.all_finite(grads) & jnp.isfinite(loss)
            new = precision.loss_scale_update(loss_scale, finite, self.ls_cfg)
            return cast(new["scale"]), finite, new
        unscaled = cast(loss_scale["scale"])
        finite = precision.all_finite(unscaled) & jnp.isfinite(loss)
        return unscaled, finite, precision.loss_scale_update(loss_scale, finite, self.ls_cfg)

    def _eval_step(self, params, batch):
        return self._loss(params, batch, None, 1.0)[1]

    def _stats_step(self, params, batch):
        with sharding.use_mesh(self.mesh):
            _, stats = model_lib.apply(self.graphdef, params, batch[:, :-1], collect_stats=True)
        return stats


@dataclasses.dataclass
class LoopResult:
    state: TrainState
    step: int
    stopped: str | None = None  # why the loop stopped early, if it did
    preempted: bool = False  # stopped by SIGTERM/SIGINT after saving: exit 0, resume later
    budget_spent: bool = False  # stopped because the budget (or the replayed run's steps) ran out


def validation_metrics(trainer: Trainer, params, batches) -> dict[str, float]:
    """The periodic validation during training: mean loss over equally sized batches (global arrays),
    every batch `batches` yields (the run gives train.eval_batches of them, or with 0 the whole
    validation split). ``jaxlm.eval`` is the offline evaluation of saved checkpoints (sliding windows,
    bits per byte)."""
    losses = [trainer.eval_step(params, b) for b in batches]
    if not losses:
        return {}
    loss = float(np.mean(jax.device_get(losses)))
    return {telemetry.EVAL_LOSS: loss, telemetry.EVAL_PERPLEXITY: telemetry.perplexity(loss)}


def _nonfinite_stop(record: dict, step: int, policy: precision.Policy, first_bad: int | None = None) -> str | None:
    """Why a run must stop at this log record, if it must: a non-finite loss, gradient or parameter
    norm outside fp16 (where dynamic loss scaling skips such steps and goes on). The step named is the
    first whose own loss is not finite (telemetry.first_nonfinite_step, jaxlm.ablate's definition),
    else `first_bad`, the first of the record's steps whose gradients were not finite."""
    if policy.is_fp16 or not record:
        return None
    grads_bad = bool(record.get(telemetry.NONFINITE))
    norm_bad = telemetry.PARAM_NORM in record and not np.isfinite(record[telemetry.PARAM_NORM])
    if not (grads_bad or norm_bad):
        return None
    loss_step = telemetry.first_nonfinite_step([{telemetry.STEP: step, **record}])
    if loss_step is not None:
        what = f"non-finite training loss at step {loss_step}"
    elif grads_bad:
        what = f"non-finite gradients at step {first_bad or step} (its loss finite)"
    else:
        what = f"non-finite parameter norm at step {step}"
    if norm_bad and grads_bad:
        what += " and a non-finite parameter norm"
    return (f"{what} in regime {policy.name!r} (no loss scaling outside fp16); the run stops. Lower optim.lr, "
            "check the data and the checkpoint it resumed from, or set train.stop_on_nonfinite=False to continue")


def loop(
    trainer: Trainer,
    state: TrainState,
    batches,
    tele: telemetry.Telemetry,
    *,
    eval_batches: Callable[[], Any] | None = None,
    eval_components: dict[int, Callable[[], Any]] | None = None,
    eval_sets: dict[str, Callable[[Any], dict[str, float]]] | None = None,
    on_step: Callable[[int, TrainState], str | None] | None = None,
    meter: budget_lib.Meter | None = None,
    replay: list[float] | None = None,
) -> LoopResult:
    """Runs steps from state.step to train.steps. `on_step(step, state)` (checkpointing, preemption)
    may return a reason to stop. Host syncs happen only at log/eval/stats steps.

    At every evaluation (train.eval_every; the last step too) the record gets the validation loss
    (`eval_batches`), a mixture's per-component losses (`eval_components`) and, for each named set of
    `eval_sets` (train.eval_sets: name -> params -> {metric: value}), eval/NAME/<metric>.

    Under a budget (`meter`, train.budget): each step trains with the run fraction f reached before
    it, and the loop stops when the meter is done: the budget spent, or its step cap train.max_steps
    reached (train.steps is not read); under a wall clock it waits for every step to finish, so the
    clock charges the steps and nothing else.
    `replay` (train.budget_replay): every step's f, taken from a finished budgeted run; the loop runs
    exactly those steps."""
    cfg = trainer.cfg
    step = int(jax.device_get(state.step))
    if replay is not None:
        total = len(replay)
    elif meter is not None:  # the meter ends the run: the budget, or its step cap (train.max_steps)
        total = math.inf
    else:
        total = cfg.train.steps
    log_every, stats_every, eval_every = cfg.log.every, cfg.log.stats_every, cfg.train.eval_every
    tokens_per_step = trainer.batch_size * trainer.seq_len
    peak = telemetry.peak_tflops(jax.devices()[0].device_kind, trainer.policy, cfg.log.peak_tflops)
    window: list[dict] = []
    t_window = time.perf_counter()  # start of the current log window (excludes logging and eval)
    first_bad = None  # the first step of the window whose gradients were not finite
    while step < total and not (meter is not None and meter.done):
        # --- budget: f of this step, and the clock around the fetch and the step only -------------
        f = replay[step] if replay is not None else meter.fraction if meter is not None else None
        waits = meter is not None and meter.waits
        t0 = meter.clock() if meter is not None else 0.0
        batch = next(batches)
        t_fetch = (meter.clock() - t0) if meter is not None else 0.0
        stats_now = stats_every and (step + 1) % stats_every == 0
        stats = trainer.stats_step(state.params, batch) if stats_now else None  # before the update
        if stats is not None and waits:
            jax.block_until_ready(stats)
        t1 = meter.clock() if meter is not None else 0.0
        knobs = trainer.knobs(f)
        state, metrics = trainer.train_step(state, batch, *knobs)
        if meter is not None:
            if waits:
                jax.block_until_ready(metrics[telemetry.LOSS])
            tokens = int(knobs[0]["micro_batches"]) * trainer.micro * trainer.seq_len
            meter.charge(t_fetch + meter.clock() - t1, tokens * trainer.flops_per_token)
        step += 1
        final = step == total or (meter is not None and meter.done)
        # -------------------------------------------------------------------------------------------
        window.append(metrics)
        record: dict[str, Any] = {}
        if step % log_every == 0 or final:
            host = jax.device_get(window)
            elapsed = time.perf_counter() - t_window
            losses = [float(m[telemetry.LOSS]) for m in host]
            last = host[-1]
            record = {k: float(v) for k, v in last.items() if k != "finite"}
            record[telemetry.LOSS] = float(np.mean(losses))
            record[telemetry.STEP_LOSSES] = losses
            record[telemetry.PERPLEXITY] = telemetry.perplexity(record[telemetry.LOSS])
            record[telemetry.NONFINITE] = int(sum(not m["finite"] for m in host))
            first_bad = next((step - len(host) + 1 + i for i, m in enumerate(host) if not m["finite"]), None)
            record[telemetry.STEP_TIME] = elapsed / len(window)
            n_micro = trainer.batch_size // trainer.micro  # (fewer under train.batch_ramp)
            tps = sum(tokens_per_step * int(m.get(telemetry.MICRO_BATCHES, n_micro)) // n_micro for m in host) / elapsed
            record[telemetry.TOKENS_PER_S] = tps
            record[telemetry.MFU] = telemetry.mfu(tps, trainer.flops_per_token, jax.device_count(), peak)
            record[telemetry.DEVICE_MEMORY] = telemetry.device_memory_gib()
            if telemetry.BUDGET_FRACTION in last:  # under a budget: every step's f and lr, as float32 values
                record[telemetry.STEP_FRACTIONS] = [float(m[telemetry.BUDGET_FRACTION]) for m in host]
                record[telemetry.STEP_LRS] = [float(m[telemetry.LR]) for m in host]
            if meter is not None:  # (and the progress line's: f reached, budget left, ETA)
                record[telemetry.BUDGET_SPENT] = meter.spent
                record[telemetry.TRAIN_TIME] = meter.seconds
                record[telemetry.RUN_FRACTION] = meter.fraction
                record[telemetry.BUDGET_LEFT] = max(meter.budget.total - meter.spent, 0.0)
                eta = meter.eta()
                if eta is not None:
                    record[telemetry.BUDGET_ETA] = eta
            window = []
        if stats is not None:
            s = jax.device_get(stats)
            record.update({telemetry.STATS_METRICS[k]: v for k, v in s.items()})
        if eval_every and (step % eval_every == 0 or final):
            if eval_batches is not None:
                record.update(validation_metrics(trainer, state.params, eval_batches()))
                for i, component in (eval_components or {}).items():  # a mixture's sources, one loss each
                    loss = validation_metrics(trainer, state.params, component()).get(telemetry.EVAL_LOSS)
                    record[telemetry.EVAL_COMPONENT_LOSS.format(i)] = loss
            for name, evaluate in (eval_sets or {}).items():  # train.eval_sets
                record.update({telemetry.EVAL_SET.format(name, k): v for k, v in evaluate(state.params).items()})
        if record:
            tele.log(step, record)
        if not window:
            t_window = time.perf_counter()
        stop = _nonfinite_stop(record, step, trainer.policy, first_bad) if cfg.train.stop_on_nonfinite else None
        if on_step is not None:
            stop = on_step(step, state) or stop
        if stop:
            return LoopResult(state, step, stop)
    ran_out = (replay is not None and step == total) or (meter is not None and meter.done)
    return LoopResult(state, step, None, budget_spent=ran_out)


def abstract_state(trainer: Trainer):
    """The train state as ShapeDtypeStructs carrying the current mesh's shardings (restore target)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        trainer.abstract_state, trainer.state_sharding)
