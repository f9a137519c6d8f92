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

When torch and transformers import, the same shape and per-device batch run first, on one device,
as HF ``GPT2LMHeadModel`` with the config's dropout rates (SDPA attention, with its dropout when
attn_pdrop > 0; AdamW; on CUDA bf16 autocast, fused AdamW and torch.compile), and the table gives
jaxlm/baseline tokens/s per device. --compile_only reports each regime's memory plan instead.
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from jaxlm import cli, files, profiling, sharding, telemetry, train
from jaxlm import config as config_lib


def define_flags():
    cli.define_config("config", "A config file, e.g. configs/gpt2_small.py.")
    flags.DEFINE_list("regimes", ["bf16", "fp16_upcast", "fp16", "fp32"], "Precision regimes to time.")
    flags.DEFINE_integer("steps", 20, "Timed steps per regime.")
    flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
    flags.DEFINE_string("out", None, "Write the results as JSON here.")
    flags.DEFINE_bool("baseline", True, "Also time the PyTorch/HF baseline when importable.")
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


def time_regime(cfg, regime: str, steps: int, warmup: int, peak_override: float, batch_size: int,
                profile_dir: str | None = None, hlo_dir: str | None = None) -> dict:
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
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = compiled(state, batch, *knobs)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tps = batch_size * cfg.train.seq_len / step_s
    peak = telemetry.peak_tflops(jax.devices()[0].device_kind, trainer.policy, peak_override)
    profile = None
    if profile_dir:
        summary = profiling.profile_step(compiled, state, batch, steps=3, trace_dir=Path(profile_dir) / regime)
        text = f"{regime}: " + profiling.report(summary, step_s * 1e3)
        print(text, flush=True)
        (Path(profile_dir) / f"{regime}.txt").write_text(text + "\n")
        profile = {"busy_ms": summary["busy_ms"], "parts": summary["parts"], "top_ops": summary["ops"][:20]}
    return {
        "regime": regime, "params": trainer.n_params, "batch": batch_size, "seq_len": cfg.train.seq_len,
        "attention": trainer.attention, "remat": cfg.model.remat,
        "compile_s": compile_s, "step_s": step_s, "tokens_per_s": tps,
        "tflops_per_device": tps * trainer.flops_per_token / jax.device_count() / 1e12,
        "mfu": telemetry.mfu(tps, trainer.flops_per_token, jax.device_count(), peak),
        "step_memory_gib": step_memory, "peak_memory_gib": telemetry.device_memory_gib(),
        "final_loss": float(m[telemetry.LOSS]), "profile": profile,
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
                 on_result=None, profile_dir: str | None = None, hlo_dir: str | None = None) -> list[dict]:
    """time_regime for each regime; one that runs out of device memory is reported, not fatal.
    `on_result(results)` is called after each regime (the table row and the JSON are written as
    they come, so a run cut short keeps what it measured)."""
    results = []
    for regime in regimes:
        try:
            results.append(time_regime(cfg, regime, steps, warmup, peak_override, batch_size, profile_dir, hlo_dir))
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


