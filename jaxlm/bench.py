"""Training throughput per precision regime, with a PyTorch/Hugging Face baseline on the same device.

    python -m jaxlm.bench --config=configs/gpt2_small.py --regimes=bf16,fp16_upcast,fp16,fp32 \
        [--batch_per_device=16] [--steps=20] [--out=bench.json] [--config.model.remat=dots] [--config.*=...]

For each regime: compile time, steady-state step time (median of --steps synchronised steps after
--warmup), tokens/s, MFU (``telemetry.flops_per_token``: 6·N + 6·L·d·T, over the device's peak from
``telemetry.PEAK_TFLOPS`` or --peak_tflops), the step's device memory as XLA planned it (arguments,
outputs and temporaries of the compiled step, per regime), the process's peak device memory where
JAX reports it (a high-water mark: regimes run in the order given), and the throughput as a
fraction of a measured matmul ceiling (one large matmul in the regime's compute dtype, timed in the same process). The step
is the training step exactly (``train.Trainer``: the config's attention, remat, dropout and
``train.deterministic``, whose XLA flag is set as ``jaxlm.main`` sets it) on one micro-batch of
--batch_per_device sequences per device; batches are synthetic tokens (the input pipeline has its
own benchmark: ``python -m jaxlm.data.bench``). Each regime's row is printed, and --out rewritten,
as soon as it is measured, so a run cut short keeps what it measured. --profile=DIR also traces
3 steps per regime and prints where the device time goes, by model part and by op (``jaxlm.profiling``).

Where torch imports, PyTorch baselines run the same shape and per-device batch on one device
(``jaxlm.bench_torch``): HF ``GPT2LMHeadModel`` with the config's dropout rates (SDPA attention; on CUDA
bf16 autocast, fused AdamW and torch.compile), and a minimal nanoGPT-style GPT-2 with jaxlm's math, eager
and under ``torch.compile`` where that works (one line says when it does not). On CPU they are timed in
the same process interleaved with each regime's step (--rounds rounds, each contender in turn, the
order rotated per round; medians), and the table and the ``ratios`` line give jaxlm/baseline tokens/s
per device. On CUDA they run first and are freed before JAX's backend starts (it takes 75% of the GPU).
--shape runs a named shape without a config file (SHAPES: the CPU bench shape and nanoGPT's two CPU
shapes, on configs/tiny.py unless --config is given; --config.* overrides win over the shape's keys).
--compile_only reports each regime's memory plan instead.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from jaxlm import bench_torch, cli, files, profiling, sharding, telemetry, train
from jaxlm import config as config_lib

# Named shapes (--shape): config overrides and the per-device batch. "bench" is the CPU bench shape of
# issue 41 and PERFORMANCE.md (d 256, 4 layers, vocab 8192, 8 x 256 tokens, fp32, no dropout); the nanoGPT
# ones are its README's CPU "baby GPT" and train_shakespeare_char.py's 6 x 384 (dropout 0.2) at batch 8,
# on its 65 characters (jaxlm pads the table to 128 rows, model.vocab_multiple), lr 1e-3, beta2 0.99.
_NANOGPT = {"model.vocab_size": 65, "data.vocab_size": 65, "precision.regime": "fp32", "optim.lr": 1e-3,
            "optim.b2": 0.99, "optim.weight_decay": 0.1, "optim.clip_norm": 1.0}
SHAPES = {
    "bench": ({"model.n_embd": 256, "model.n_layer": 4, "model.n_head": 4, "model.n_positions": 256,
               "model.vocab_size": 8192, "data.vocab_size": 8192, "train.seq_len": 256, "precision.regime": "fp32",
               **{f"model.{k}_pdrop": 0.0 for k in ("embd", "attn", "resid")}}, 8),
    "nanogpt_baby": ({**_NANOGPT, "model.n_embd": 128, "model.n_layer": 4, "model.n_head": 4, "model.n_positions": 64,
                      "train.seq_len": 64, **{f"model.{k}_pdrop": 0.0 for k in ("embd", "attn", "resid")}}, 12),
    "nanogpt_6x384": ({**_NANOGPT, "model.n_embd": 384, "model.n_layer": 6, "model.n_head": 6, "model.n_positions": 256,
                       "train.seq_len": 256, **{f"model.{k}_pdrop": 0.2 for k in ("embd", "attn", "resid")}}, 8),
}


def define_flags():
    cli.define_config("config", "A config file, e.g. configs/gpt2_small.py (with --shape: configs/tiny.py if not given).")
    flags.DEFINE_enum("shape", None, list(SHAPES), "A named shape (bench.SHAPES) over the config; sets the batch "
                      "unless --batch_per_device is given.")
    flags.DEFINE_integer("rounds", 5, "CPU: interleaved rounds of jaxlm and the torch baselines (--steps split over them).")
    flags.DEFINE_bool("torch_compile", True, "Also time the nanoGPT-style baseline under torch.compile where it works.")
    flags.DEFINE_list("regimes", ["bf16", "fp16_upcast", "fp16", "fp32"], "Precision regimes to time.")
    flags.DEFINE_integer("steps", 20, "Timed steps per regime.")
    flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
    flags.DEFINE_string("out", None, "Write the results as JSON here.")
    flags.DEFINE_bool("baseline", True, "Also time the PyTorch baselines (HF, nanoGPT-style) when importable.")
    flags.DEFINE_bool("compile_only", False, "Compile each regime's step and report XLA's planned memory "
                      "(arguments, outputs, temporaries) without running it: a memory plan on any machine.")
    flags.DEFINE_float("peak_tflops", 0.0, "Override the per-device peak TFLOP/s used for MFU.")
    flags.DEFINE_string("profile", None, "Also trace 3 steps per regime into DIR/<regime> (jax.profiler) "
                        "and print where the device time goes (jaxlm.profiling); DIR/<regime>.txt.")
    flags.DEFINE_string("hlo_dir", None, "Also write each regime's compiled step as HLO text to DIR/<regime>.hlo.txt "
                        "(e.g. to look for fp8 GEMMs: cuBLASLt f8 custom calls).")
    flags.DEFINE_integer("batch_per_device", 16, "Sequences per device per step (no accumulation); "
                         "0 = the config's train.micro_batch_size, else train.batch_size.")


def matmul_ceiling_tflops(policy, n: int | None = None, reps: int = 10) -> float:
    """TFLOP/s of one large square matmul on device 0 in `policy`'s compute dtype and matmul precision:
    what this chip really delivers for that regime's matmuls."""
    if n is None:
        n = 8192 if jax.default_backend() != "cpu" else 1024
    a = jax.random.normal(jax.random.key(0), (n, n), policy.compute_dtype)
    f = jax.jit(lambda x: jnp.matmul(x, x, precision=policy.matmul_precision))
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e12


