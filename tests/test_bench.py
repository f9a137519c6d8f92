"""The throughput harness's output format (never its timings)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_bench_writes_a_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "-m", "jaxlm.bench", "--config=configs/tiny.py", "--regimes=fp32,fp16_upcast", "--steps=2",
         "--warmup=1", f"--out={out}", f"--profile={tmp_path / 'prof'}", "--batch_per_device=4", "--config.train.seq_len=32",
         "--config.model.n_positions=32", "--config.model.remat=dots"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0, res.stderr[-3000:]
    header = next(line for line in res.stdout.splitlines() if line.startswith("regime"))
    for col in ("attn", "compile s", "step ms", "tokens/s", "MFU", "/ceiling", "step GiB", "peak GiB"):
        assert col in header
    assert "batch 4 x 32 tokens; remat dots; deterministic ops on" in res.stdout
    d = json.loads(out.read_text())
    assert "--xla_gpu_deterministic_ops=true" in d["environment"]["xla_flags"]  # tiny.py keeps train.deterministic
    assert d["flops_formula"] == "6*N + 6*L*d*T per token"
    assert all(r["matmul_ceiling_tflops"] > 0 for r in d["results"])
    assert [r["regime"] for r in d["results"]] == ["fp32", "fp16_upcast"]
    for r in d["results"]:
        assert r["tokens_per_s"] > 0 and r["compile_s"] > 0 and r["batch"] == 4 and r["seq_len"] == 32
        assert r["attention"] == "reference" and r["remat"] == "dots" and r["step_memory_gib"] > 0
        assert r["mfu"] is None  # CPU: no peak in the table, and none given
        # --profile: the step's op time, split over the model's parts forward and backward
        prof = r["profile"]
        assert {"attn/core fwd", "attn/core bwd", "mlp fwd", "mlp bwd", "head fwd", "optimizer"} <= set(prof["parts"])
        assert abs(sum(prof["parts"].values()) - prof["busy_ms"]) <= 1e-6 * prof["busy_ms"] and prof["busy_ms"] > 0
        assert (tmp_path / "prof" / f"{r['regime']}.txt").read_text().startswith(f"{r['regime']}: ")
    assert "ms per step in host-run ops" in res.stdout
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        assert d["baseline"] is None
    else:
        assert d["baseline"]["tokens_per_s"] > 0 and "vs torch" in header
        assert "HF GPT2LMHeadModel, vocab 1024" in res.stdout


@pytest.mark.slow
def test_bench_rejects_an_unknown_regime_before_timing_anything():
    res = subprocess.run([sys.executable, "-m", "jaxlm.bench", "--config=configs/tiny.py", "--regimes=bf16,fp4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 1 and "error: precision.regime: unknown regime 'fp4'" in res.stderr
    assert "Traceback" not in res.stderr and "bf16:" not in res.stdout


def test_a_regime_out_of_memory_is_reported_and_the_others_still_run(monkeypatch):
    import jax

    from jaxlm import bench, config

    cfg = config.load(ROOT / "configs" / "tiny.py")

    def fake(cfg, regime, steps, warmup, peak, batch, profile_dir=None, hlo_dir=None):
        if regime == "fp32":
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.00GiB.")
        return {"regime": regime, "tokens_per_s": 1.0}

    monkeypatch.setattr(bench, "time_regime", fake)
    res = bench.time_regimes(cfg, ["fp32", "bf16"], 1, 0, 0.0, 64)
    assert res[0]["regime"] == "fp32" and res[0]["error"].startswith("out of memory at batch 64: RESOURCE_EXHAUSTED")
    assert res[1] == {"regime": "bf16", "tokens_per_s": 1.0}
    assert "fp32          out of memory at batch 64" in bench.table(res[:1], None)


def test_profile_parts_follow_the_named_scopes():
    from jaxlm import profiling

    step = "jit(_train_step)/"
    assert profiling.part_of(step + "transpose(jvp(attn))/core/bhts,bshk->bthk/dot_general") == "attn/core bwd"
    assert profiling.part_of(step + "jvp(attn)/dot_general") == "attn fwd"
    assert profiling.part_of(step + "jvp(mlp)/tanh") == "mlp fwd"
    assert profiling.part_of(step + "transpose(jvp(head))/btd,vd->btv/dot_general") == "head bwd"
    assert profiling.part_of(step + "optimizer/jit(_where)/select_n") == "optimizer"
    assert profiling.part_of("") == profiling.part_of("state.params['h'][0]['attn']['c_attn']['kernel']") == "other"


def test_profile_of_a_gpu_trace_counts_stream_kernels_once(tmp_path):
    """The shape of a GPU trace: kernels on the device's stream lines carry their hlo_op; a module
    line spans them and host threads launch them. Only the stream kernels count."""
    import gzip
    import json

    from jaxlm import profiling

    hlo = "\n".join([
        "HloModule jit__train_step, entry_computation_layout={()->()}",
        '  %fusion.1 = f32[8]{0} fusion(%p), kind=kLoop, calls=%f1, metadata={op_name="jit(_train_step)/jvp(mlp)/tanh"}',
        '  %custom-call.2 = (bf16[8]{0}, u8[0]{0}) custom-call(%a, %b), custom_call_target="__cudnn$fmhaSoftmax", '
        'metadata={op_name="jit(_train_step)/jvp(attn)/core/dot_product_attention"}',
    ])
    M = lambda pid, tid, kind, name: {"ph": "M", "pid": pid, "tid": tid, "name": kind, "args": {"name": name}}
    X = lambda pid, tid, name, dur, **args: {"ph": "X", "pid": pid, "tid": tid, "ts": 0, "dur": dur, "name": name,
                                             "args": args}
    events = [M(1, 0, "process_name", "/device:GPU:0"), M(1, 7, "thread_name", "Stream #7(Compute)"),
              M(1, 9, "thread_name", "XLA Modules"), M(2, 0, "process_name", "/host:CPU"),
              X(1, 7, "loop_tanh_kernel", 300.0, hlo_op="fusion.1", hlo_module="jit__train_step"),
              X(1, 7, "cudnn_fmha_kernel", 900.0, hlo_op="custom-call.2", hlo_module="jit__train_step"),
              X(1, 7, "memset", 30.0),
              X(1, 7, "other_module_kernel", 5000.0, hlo_op="fusion.1", hlo_module="jit_something_else"),
              X(1, 9, "jit__train_step", 1500.0, hlo_module="jit__train_step"),
              X(2, 3, "fusion.1", 999.0, hlo_op="fusion.1", hlo_module="jit__train_step")]
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = profiling.summarize(tmp_path, hlo, steps=3)
    assert s["device_events"] and abs(s["busy_ms"] - 1.23 / 3) < 1e-9
    assert {k: round(v * 3, 6) for k, v in s["parts"].items()} == {"attn/core fwd": 0.9, "mlp fwd": 0.3,
                                                                    "unattributed": 0.03}
    assert s["ops"][0]["kind"] == "__cudnn$fmhaSoftmax" and s["ops"][1]["kind"] == "kLoop"
