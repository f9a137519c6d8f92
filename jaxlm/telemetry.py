"""Telemetry: metric names (defined once; reports and tests import them), FLOPs and MFU, sinks.

Sinks, on process 0 only: a console progress bar with ETA, JSON Lines in ``WORKDIR/metrics.jsonl``
(one record per log step), TensorBoard event files in ``WORKDIR/tensorboard/NAME`` (``log.tensorboard``,
on by default: ``tensorboard --logdir runs/``; see tensorboard_sink), and wandb (``log.wandb_mode``:
disabled/offline/online; offline by default so nothing needs a network). ``WORKDIR/run.json`` records
the resolved config, package versions (jaxlm's own too: a pip-installed jaxlm has no git commit), the
jaxlm git commit, devices and mesh, once per run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from jaxlm import budget as budget_lib
from jaxlm import config as config_lib
from jaxlm import files, metrics_file, paths, precision, tensorboard_sink, wandb_sink
from jaxlm.metrics_file import read_metrics, trim_metrics  # noqa: F401 (the reader, as reports and tests name it)

# --- metric names -------------------------------------------------------------------------
STEP = metrics_file.STEP  # "step": the key every record of metrics.jsonl has
LOSS = "train/loss"  # mean over the steps since the last log record
STEP_LOSSES = "train/step_losses"  # every step's loss since the last record (for exact comparisons)
PERPLEXITY = "train/perplexity"
LR = "train/lr"
GRAD_NORM = "train/grad_norm"  # global norm of the unscaled gradient, before clipping
GRAD_NORM_CLIPPED = "train/grad_norm_clipped"  # after clipping
PARAM_NORM = "train/param_norm"
UPDATE_NORM = "train/update_norm"
LOSS_SCALE = "train/loss_scale"  # fp16 dynamic loss scale (1 in other regimes)
SKIPPED = "train/skipped_steps"  # total steps skipped for non-finite gradients
NONFINITE = "train/nonfinite_steps"  # steps since the last record whose loss/gradients were non-finite
STEP_TIME = "perf/step_time_s"
TOKENS_PER_S = "perf/tokens_per_s"
MFU = "perf/mfu"
DEVICE_MEMORY = "perf/device_memory_gib"  # peak bytes in use on device 0, where JAX reports it
COMPILE_TIME = "perf/compile_time_s"
RESID_RMS = "layers/resid_rms"  # per layer (a list), residual stream RMS after the block
ATTN_MAX = "layers/attn_max"  # per layer, max pre-softmax attention score
ATTN_MIN = "layers/attn_min"
LAYER_NONFINITE = "layers/nonfinite"  # per layer, any non-finite score or activation
FP8_AMAX = "layers/fp8_amax"  # fp8 regime, per layer: largest amax of the Linear layers' inputs
FP8_SATURATED = "layers/fp8_saturated"  # ... the worst fraction of an input saturated at e4m3's range
FP8_UNDERFLOW = "layers/fp8_underflow"  # ... the worst fraction of an input's non-zeros flushed to zero
LOGIT_MEAN = "output/logit_mean"  # mean output logit over the vocabulary (at stats steps)
LOG_Z = "output/log_z"  # mean log-partition function log Z of the output softmax (what z-loss pulls to 0)
EVAL_LOSS = "eval/loss"
EVAL_PERPLEXITY = "eval/perplexity"
EVAL_COMPONENT_LOSS = "eval/mix{}/loss"  # data.source=mix:...: the validation loss of component i (format(i))
EVAL_SET = "eval/{}/{}"  # train.eval_sets: a named set's metric, format(NAME, metric), at every evaluation
EVAL_SET_METRICS = {"stream": ("loss", "perplexity", "bits_per_byte"),  # a text scored by sliding windows
                    "lambada": ("accuracy", "perplexity")}  # LAMBADA: last-word accuracy, final-word perplexity
# under a budget (train.budget)
BUDGET_FRACTION = "budget/fraction"  # the budget fraction f the last step trained with
STEP_FRACTIONS = "budget/step_fractions"  # every step's f since the last record (float32 values; replayable)
STEP_LRS = "train/step_lrs"  # every step's learning rate since the last record
MICRO_BATCHES = "budget/micro_batches"  # micro-batches the last step trained on (train.batch_ramp)
BUDGET_SPENT = "budget/spent"  # seconds (wall-clock budget) or FLOPs charged so far
TRAIN_TIME = "budget/train_time_s"  # seconds of training steps so far (compile, eval, saves not counted)
RUN_FRACTION = "budget/run_fraction"  # f reached: the share of the budget or of its step cap, the nearer one
BUDGET_LEFT = "budget/left"  # seconds or FLOPs of the budget not yet spent
BUDGET_ETA = "budget/eta_s"  # training seconds until the run ends (f = 1), at the measured rate

TRAIN_METRICS = (LOSS, STEP_LOSSES, PERPLEXITY, LR, GRAD_NORM, GRAD_NORM_CLIPPED, PARAM_NORM, UPDATE_NORM,
                 LOSS_SCALE, SKIPPED, NONFINITE, STEP_TIME, TOKENS_PER_S, MFU, DEVICE_MEMORY)
LAYER_METRICS = (RESID_RMS, ATTN_MAX, ATTN_MIN, LAYER_NONFINITE)
FP8_LAYER_METRICS = (FP8_AMAX, FP8_SATURATED, FP8_UNDERFLOW)  # the fp8 regime's only
OUTPUT_METRICS = (LOGIT_MEAN, LOG_Z)
# the stats step's names (model.apply(collect_stats=True)) -> metric names
STATS_METRICS = {"resid_rms": RESID_RMS, "attn_max": ATTN_MAX, "attn_min": ATTN_MIN, "nonfinite": LAYER_NONFINITE,
                 "fp8_amax": FP8_AMAX, "fp8_saturated": FP8_SATURATED, "fp8_underflow": FP8_UNDERFLOW,
                 "logit_mean": LOGIT_MEAN, "log_z": LOG_Z}
EVAL_METRICS = (EVAL_LOSS, EVAL_PERPLEXITY)
# Lists of one value per step since the last record (the others are per layer): TensorBoard gets each
# value at its own step, the record at step s holding steps s-n+1 .. s.
PER_STEP_METRICS = (STEP_LOSSES, STEP_LRS, STEP_FRACTIONS)
TENSORBOARD_DIR = "tensorboard"  # under the workdir; a run's events in its subdirectory tensorboard_sink.event_dir


def perplexity(loss: float) -> float:
    """exp(mean loss in nats/token); inf where that overflows a float."""
    return math.exp(loss) if loss < 700 else float("inf")


# --- FLOPs and MFU --------------------------------------------------------------------------

def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token: 6·N + 6·L·d·T.

    6·N: forward (2) + backward (4) multiply-adds of every parameter (N counts all of them,
    embeddings included, as llm.c and MaxText do). 6·L·d·T: attention's QK^T and AV, which are
    2·(2·T·d) per layer forward for a full T×T map, ×3 for fwd+bwd, halved for the causal mask.
    """
    return 6.0 * n_params + 6.0 * n_layer * n_embd * seq_len


