"""Training throughput per precision regime, with a PyTorch/Hugging Face baseline on the same device.

    python -m jaxlm.bench --config=configs/gpt2_small.py --regimes=bf16,fp16_upcast,fp16,fp32 \
        [--steps=20] [--out=bench.json] [--config.train.batch_size=16]

For each regime: compile time, steady-state step time (median of --steps synchronised steps after
--warmup), tokens/s, MFU (``telemetry.flops_per_token``: 6·N + 6·L·d·T, over the device's peak from
``telemetry.PEAK_TFLOPS`` or --peak_tflops), peak device memory where JAX reports it, and the MFU
as a fraction of a measured matmul ceiling (one large matmul timed in the same process). Batches
are synthetic tokens (the input pipeline has its own benchmark: ``python -m jaxlm.data.bench``).

When torch and transformers import, the same shape and batch run as HF ``GPT2LMHeadModel``
(SDPA attention, AdamW; on CUDA bf16 autocast, fused AdamW and torch.compile), and the table
gives jaxlm/baseline tokens/s. The batch is ``train.micro_batch_size`` (or ``train.batch_size``).
Peak memory is the process's high-water mark so far: regimes run in the order given.
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxlm import config as config_lib
from jaxlm import sharding, telemetry, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file.")
_REGIMES = flags.DEFINE_list("regimes", ["bf16", "fp16_upcast", "fp16", "fp32"], "Precision regimes to time.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per regime.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")
_BASELINE = flags.DEFINE_bool("baseline", True, "Also time the PyTorch/HF baseline when importable.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Override the per-device peak TFLOP/s used for MFU.")


def matmul_ceiling_tflops(dtype=jnp.bfloat16, n: int | None = None, reps: int = 10) -> float:
    """TFLOP/s of one large square matmul on device 0: what this chip really delivers."""
    if n is None:
        n = 8192 if jax.default_backend() != "cpu" else 1024
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e12


def time_regime(cfg, regime: str, steps: int, warmup: int, peak_override: float) -> dict:
    cfg = config_lib.with_overrides(cfg, {"precision.regime": regime})
    batch_size = cfg.train.micro_batch_size or cfg.train.batch_size
    cfg.train.batch_size, cfg.train.micro_batch_size = batch_size, 0
    vocab = cfg.model.vocab_size or cfg.data.vocab_size
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = train.Trainer(cfg, mesh, vocab)
    batch = jax.device_put(
        np.random.RandomState(0).randint(0, vocab, (batch_size, cfg.train.seq_len + 1)).astype(np.int32),
        trainer.batch_sharding)
    state = trainer.init(jnp.uint32(0))
    t = time.perf_counter()
    compiled = trainer.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    for _ in range(warmup):
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tps = batch_size * cfg.train.seq_len / step_s
    peak = telemetry.peak_tflops(jax.devices()[0].device_kind, trainer.policy, peak_override)
    return {
        "regime": regime, "params": trainer.n_params, "batch": batch_size, "seq_len": cfg.train.seq_len,
        "compile_s": compile_s, "step_s": step_s, "tokens_per_s": tps,
        "tflops_per_device": tps * trainer.flops_per_token / jax.device_count() / 1e12,
        "mfu": telemetry.mfu(tps, trainer.flops_per_token, jax.device_count(), peak),
        "peak_memory_gib": telemetry.device_memory_gib(), "final_loss": float(m[telemetry.LOSS]),
    }


def torch_baseline(cfg, steps: int, warmup: int) -> dict | None:
    """HF GPT2LMHeadModel, same shape and batch; None if torch/transformers are not importable."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    m = cfg.model
    vocab = m.vocab_size or cfg.data.vocab_size
    batch_size = cfg.train.micro_batch_size or cfg.train.batch_size
    hf_cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=m.n_positions, n_embd=m.n_embd, n_layer=m.n_layer,
                                     n_head=m.n_head, embd_pdrop=m.embd_pdrop, attn_pdrop=m.attn_pdrop,
                                     resid_pdrop=m.resid_pdrop, bos_token_id=0, eos_token_id=0)
    hf_cfg._attn_implementation = "sdpa"
    model = transformers.GPT2LMHeadModel(hf_cfg).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    step_fn = model
    compiled = False
    if cuda:
        try:
            step_fn = torch.compile(model)
            compiled = True
        except Exception:
            step_fn = model
    x = torch.randint(0, vocab, (batch_size, cfg.train.seq_len + 1), device=dev)

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
            loss = step_fn(x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t = time.perf_counter()
    step()
    first_s = time.perf_counter() - t
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
    return {"regime": "torch " + ("bf16 autocast" if cuda else "fp32"), "compiled": compiled,
            "first_step_s": first_s, "step_s": step_s, "tokens_per_s": batch_size * cfg.train.seq_len / step_s,
            "torch": torch.__version__, "transformers": transformers.__version__}


def table(results: list[dict], baseline: dict | None, ceiling: float) -> str:
    head = f"{'regime':<14}{'compile s':>10}{'step ms':>10}{'tokens/s':>12}{'TFLOP/s':>9}{'MFU':>8}{'/ceiling':>9}{'mem GiB':>9}"
    if baseline:
        head += f"{'vs torch':>9}"
    rows = [head]
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        row = (f"{r['regime']:<14}{r['compile_s']:>10.1f}{r['step_s'] * 1e3:>10.1f}{r['tokens_per_s']:>12,.0f}"
               f"{r['tflops_per_device']:>9.2f}{mfu:>8}{r['tflops_per_device'] / ceiling:>9.1%}{mem:>9}")
        if baseline:
            row += f"{r['tokens_per_s'] / baseline['tokens_per_s']:>8.2f}x"
        rows.append(row)
    if baseline:
        rows.append(f"{baseline['regime']:<14}{'':>10}{baseline['step_s'] * 1e3:>10.1f}{baseline['tokens_per_s']:>12,.0f}"
                    f"   (HF GPT2LMHeadModel, SDPA{', torch.compile' if baseline['compiled'] else ''})")
    return "\n".join(rows)


def main(argv):
    del argv
    if _CONFIG.value is None:
        raise app.UsageError("--config is required")
    cfg = _CONFIG.value
    config_lib.validate(cfg)
    dev = jax.devices()[0]
    ceiling = matmul_ceiling_tflops(jnp.bfloat16 if dev.platform != "cpu" else jnp.float32)
    print(f"device: {jax.device_count()} x {dev.device_kind}; measured matmul ceiling {ceiling:.1f} TFLOP/s per device")
    results = []
    for regime in _REGIMES.value:
        results.append(time_regime(cfg, regime, _STEPS.value, _WARMUP.value, _PEAK.value))
        print(f"  {regime}: {results[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    baseline = torch_baseline(cfg, _STEPS.value, _WARMUP.value) if _BASELINE.value else None
    print(table(results, baseline, ceiling))
    if _OUT.value:
        out = {"device_kind": dev.device_kind, "device_count": jax.device_count(), "matmul_ceiling_tflops": ceiling,
               "flops_formula": "6*N + 6*L*d*T per token", "config": config_lib.to_dict(cfg),
               "results": results, "baseline": baseline, "versions": telemetry.package_versions()}
        with open(_OUT.value, "w") as f:
            json.dump(telemetry.jsonable(out), f, indent=2)


if __name__ == "__main__":
    app.run(main)
