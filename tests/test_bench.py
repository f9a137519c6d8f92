"""The throughput harness's output format (never its timings)."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_bench_writes_a_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "-m", "jaxlm.bench", "--config=configs/tiny.py", "--regimes=fp32,fp16_upcast", "--steps=2",
         "--warmup=1", f"--out={out}", "--batch_per_device=4", "--config.train.seq_len=32",
         "--config.model.n_positions=32", "--config.model.remat=dots"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0, res.stderr[-3000:]
    header = next(line for line in res.stdout.splitlines() if line.startswith("regime"))
    for col in ("attn", "compile s", "step ms", "tokens/s", "MFU", "/ceiling", "step GiB", "peak GiB"):
        assert col in header
    assert "batch 4 x 32 tokens; remat dots; deterministic ops on" in res.stdout
    d = json.loads(out.read_text())
    assert "--xla_gpu_deterministic_ops=true" in d["environment"]["xla_flags"]  # tiny.py keeps train.deterministic
    assert d["flops_formula"] == "6*N + 6*L*d*T per token" and d["matmul_ceiling_tflops"] > 0
    assert [r["regime"] for r in d["results"]] == ["fp32", "fp16_upcast"]
    for r in d["results"]:
        assert r["tokens_per_s"] > 0 and r["compile_s"] > 0 and r["batch"] == 4 and r["seq_len"] == 32
        assert r["attention"] == "reference" and r["remat"] == "dots" and r["step_memory_gib"] > 0
        assert r["mfu"] is None  # CPU: no peak in the table, and none given
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        assert d["baseline"] is None
    else:
        assert d["baseline"]["tokens_per_s"] > 0 and "vs torch" in header
        assert "HF GPT2LMHeadModel, vocab 1024" in res.stdout


def test_bench_rejects_an_unknown_regime_before_timing_anything():
    res = subprocess.run([sys.executable, "-m", "jaxlm.bench", "--config=configs/tiny.py", "--regimes=bf16,fp8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 1 and "error: precision.regime: unknown regime 'fp8'" in res.stderr
    assert "Traceback" not in res.stderr and "bf16:" not in res.stdout


def test_a_regime_out_of_memory_is_reported_and_the_others_still_run(monkeypatch):
    import jax

    from jaxlm import bench, config

    cfg = config.load(ROOT / "configs" / "tiny.py")

    def fake(cfg, regime, steps, warmup, peak, batch):
        if regime == "fp32":
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.00GiB.")
        return {"regime": regime, "tokens_per_s": 1.0}

    monkeypatch.setattr(bench, "time_regime", fake)
    res = bench.time_regimes(cfg, ["fp32", "bf16"], 1, 0, 0.0, 64)
    assert res[0]["regime"] == "fp32" and res[0]["error"].startswith("out of memory at batch 64: RESOURCE_EXHAUSTED")
    assert res[1] == {"regime": "bf16", "tokens_per_s": 1.0}
    assert "fp32          out of memory at batch 64" in bench.table(res[:1], None, 1.0)