# Dense peak TFLOP/s per chip by matmul operand dtype. float32 is true float32, as the fp32 regime
# asks for (Precision.HIGHEST, see precision.Policy.matmul_precision): the CUDA cores' FP32 rate on
# GPUs (not TF32's); on TPUs float32 runs as several bf16 passes, so it is measured against bf16's peak.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
    ("TPU v6", {"bfloat16": 918.0, "float16": 918.0, "float32": 918.0}),
    ("TPU v5p", {"bfloat16": 459.0, "float16": 459.0, "float32": 459.0}),
    ("TPU v5 lite", {"bfloat16": 197.0, "float16": 197.0, "float32": 197.0}),
    ("TPU v5e", {"bfloat16": 197.0, "float16": 197.0, "float32": 197.0}),
    ("TPU v4", {"bfloat16": 275.0, "float16": 275.0, "float32": 275.0}),
)


def peak_tflops(device_kind: str, policy: precision.Policy, override: float = 0.0) -> float | None:
    """Per-chip peak for the policy's compute dtype; None where unknown (e.g. CPU) and not overridden."""
    if override:
        return float(override)
    for key, table in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return table[precision.dtype_name(policy.compute_dtype)]
    return None


def mfu(tokens_per_s: float, flops_token: float, n_devices: int, peak: float | None) -> float | None:
    if not peak:
        return None
    return tokens_per_s * flops_token / (n_devices * peak * 1e12)