def torch_baseline(cfg, steps: int, warmup: int, batch_size: int) -> dict | None:
    """HF GPT2LMHeadModel, same shape and batch; None if torch/transformers are not importable."""
    try:
        import torch  # test-only and optional: the baseline runs where it is installed
        import transformers  # likewise
    except ImportError:
        return None
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    m = cfg.model
    vocab = m.vocab_size or cfg.data.vocab_size
    hf_cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=m.n_positions, n_embd=m.n_embd, n_layer=m.n_layer,
                                     n_head=m.n_head, embd_pdrop=m.embd_pdrop, attn_pdrop=m.attn_pdrop,
                                     resid_pdrop=m.resid_pdrop, bos_token_id=0, eos_token_id=0)
    hf_cfg._attn_implementation = "sdpa"
    model = transformers.GPT2LMHeadModel(hf_cfg).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    forward = torch.compile(model) if cuda else model
    x = torch.randint(0, vocab, (batch_size, cfg.train.seq_len + 1), device=dev)

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
            loss = forward(x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t = time.perf_counter()
    try:
        step()  # torch.compile compiles here, at the first call
    except Exception as e:  # where it does not work, the eager model is the baseline
        if forward is model:
            raise
        print(f"  torch.compile failed ({type(e).__name__}: {str(e)[:200]}); timing the eager model", flush=True)
        forward = model
        opt.zero_grad(set_to_none=True)
        step()
    first_s = time.perf_counter() - t
    compiled = forward is not model
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    model = opt = forward = None  # freed before JAX starts
    if cuda:  # hand the memory back before JAX starts: JAX takes 75% of the GPU when its backend starts
        gc.collect()
        torch.cuda.empty_cache()
    return {"regime": "torch " + ("bf16 autocast" if cuda else "fp32"), "compiled": compiled,
            "first_step_s": first_s, "step_s": step_s, "tokens_per_s": batch_size * cfg.train.seq_len / step_s,
            "peak_memory_gib": peak_gib, "vocab_size": vocab, "torch": torch.__version__,
            # the recipe's dropout, as the jaxlm rows run it (SDPA drops attention probabilities in-kernel)
            "dropout": {"embd": m.embd_pdrop, "attn": m.attn_pdrop, "resid": m.resid_pdrop},
            "transformers": transformers.__version__}


def table(results: list[dict], baseline: dict | None, n_devices: int = 1) -> str:
    """The header, a row per result and the baseline's row."""
    return "\n".join([_header(baseline)] + [_row(r, baseline, n_devices) for r in results]
                     + ([_baseline_row(baseline)] if baseline else []))


def _columns(baseline):
    cols = [("regime", 14, "<"), ("attn", 10, "<"), ("compile s", 10, ">"), ("step ms", 10, ">"),
            ("tokens/s", 12, ">"), ("TFLOP/s", 9, ">"), ("MFU", 8, ">"), ("/ceiling", 9, ">"),
            ("step GiB", 9, ">"), ("peak GiB", 9, ">")]
    if baseline:
        cols.append(("vs torch", 9, ">"))
    return cols


def _line(cells, baseline) -> str:
    return "".join(f"{c:{a}{w}}" for c, (_, w, a) in zip(cells, _columns(baseline)))


def _header(baseline) -> str:
    return _line([name for name, _, _ in _columns(baseline)], baseline)


def _row(r: dict, baseline: dict | None, n_devices: int) -> str:
    if "error" in r:
        return f"{r['regime']:<14}{r['error'][:100]}"
    gib = lambda v: f"{v:.1f}" if v is not None else "n/a"
    cells = [r["regime"], r["attention"], f"{r['compile_s']:.1f}", f"{r['step_s'] * 1e3:.1f}",
             f"{r['tokens_per_s']:,.0f}", f"{r['tflops_per_device']:.2f}",
             f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a", f"{r['tflops_per_device'] / r['matmul_ceiling_tflops']:.1%}",
             gib(r["step_memory_gib"]), gib(r["peak_memory_gib"])]
    if baseline:
        cells.append(f"{r['tokens_per_s'] / n_devices / baseline['tokens_per_s']:.2f}x")  # per device
    return _line(cells, baseline)


def _baseline_row(baseline: dict) -> str:
    return (_line([baseline["regime"], "sdpa", f"{baseline['first_step_s']:.1f}", f"{baseline['step_s'] * 1e3:.1f}",
                   f"{baseline['tokens_per_s']:,.0f}"], baseline)
            + f"   HF GPT2LMHeadModel, vocab {baseline['vocab_size']}{', torch.compile' if baseline['compiled'] else ''}")


def main(argv):
    F = cli.FLAGS
    cli.require(config=F.config)
    cfg = F.config
    config_lib.validate(cfg)
    for regime in F.regimes:  # a typo fails now, not after the first regimes ran
        config_lib.policy(config_lib.with_overrides(cfg, {"precision.regime": regime}))
    xla_flags = config_lib.set_xla_flags(cfg)  # before the backend starts, as jaxlm.main does
    if F.compile_only:
        batch = global_batch(cfg, F.batch_per_device)
        results = []
        for regime in F.regimes:
            r = plan_regime(cfg, regime, batch)
            results.append(r)
            print(f"{regime}: batch {batch} x {cfg.train.seq_len}, loss_chunk {r['loss_chunk']}, remat {r['remat']}, "
                  f"attention {r['attention']} on {r['backend']}: step memory {r['step_memory_gib']:.2f} GiB, "
                  f"of which temporaries {r['temp_memory_gib']:.2f} GiB (compiled in {r['compile_s']:.0f} s)", flush=True)
            if F.out:
                files.atomic_write_json(F.out, telemetry.jsonable({"environment": telemetry.environment(),
                                                                   "results": results}), indent=2)
        return
    # The baseline runs first, on one device: JAX preallocates most of the GPU when its backend
    # starts, which would leave torch a quarter of it.
    baseline = None
    if F.baseline:
        baseline = torch_baseline(cfg, F.steps, F.warmup, F.batch_per_device or global_batch(cfg, 0))
    if baseline:
        print(f"  {baseline['regime']} (HF baseline, one device): {baseline['tokens_per_s']:,.0f} tokens/s", flush=True)
    dev = jax.devices()[0]
    batch = global_batch(cfg, F.batch_per_device)
    print(f"device: {jax.device_count()} x {dev.device_kind}")
    print(f"batch {batch} x {cfg.train.seq_len} tokens; remat {cfg.model.remat}; deterministic ops "
          f"{'on' if cfg.train.deterministic else 'off'}; XLA_FLAGS={xla_flags or '(none)'}", flush=True)
    print(_header(baseline), flush=True)

    def on_result(results):  # the table's rows and the JSON as they come: a run cut short keeps them
        print(_row(results[-1], baseline, jax.device_count()), flush=True)
        if F.out:
            out = {"environment": telemetry.environment(),
                   "flops_formula": "6*N + 6*L*d*T per token", "config": config_lib.to_dict(cfg),
                   "results": results, "baseline": baseline, "versions": telemetry.package_versions()}
            files.atomic_write_json(F.out, telemetry.jsonable(out), indent=2)

    time_regimes(cfg, F.regimes, F.steps, F.warmup, F.peak_tflops, batch, on_result, F.profile, F.hlo_dir)
    if baseline:
        print(_baseline_row(baseline))


if __name__ == "__main__":
    cli.run(main, define_flags)