def global_batch(cfg, per_device: int) -> int:
    """The benchmark's global batch: per_device × devices, or the config's micro-batch (or batch)."""
    return per_device * jax.device_count() if per_device else cfg.train.micro_batch_size or cfg.train.batch_size


def interleave(contenders, steps: int, rounds: int) -> dict[str, list[float]]:
    """Seconds of each of `steps` synchronised steps per contender ((name, step) pairs), taken in `rounds`
    rounds of steps/rounds steps each, every contender in turn, the order rotated each round (so none
    always runs first or right after another's burst)."""
    per, times = max(1, -(-steps // max(1, rounds))), {name: [] for name, _ in contenders}
    for r in range(max(1, rounds)):
        for name, step in contenders[r % len(contenders):] + contenders[:r % len(contenders)]:
            for _ in range(min(per, steps - len(times[name]))):
                t = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t)
    return times


def time_regime(cfg, regime: str, steps: int, warmup: int, peak_override: float, batch_size: int,
                profile_dir: str | None = None, hlo_dir: str | None = None, rivals=(), rounds: int = 1) -> dict:
    """One regime's row; with `rivals` (bench_torch.Steppers) its steps are timed interleaved with theirs."""
    cfg = config_lib.with_overrides(cfg, {"precision.regime": regime})
    cfg.train.batch_size, cfg.train.micro_batch_size = batch_size, 0
    vocab = cfg.model.vocab_size or cfg.data.vocab_size
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = train.Trainer(cfg, mesh, vocab)
    batch = jax.device_put(
        np.random.RandomState(0).randint(0, vocab, (batch_size, cfg.train.seq_len + 1)).astype(np.int32),
        trainer.batch_sharding)
    state = trainer.init(jnp.uint32(0))
    t = time.perf_counter()
    knobs = trainer.knobs(1.0)  # under a train.budget: the full batch (none otherwise)
    compiled = trainer.train_step.lower(state, batch, *knobs).compile()
    compile_s = time.perf_counter() - t
    step_memory = _planned_memory_gib(compiled)
    if hlo_dir:
        files.atomic_write(Path(hlo_dir) / f"{regime}.hlo.txt", compiled.as_text())
    for _ in range(warmup):
        state, _ = compiled(state, batch, *knobs)
    jax.block_until_ready(state)  # also with --warmup=0
    for rival in rivals:
        for _ in range(warmup):
            rival.step()
    box = {"state": state}

    def step():
        box["state"], box["m"] = compiled(box["state"], batch, *knobs)
        jax.block_until_ready(box["m"])

    times = interleave([("jaxlm", step)] + [(r.name, r.step) for r in rivals], steps, rounds if rivals else 1)
    state, m = box["state"], box["m"]
    step_s = statistics.median(times["jaxlm"])
    tps = batch_size * cfg.train.seq_len / step_s
    peak = telemetry.peak_tflops(jax.devices()[0].device_kind, trainer.policy, peak_override)
    profile = None
    if profile_dir:
        summary = profiling.profile_step(compiled, state, batch, steps=3, trace_dir=Path(profile_dir) / regime)
        text = f"{regime}: " + profiling.report(summary, step_s * 1e3)
        print(text, flush=True)
        (Path(profile_dir) / f"{regime}.txt").write_text(text + "\n")
        profile = {"busy_ms": summary["busy_ms"], "parts": summary["parts"], "top_ops": summary["ops"][:20],
                   "categories": profiling.by_category(summary)}
    return {
        "regime": regime, "params": trainer.n_params, "batch": batch_size, "seq_len": cfg.train.seq_len,
        "attention": trainer.attention, "remat": cfg.model.remat,
        "compile_s": compile_s, "step_s": step_s, "tokens_per_s": tps,
        "tflops_per_device": tps * trainer.flops_per_token / jax.device_count() / 1e12,
        "mfu": telemetry.mfu(tps, trainer.flops_per_token, jax.device_count(), peak),
        "step_memory_gib": step_memory, "peak_memory_gib": telemetry.device_memory_gib(),
        "final_loss": float(m[telemetry.LOSS]), "profile": profile,
        "baselines": {r.name: r.summary(times[r.name]) for r in rivals}, "rounds": rounds if rivals else 1,
        # one large matmul in the regime's compute dtype: what this chip delivers for that dtype
        "matmul_ceiling_tflops": matmul_ceiling_tflops(trainer.policy),
    }


def plan_regime(cfg, regime: str, batch_size: int) -> dict:
    """The compiled step's memory plan without running it (abstract inputs: nothing is allocated)."""
    cfg = config_lib.with_overrides(cfg, {"precision.regime": regime})
    cfg.train.batch_size, cfg.train.micro_batch_size = batch_size, 0
    vocab = cfg.model.vocab_size or cfg.data.vocab_size
    trainer = train.Trainer(cfg, sharding.make_mesh(cfg.mesh), vocab)
    batch = jax.ShapeDtypeStruct((batch_size, cfg.train.seq_len + 1), jnp.int32, sharding=trainer.batch_sharding)
    t = time.perf_counter()
    compiled = trainer.train_step.lower(train.abstract_state(trainer), batch, *trainer.knobs(1.0)).compile()
    m = compiled.memory_analysis()
    return {"regime": regime, "params": trainer.n_params, "batch": batch_size, "seq_len": cfg.train.seq_len,
            "attention": trainer.attention, "remat": cfg.model.remat, "loss_chunk": cfg.model.loss_chunk,
            "compile_s": time.perf_counter() - t, "step_memory_gib": _planned_memory_gib(compiled),
            "temp_memory_gib": m.temp_size_in_bytes / 2**30, "backend": jax.default_backend()}


def time_regimes(cfg, regimes, steps: int, warmup: int, peak_override: float, batch_size: int,
                 on_result=None, profile_dir: str | None = None, hlo_dir: str | None = None, rivals=(),
                 rounds: int = 1) -> list[dict]:
    """time_regime for each regime; one that runs out of device memory is reported, not fatal.
    `on_result(results)` is called after each regime (the table row and the JSON are written as
    they come, so a run cut short keeps what it measured)."""
    results = []
    for regime in regimes:
        try:
            results.append(time_regime(cfg, regime, steps, warmup, peak_override, batch_size, profile_dir, hlo_dir,
                                       **({"rivals": rivals, "rounds": rounds} if rivals else {})))
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            results.append({"regime": regime, "batch": batch_size, "seq_len": cfg.train.seq_len,
                            "error": f"out of memory at batch {batch_size}: {str(e).splitlines()[0][:300]}"})
            print(f"  {regime}: out of memory (try a smaller --batch_per_device or --config.model.remat=dots)",
                  flush=True)
        if on_result is not None:
            on_result(results)
    return results


def _planned_memory_gib(compiled) -> float | None:
    """Device memory of one compiled step as XLA's buffer assignment planned it (per device)."""
    try:
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    except Exception:  # not every backend reports it
        return None
    return total / 2**30


def table(results: list[dict], baselines: list[dict] | None, n_devices: int = 1) -> str:
    """The header, a row per result and a row per baseline (`baselines`: Stepper summaries)."""
    names = [b["name"] for b in baselines or []]
    return "\n".join([_header(names)] + [_row(r, names, n_devices) for r in results]
                     + [_baseline_row(b, names) for b in baselines or []])


RIVAL_LABELS = {"hf": "HF", "eager": "eager", "compiled": "compiled"}


def _columns(names):
    cols = [("regime", 14, "<"), ("attn", 10, "<"), ("compile s", 10, ">"), ("step ms", 10, ">"),
            ("tokens/s", 12, ">"), ("TFLOP/s", 9, ">"), ("MFU", 8, ">"), ("/ceiling", 9, ">"),
            ("step GiB", 9, ">"), ("peak GiB", 9, ">")]
    return cols + [(f"vs {RIVAL_LABELS[n]}", 12, ">") for n in names]


def _line(cells, names) -> str:
    return "".join(f"{c:{a}{w}}" for c, (_, w, a) in zip(cells, _columns(names)))


def _header(names) -> str:
    return _line([name for name, _, _ in _columns(names)], names)


def ratios(r: dict, n_devices: int, baselines: list[dict] | None = None) -> dict[str, float]:
    """jaxlm's tokens/s per device over each baseline's: the ones timed interleaved with this row where
    there are (CPU), else `baselines` (timed on their own, before JAX started: CUDA)."""
    own = r.get("baselines") or {b["name"]: b for b in baselines or []}
    return {n: r["tokens_per_s"] / n_devices / b["tokens_per_s"] for n, b in own.items()}


def _row(r: dict, names, n_devices: int, baselines: list[dict] | None = None) -> str:
    if "error" in r:
        return f"{r['regime']:<14}{r['error'][:100]}"
    gib = lambda v: f"{v:.1f}" if v is not None else "n/a"
    cells = [r["regime"], r["attention"], f"{r['compile_s']:.1f}", f"{r['step_s'] * 1e3:.1f}",
             f"{r['tokens_per_s']:,.0f}", f"{r['tflops_per_device']:.2f}",
             f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a", f"{r['tflops_per_device'] / r['matmul_ceiling_tflops']:.1%}",
             gib(r["step_memory_gib"]), gib(r["peak_memory_gib"])]
    vs = ratios(r, n_devices, baselines)
    return _line(cells + [f"{vs[n]:.2f}x" if n in vs else "n/a" for n in names], names)


def _ratios_line(r: dict, n_devices: int, baselines: list[dict] | None) -> str:
    vs = ratios(r, n_devices, baselines)
    how = (f"same run, {r['rounds']} interleaved rounds, medians" if r.get("baselines")
           else "baselines timed before JAX started")
    return (f"ratios {r['regime']} ({how}): "
            + "  ".join(f"jaxlm/{RIVAL_LABELS[n]} {v:.2f}x" for n, v in vs.items()))


def _baseline_row(b: dict, names) -> str:
    what = f"{b['model']}, vocab {b['vocab_size']}{', torch.compile' if b['compiled'] else ''}"
    return (_line([b["regime"], "sdpa", f"{b['first_step_s']:.1f}", f"{b['step_s'] * 1e3:.1f}",
                   f"{b['tokens_per_s']:,.0f}"], names) + f"   {what}")


def resolve(F):
    """(config, per-device batch, regimes) from --config and --shape: the shape's keys under the user's
    --config.* overrides; its batch unless --batch_per_device is given; fp32 unless --regimes is."""
    if F.shape is None:
        cli.require(config=F.config)
        return F.config, F.batch_per_device, F.regimes
    cfg = F.config if F.config is not None else config_lib.load(Path(__file__).parent / "configs" / "tiny.py")
    explicit = F["config"].override_values if F.config is not None else {}
    overrides, batch = SHAPES[F.shape]
    cfg = config_lib.with_overrides(cfg, {k: v for k, v in overrides.items() if k not in explicit})
    return (cfg, F.batch_per_device if F["batch_per_device"].present else batch,
            F.regimes if F["regimes"].present else ["fp32"])


def main(argv):
    F = cli.FLAGS
    cfg, per_device, regimes = resolve(F)
    config_lib.validate(cfg)
    for regime in regimes:  # a typo fails now, not after the first regimes ran
        config_lib.policy(config_lib.with_overrides(cfg, {"precision.regime": regime}))
    xla_flags = config_lib.set_xla_flags(cfg)  # before the backend starts, as jaxlm.main does
    if F.compile_only:
        batch = global_batch(cfg, per_device)
        results = []
        for regime in regimes:
            r = plan_regime(cfg, regime, batch)
            results.append(r)
            print(f"{regime}: batch {batch} x {cfg.train.seq_len}, loss_chunk {r['loss_chunk']}, remat {r['remat']}, "
                  f"attention {r['attention']} on {r['backend']}: step memory {r['step_memory_gib']:.2f} GiB, "
                  f"of which temporaries {r['temp_memory_gib']:.2f} GiB (compiled in {r['compile_s']:.0f} s)", flush=True)
            if F.out:
                files.atomic_write_json(F.out, telemetry.jsonable({"environment": telemetry.environment(),
                                                                   "results": results}), indent=2)
        return
    # The baselines are built (one step each) before JAX's backend starts, on one device. On CUDA they
    # are also timed and freed first: JAX preallocates most of the GPU, which would leave torch a
    # quarter of it. On CPU they are timed interleaved with each regime's steps.
    rivals, separate = [], []
    if F.baseline:
        rivals = bench_torch.make(cfg, per_device or global_batch(cfg, 0), nanogpt_compiled=F.torch_compile)
        if any(r.cuda for r in rivals):
            separate = [r.time(F.steps, F.warmup) for r in rivals]
            bench_torch.release(rivals)
            for b in separate:
                print(f"  {b['regime']} ({b['model']}, one device): {b['tokens_per_s']:,.0f} tokens/s", flush=True)
    names = [r.name for r in rivals] or [b["name"] for b in separate]
    dev = jax.devices()[0]
    batch = global_batch(cfg, per_device)
    m = cfg.model
    print(f"device: {jax.device_count()} x {dev.device_kind}; load average {os.getloadavg()[0]:.2f}")
    print(f"{'shape ' + F.shape + ': ' if F.shape else ''}d {m.n_embd} x {m.n_layer} layers, {m.n_head} heads, "
          f"vocab {m.vocab_size or cfg.data.vocab_size}, dropout {m.embd_pdrop}/{m.attn_pdrop}/{m.resid_pdrop}, "
          f"loss_chunk {m.loss_chunk}; batch {batch} x {cfg.train.seq_len} tokens; remat {m.remat}; deterministic ops "
          f"{'on' if cfg.train.deterministic else 'off'}; XLA_FLAGS={xla_flags or '(none)'}", flush=True)
    print(_header(names), flush=True)

    def summaries(results):
        own = [r for r in results if r.get("baselines")]
        return list(own[-1]["baselines"].values()) if own else separate

    def on_result(results):  # the table's rows and the JSON as they come: a run cut short keeps them
        print(_row(results[-1], names, jax.device_count(), separate), flush=True)
        if F.out:
            bs = summaries(results)
            out = {"environment": telemetry.environment(),
                   "flops_formula": "6*N + 6*L*d*T per token", "config": config_lib.to_dict(cfg), "shape": F.shape,
                   "results": results, "baseline": next((b for b in bs if b["name"] == "hf"), None),
                   "baselines": bs, "load_average": os.getloadavg(), "versions": telemetry.package_versions()}
            files.atomic_write_json(F.out, telemetry.jsonable(out), indent=2)

    results = time_regimes(cfg, regimes, F.steps, F.warmup, F.peak_tflops, batch, on_result, F.profile, F.hlo_dir,
                           rivals, F.rounds)
    for b in summaries(results):
        print(_baseline_row(b, names))
    for r in results:
        if "error" not in r and names:
            print(_ratios_line(r, jax.device_count(), separate), flush=True)


if __name__ == "__main__":
    cli.run(main, define_flags)