def device_memory_gib() -> float | None:
    try:
        s = jax.local_devices()[0].memory_stats()
    except Exception:
        return None
    if not s:
        return None
    return s.get("peak_bytes_in_use", s.get("bytes_in_use", 0)) / 2**30


# --- run metadata -----------------------------------------------------------------------------

def git_commit(repo: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head + ("+dirty" if dirty else "")) if head else "unknown"
    except Exception:
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in ("jaxlm", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "sentencepiece", "tokenizers",
              "safetensors", "ml-collections", "tensorflow-datasets", "wandb"):
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def environment(mesh=None) -> dict[str, Any]:
    devs = jax.devices()
    return {
        "device_kind": devs[0].device_kind, "platform": devs[0].platform, "device_count": len(devs),
        "process_count": jax.process_count(), "host": platform.node(),
        "mesh": dict(mesh.shape) if mesh is not None else None,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return jsonable(np.asarray(x).tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else str(float(x))  # JSON has no inf/nan: "inf", "nan"
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def first_nonfinite_step(records: list[dict]) -> int | None:
    """The one definition of a run's first non-finite step (the loop's stop line, jaxlm.ablate's CLI,
    tables and plots): the first step whose own training loss is not finite, read from every step's
    loss (train/step_losses: record at step S with n losses holds steps S-n+1 .. S), else from a
    record's mean loss (its step). Gradients that overflow while the loss is finite are fp16's skipped
    steps (train/skipped_steps), counted apart."""
    for r in records:
        losses = r.get(STEP_LOSSES)
        if losses:
            for i, x in enumerate(losses):
                if not math.isfinite(float(x)):  # (float() also reads jsonable's "nan"/"inf" strings)
                    return int(r[STEP]) - len(losses) + 1 + i
        elif LOSS in r and r[LOSS] is not None and not math.isfinite(float(r[LOSS])):
            return int(r[STEP])
    return None


def write_run_json(path, meta: dict) -> str | None:
    """Writes run.json when it is missing or its config is not `meta`'s (a resume with another config, an
    edited or damaged file); returns what differed, None when it was missing or the same (kept as is)."""
    path = paths.path(path)
    if not path.exists():
        files.atomic_write_json(path, meta, indent=2, sort_keys=True)
        return None
    try:
        before = json.loads(path.read_text())["config"]
        if before == meta["config"]:
            return None
        old, new = config_lib.flatten(before), config_lib.flatten(meta["config"])
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        changed = f"differed from this run's config in {', '.join(keys[:6])}" + (" ..." if len(keys) > 6 else "")
    except (ValueError, KeyError, TypeError):
        changed = "could not be read as a run's record"
    files.atomic_write_json(path, meta, indent=2, sort_keys=True)
    return changed


# --- sinks ------------------------------------------------------------------------------------

class Telemetry:
    """Receives values and writes them; computes nothing about training."""

    # A workdir on an object store (no appends there): metrics.jsonl is written to a local copy and
    # the whole object uploaded (one atomic PUT) at most this often, at sync() and at close().
    UPLOAD_EVERY_S = 30.0

    def __init__(self, workdir: str | Path, cfg, *, total_steps: int, start_step: int = 0,
                 run_metadata: dict | None = None, is_main: bool | None = None):
        self.workdir = paths.path(workdir)
        self.remote = paths.is_remote(self.workdir)
        self.is_main = jax.process_index() == 0 if is_main is None else is_main
        self.total_steps = total_steps
        self._bar = None
        self._wandb = None
        self._jsonl = None
        self._tb = None
        # log.profile_steps: every process traces its devices (XProf shows each host) into the run's event directory
        local = paths.mirror(self.workdir) if self.remote else self.workdir
        self.tensorboard_dir = tensorboard_sink.event_dir(Path(local) / TENSORBOARD_DIR,
                                                          self.workdir.name or Path(local).resolve().name)
        self.dashboard = None  # the startup line that says how to view the run in TensorBoard
        self._profile = (int(cfg.log.profile_start), int(cfg.log.profile_steps)) if cfg.log.profile_steps else None
        self._tracing = False
        if not self.is_main:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._metrics = self.workdir / "metrics.jsonl"
        # the file appended to: an object store's has a local copy; resuming, records past the restored
        # step will be written again, and lines that are not records are dropped (with a warning)
        metrics = paths.mirror(self.workdir) / "metrics.jsonl" if self.remote else self._metrics
        for warning in metrics_file.resume(self._metrics, metrics, start_step):
            self.message(warning)
        self._local_metrics = metrics
        self._jsonl = open(metrics, "a")
        self._uploaded = 0.0
        self.sync(force=True)  # the trimmed history, before anything new
        if run_metadata is not None and (changed := write_run_json(self.workdir / "run.json", jsonable(run_metadata))):
            self.message(f"warning: {self.workdir / 'run.json'} {changed}; rewritten with this run's config")
        if cfg.log.wandb_mode != "disabled":
            config = dict(jsonable(run_metadata or {}).get("config") or {})
            for key in cfg.log.wandb_keys:  # top-level, for W&B's grouping and parallel coordinates
                config[key.rsplit(".", 1)[-1]] = jsonable(config_lib.get_by_path(cfg, key))
            self._wandb = wandb_sink.WandB(self.workdir, cfg, config)  # starts on a thread
        if cfg.log.tensorboard:
            self._tb = tensorboard_sink.TensorBoard(self.tensorboard_dir, start_step, PER_STEP_METRICS, hparam_metrics=(
                LOSS, EVAL_LOSS), run_metadata=None if run_metadata is None else jsonable(run_metadata))
            self.dashboard = tensorboard_sink.view_line(self.tensorboard_dir, local)
        self._budget = budget_lib.parse(cfg.train.budget) if not cfg.train.budget_replay else None
        if self._budget is not None:  # under a budget the bar counts the run fraction f, in percent
            self._bar = tqdm(total=100, unit="%", dynamic_ncols=True, file=sys.stderr, disable=None,
                             desc=f"train {self.workdir.name}",
                             bar_format="{desc}: f {n:.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
        else:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             file=sys.stderr, disable=None, desc=f"train {self.workdir.name}")
        self._t0, self._step0 = time.time(), start_step

    def log(self, step: int, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        rec = {STEP: int(step), "time": time.time(), **jsonable(record)}
        self._jsonl.write(json.dumps(rec) + "\n")
        self._jsonl.flush()
        self.sync()
        if self._wandb is not None:
            self._wandb.log(int(step), {k: v for k, v in rec.items() if k not in (STEP, "time", STEP_LOSSES)})
        if self._tb is not None:
            self._tb.log(int(step), {k: v for k, v in rec.items() if k not in (STEP, "time")})
        if self._bar is not None and self._bar.disable and LOSS in rec:  # no terminal: one line per record
            done = int(step) - self._step0
            eta = (time.time() - self._t0) / max(done, 1) * (self.total_steps - int(step))
            parts = [f"step {int(step)}/{self.total_steps}", f"loss {rec[LOSS]:.4f}" if isinstance(rec[LOSS], float)
                     else f"loss {rec[LOSS]}"]
            if self._budget is not None and RUN_FRACTION in rec:  # the budget decides the end, and the ETA
                parts[0] = f"step {int(step)}"
                parts.append(budget_progress(self._budget, rec))
                eta = rec.get(BUDGET_ETA, float("nan"))
            if EVAL_LOSS in rec:
                parts.append(f"eval {rec[EVAL_LOSS]:.4f}" if isinstance(rec[EVAL_LOSS], float) else f"eval {rec[EVAL_LOSS]}")
            if rec.get(TOKENS_PER_S):
                parts.append(f"{rec[TOKENS_PER_S]:,.0f} tok/s")
            if rec.get(SKIPPED):
                parts.append(f"skipped {int(rec[SKIPPED])}")
            parts.append(f"eta {eta:,.0f}s" if math.isfinite(eta) else "eta ?")
            print("  ".join(parts), file=sys.stderr, flush=True)
        elif self._bar is not None and LOSS in rec:
            self._bar.n = int(step)
            post = {"loss": f"{rec[LOSS]:.4f}" if isinstance(rec[LOSS], float) else rec[LOSS]}
            if self._budget is not None and RUN_FRACTION in rec:
                self._bar.n = round(100 * rec[RUN_FRACTION], 1)
                post = {"step": int(step), **post, "budget": budget_progress(self._budget, rec).split(" · ", 1)[1]}
            if rec.get(TOKENS_PER_S):
                post["tok/s"] = f"{rec[TOKENS_PER_S]:,.0f}"
            if rec.get(LOSS_SCALE, 1.0) != 1.0:
                post["scale"] = f"{rec[LOSS_SCALE]:.0f}"
            self._bar.set_postfix(post, refresh=False)
            self._bar.refresh()

    def on_step(self, step: int, state) -> None:
        """After step `step`: starts the log.profile_steps trace after step log.profile_start, stops it
        once that many steps have run (waiting for them: dispatch is asynchronous)."""
        if self._profile is None:
            return
        first, n = self._profile
        if step == first and not self._tracing:
            jax.block_until_ready(state)
            jax.profiler.start_trace(str(self.tensorboard_dir))
            self._tracing = True
        elif self._tracing and step >= first + n:
            self._stop_trace(state)

    def _stop_trace(self, state=None) -> None:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        self._tracing = False
        self.message(f"profile: {self._profile[1]} steps traced into {self.tensorboard_dir / 'plugins' / 'profile'} "
                     "(tensorboard --logdir: the Profile tab)")

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def sync(self, force: bool = False) -> None:
        """Remote workdir: upload metrics.jsonl (whole, one atomic object write) if UPLOAD_EVERY_S has
        passed or `force` (the run forces it at every checkpoint save, so a resumed run's history is
        never shorter than its checkpoint). Local: nothing to do (every record is flushed)."""
        if force and self._tb is not None:
            self._tb.flush()
        if not (self.remote and self.is_main and self._jsonl is not None):
            return
        if force or time.time() - self._uploaded >= self.UPLOAD_EVERY_S:
            files.atomic_write(self._metrics, self._local_metrics.read_bytes())
            self._uploaded = time.time()

    def close(self) -> None:
        if self._tracing:  # (a run that ended inside the profiled steps)
            self._stop_trace()
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self.sync(force=True)
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            if summary := self._tb.close():  # how many values were non-finite: one line, if any
                self.message(summary)
            self._tb = None


def budget_progress(b: budget_lib.Budget, rec: dict) -> str:
    """The progress line's budget part, from a record: ``f 0.47 · 48 s left``."""
    left = rec[BUDGET_LEFT]
    left = f"{left:,.0f} s left" if b.kind == "time" else f"{left:.3g} FLOPs left"
    return f"f {rec[RUN_FRACTION]:.2f} · {left}"
