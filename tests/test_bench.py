"""The throughput harness's output format (never its timings)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT


@pytest.mark.slow
def test_bench_writes_a_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "-m", "jaxlm.bench", "--config=configs/tiny.py", "--regimes=fp32,fp16_upcast", "--steps=2",
         "--warmup=1", "--notorch_compile", f"--out={out}", f"--profile={tmp_path / 'prof'}", f"--hlo_dir={tmp_path / 'hlo'}",
         "--batch_per_device=4", "--config.train.seq_len=32", "--config.model.n_positions=32", "--config.model.remat=dots"],
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
        # --hlo_dir: the compiled step itself, as launch/gpu_check.sh reads it for fp8 GEMMs
        assert (tmp_path / "hlo" / f"{r['regime']}.hlo.txt").read_text().startswith("HloModule jit__train_step")
    assert "ms per step in host-run ops" in res.stdout
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        assert d["baseline"] is None
    else:
        assert d["baseline"]["tokens_per_s"] > 0 and "vs HF" in header and "vs eager" in header
        assert "HF GPT2LMHeadModel, vocab 1024" in res.stdout


@pytest.mark.slow
def test_bench_rejects_an_unknown_regime_before_timing_anything():
    res = subprocess.run([sys.executable, "-m", "jaxlm.bench", "--config=configs/tiny.py", "--regimes=bf16,fp4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 1 and "error: --config.precision.regime=fp4: unknown regime 'fp4'" in res.stderr
    assert "Traceback" not in res.stderr and "bf16:" not in res.stdout


def test_a_regime_out_of_memory_is_reported_and_the_others_still_run(monkeypatch):
    import jax

    from jaxlm import bench, config

    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py")

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


# --- jaxlm.throughput: the collective census and the paper model --------------------------------------------------

HLO_SAMPLE = "\n".join([
    "%all-reduce.3 = (f32[3,4,16]{2,1,0}, f32[1024,64]{1,0}, f32[]) all-reduce(%a, %b, %c), channel_id=1, "
    "replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}, use_global_device_ids=true, to_apply=%add",
    "%all-gather.2 = bf16[64,256]{1,0} all-gather(%w), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}",
    "%all-gather-start = (bf16[16,256]{1,0}, bf16[64,256]{1,0}) all-gather-start(%w2), replica_groups={{0,1,2,3},{4,5,6,7}}",
    "%all-gather-done = bf16[64,256]{1,0} all-gather-done(%all-gather-start)",
    "%reduce-scatter.1 = f32[8,64]{1,0} reduce-scatter(%g), replica_groups={}, dimensions={0}, to_apply=%add",
    "%collective-permute.1 = s32[10]{0} collective-permute(%x), source_target_pairs={{0,1},{1,0}}",
    "%fusion.9 = f32[1024,64]{1,0} fusion(%all-reduce.3), kind=kLoop, calls=%fused",  # not a collective
])


def test_collective_census_counts_bytes_and_ring_traffic_by_hand():
    from jaxlm import throughput

    c = throughput.census(HLO_SAMPLE, n_devices=8)
    ar = (3 * 4 * 16 + 1024 * 64 + 1) * 4  # a tuple: every element, f32
    assert c["all-reduce"] == {"count": 1, "result_bytes": ar, "moved_bytes": 2 * 7 / 8 * ar}  # group of 8 (mesh axis_0)
    ag = 64 * 256 * 2  # bf16; the async start's (operand, result) tuple counts the result once
    assert c["all-gather"] == {"count": 2, "result_bytes": 2 * ag, "moved_bytes": 2 * 3 / 4 * ag}  # groups of 4
    assert c["reduce-scatter"] == {"count": 1, "result_bytes": 8 * 64 * 4, "moved_bytes": 7 * 8 * 64 * 4}  # {} = all 8
    assert c["collective-permute"] == {"count": 1, "result_bytes": 40, "moved_bytes": 40.0}


def test_throughput_model_bounds_by_hand():
    from jaxlm import throughput

    mib = 2**20
    row = {"per_device_batch": 16, "seq_len": 1024, "flops_per_token": 1e9, "n_params": 1e8, "n_embd": 768,
           "n_layer": 12, "mesh_axes": {"data": 1, "fsdp": 8, "tensor": 1},
           "collectives": {"all-gather": {"moved_bytes": 200 * mib}, "all-reduce": {"moved_bytes": 400 * mib}}}
    tokens = 16 * 1024
    # activations 3·34·d·L and fp32 logits 16·V per token; 36 B per held parameter + FSDP's gathered reads
    hbm = tokens * (3 * 34 * 768 * 12 + 16 * 1000) + 36 * 1e8 / 8 + 8 * 1e8
    assert throughput.hbm_bytes(row, vocab=1000) == hbm
    e = throughput.expected(row, "TPU v5p", vocab=1000, eta=0.5)
    assert abs(e["t_math_ms"] - tokens * 1e9 / (459e12 * 0.5) * 1e3) < 1e-9
    assert abs(e["t_hbm_ms"] - hbm / 2765e9 * 1e3) < 1e-9
    assert e["moved_mib"] == 200 + 400 / 2  # FSDP: the CPU's all-reduce is a reduce-scatter on the chip
    assert abs(e["t_comm_ms"] - 400 * mib / 600e9 * 1e3) < 1e-9
    step = max(e["t_math_ms"], e["t_hbm_ms"])
    assert abs(e["tokens_per_s_overlapped"] - tokens / step * 1e3) < 1e-6
    assert abs(e["tokens_per_s_exposed"] - tokens / (step + e["t_comm_ms"]) * 1e3) < 1e-6
    row["mesh_axes"]["fsdp"] = 1  # DP: an all-reduce is an all-reduce, and every chip holds the whole state
    assert throughput.expected(row, "TPU v5p", vocab=1000, eta=0.5)["moved_mib"] == 600
    assert throughput.hbm_bytes(row, vocab=1000) == tokens * (3 * 34 * 768 * 12 + 16 * 1000) + 36 * 1e8
    # the H100 anchor: llm.c's ~468K tokens/s per H100 for gpt2_small is 38% MFU by the same FLOPs/token
    gpt2_small = 6 * 124_439_808 + 6 * 12 * 768 * 1024
    assert abs(468e3 * gpt2_small / 989e12 - throughput.ANCHORS["H100 x8"]) < 0.005


CENSUS_TINY = """
import jax, json
jax.config.update("jax_platforms", "cpu"); jax.config.update("jax_num_cpu_devices", 8)
import numpy as np
from jaxlm import config, throughput
cfg = config.load("configs/tiny.py", {"train.seq_len": 32, "model.n_positions": 64, "data.vocab_size": 1000})
out = {}
for mesh in ("dp", "fsdp"):
    compiled, tr = throughput.compile_step(cfg, throughput.MESHES[mesh], 2)
    params = jax.tree_util.tree_flatten_with_path(tr.abstract_state.params)[0]
    specs = jax.tree.leaves(tr.state_sharding.params, is_leaf=lambda s: hasattr(s, "spec"))
    out[mesh] = {"census": throughput.census(compiled.as_text(), 8),
                 "params": [[jax.tree_util.keystr(p), list(a.shape), a.dtype.itemsize, "fsdp" in str(s.spec)]
                            for (p, a), s in zip(params, specs)]}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_collective_census_of_a_compiled_step_matches_a_hand_count():
    """Tiny GPT-2 (d 64, 2 layers, vocab padded to 1024, 64 positions, 32 used) on 8 simulated devices.
    DP: one fused gradient all-reduce: every parameter's fp32 gradient, the tied token table twice
    (its head and embedding parts are reduced before they are summed), the position table only for
    the 32 positions used, plus scalars. FSDP: each fsdp-sharded weight gathered once, whole."""
    res = subprocess.run([sys.executable, "-c", CENSUS_TINY], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    size = lambda shape, itemsize: int(np.prod(shape)) * itemsize
    params = {name: (shape, item, fsdp) for name, shape, item, fsdp in out["dp"]["params"]}
    wte, wpe = params["['wte']['embedding']"], params["['wpe']['embedding']"]
    assert wte[0] == [1024, 64] and wpe[0] == [64, 64]
    unused_wpe = size([64 - 32, 64], 4)
    total = sum(size(s, i) for s, i, _ in params.values())
    dp = out["dp"]["census"]
    assert list(dp) == ["all-reduce"] and dp["all-reduce"]["count"] == 1
    hand = total + size(wte[0], 4) - unused_wpe
    assert hand <= dp["all-reduce"]["result_bytes"] <= hand + 64, (hand, dp)
    fsdp = out["fsdp"]["census"]
    gathered = sum(size(s, i) for name, s, i, f in out["fsdp"]["params"] if f) - unused_wpe
    assert fsdp["all-gather"]["result_bytes"] == gathered, (gathered, fsdp)
    assert fsdp["all-gather"]["count"] == sum(f for *_, f in out["fsdp"]["params"])
    assert abs(fsdp["all-gather"]["moved_bytes"] - 7 / 8 * gathered) < 1e-6


def test_profile_categories_split_gemm_attention_loss_and_optimizer_without_loop_spans():
    from jaxlm import profiling

    step = "jit(_train_step)/"
    op = lambda ms, part, kind, name: {"ms": ms, "part": part, "kind": kind, "op_name": step + name}
    summary = {"ops": [
        op(4.0, "head bwd", "__ynn_fusion", "transpose(jvp(loss))/while/body/head/btd,vd->btv/dot_general"),
        op(3.0, "mlp fwd", "dot", "jvp(mlp)/dot_general"),
        op(2.0, "attn/core fwd", "__ynn_fusion", "jvp(attn)/core/bthk,bshk->bhts/dot_general"),
        op(1.0, "loss fwd", "kLoop", "jvp(loss)/while/body/reduce_max"),
        op(0.5, "optimizer", "kLoop", "optimizer/mul"),
        op(0.25, "mlp fwd", "kLoop", "jvp(mlp)/tanh"),
        op(9.0, "loss fwd", "while", "jvp(loss)/while"),  # the scan's own span: its body's ops are above
    ]}
    assert profiling.by_category(summary) == {"GEMM": 7.0, "attention core": 2.0, "softmax/loss": 1.0,
                                              "optimizer": 0.5, "other": 0.25}
