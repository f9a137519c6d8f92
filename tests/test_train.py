"""Training: sharded steps equal one device, loss scaling, gradient accumulation, the quickstart."""

import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config, precision, sharding, telemetry, train
from jaxlm import run as run_lib
from jaxlm.errors import ConfigError

from conftest import ROOT

HELPERS = ROOT / "tests" / "helpers"


def _cfg(**over):
    """Tiny model, no warmup (so step 0 moves), and Adam eps 1e-3: with the default 1e-8 Adam's
    first steps are ~lr·sign(g), which turns 1e-9 summation-order noise on near-zero gradients
    into lr-sized parameter differences; comparisons of two equal computations need a smooth update."""
    base = {"train.batch_size": 16, "train.seq_len": 32, "model.n_positions": 64, "optim.warmup_steps": 0,
            "optim.eps": 1e-3}
    base.update(over)
    return config.load(ROOT / "jaxlm" / "configs" / "tiny.py", base)


def _batch(cfg, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randint(0, cfg.data.vocab_size, (cfg.train.batch_size, cfg.train.seq_len + 1)).astype(np.int32)


def _trainer(cfg):
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    return train.Trainer(cfg, mesh, vocab_size=cfg.data.vocab_size)


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.mark.slow
def test_sharded_steps_equal_one_device():
    out = subprocess.run([sys.executable, str(HELPERS / "sharded_step.py")], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["reference"]["params_moved"] > 1e-3  # the steps really changed the parameters
    # c_attn kernel (D, 3, H, K) = (64, 3, 4, 16): fsdp splits D, tensor splits whole heads
    expected_shards = {"DP=8": [64, 3, 4, 16], "FSDP=8": [8, 3, 4, 16], "TP=2xDP=4": [64, 3, 2, 16],
                       "FSDP=2xTP=4": [32, 3, 1, 16]}
    for name, shard in expected_shards.items():
        r = res[name]
        assert r["loss_diff"] <= 1e-5 and r["param_diff"] <= 1e-5, (name, r)
        assert r["shard_shapes"]["c_attn"] == shard, (name, r["shard_shapes"])
        # Megatron + ZeRO-3 communication only: weights gathered, partial sums and gradients reduced.
        # No activation is resharded (all-to-all, permute) and none is computed for the global batch
        # and then reduced -- what the compiler did before jaxlm constrained activation layouts.
        counts = r["collectives"]["counts"]
        assert "all-to-all" not in counts and "collective-permute" not in counts, (name, counts)
        assert r["collectives"]["global_batch"] == [], (name, r["collectives"])
    assert res["DP=8"]["collectives"]["counts"] == {"all-reduce": 1}  # one fused gradient all-reduce
    assert "not divisible by the data-parallel size mesh.data×mesh.fsdp=8" in res["indivisible_batch_error"]


@pytest.mark.slow  # 5-15 s: the fast lane stays short
def test_gradient_accumulation_equals_one_big_batch():
    cfg = _cfg()
    batch = _batch(cfg)
    results = []
    for micro in (0, 4):
        cfg.train.micro_batch_size = micro
        tr = _trainer(cfg)
        state = tr.init(np.uint32(1))
        for _ in range(2):
            state, m = tr.train_step(state, jnp.asarray(batch))
        results.append((float(m[telemetry.LOSS]), _host(state.params)))
    (l0, p0), (l1, p1) = results
    assert abs(l0 - l1) <= 1e-5
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)))
    assert diff <= 1e-5


@pytest.mark.slow  # 5-15 s: the fast lane stays short
def test_fp16_overflow_skips_the_update_halves_the_scale_and_doubles_after_the_window():
    # A loss scale of 2^100 makes the fp16 backward pass overflow: a real non-finite gradient.
    cfg = _cfg(**{"precision.regime": "fp16", "precision.loss_scale_init": 2.0**100,
                  "precision.loss_scale_hysteresis": 1, "precision.loss_scale_window": 3})
    tr = _trainer(cfg)
    state = tr.init(np.uint32(0))
    before = _host(state.params), _host(state.opt_state)
    batch = jnp.asarray(_batch(cfg))
    state, m = tr.train_step(state, batch)
    assert not bool(m["finite"]) and int(m[telemetry.SKIPPED]) == 1
    assert float(state.loss_scale["scale"]) == 2.0**99
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((_host(state.params), _host(state.opt_state)))):
        np.testing.assert_array_equal(a, b)  # nothing moved, not even Adam's count
    # a sane scale: three clean steps, then it doubles
    state = state.replace(loss_scale=dict(state.loss_scale, scale=jnp.float32(2.0**10)))
    scales = []
    for _ in range(3):
        state, m = tr.train_step(state, batch)
        assert bool(m["finite"])
        scales.append(float(state.loss_scale["scale"]))
    assert scales == [2.0**10, 2.0**10, 2.0**11]
    assert int(state.loss_scale["skipped"]) == 1


def test_loss_scale_hysteresis_follows_deepspeed():
    c = precision.LossScaleConfig(init=2.0**16, window=1000, hysteresis=2, minimum=2.0**14)
    s = precision.loss_scale_init(c)
    f, t = jnp.bool_(False), jnp.bool_(True)
    s = precision.loss_scale_update(s, f, c)  # first overflow: absorbed by the hysteresis
    assert float(s["scale"]) == 2.0**16 and int(s["skipped"]) == 1
    s = precision.loss_scale_update(s, f, c)  # second: halves
    assert float(s["scale"]) == 2.0**15
    s = precision.loss_scale_update(s, f, c)  # hysteresis stays used up until the next doubling
    s = precision.loss_scale_update(s, f, c)
    assert float(s["scale"]) == 2.0**14  # and never below the minimum
    s = precision.loss_scale_update(s, t, c)
    assert int(s["good_steps"]) == 1 and int(s["skipped"]) == 4


@pytest.mark.slow  # 5-15 s: the fast lane stays short
def test_nonfinite_loss_outside_fp16_stops_the_run(tmp_path):
    # initializer_range 1e20 overflows fp32 attention scores at the first step.
    cfg = _cfg(**{"model.initializer_range": 1e20, "train.steps": 20, "log.every": 5,
                  "log.wandb_mode": "disabled", "train.eval_every": 0, "data.max_docs": 40,
                  "data.tokenizer_max_docs": 40, "data.vocab_size": 512})
    result = run_lib.run(cfg, tmp_path, log=lambda s: None)
    # stopped at the record of step 5, naming step 1: its gradients overflow while its loss is finite
    assert result.stopped and result.stopped.startswith("non-finite gradients at step 1 (its loss finite)")
    assert "train.stop_on_nonfinite=False" in result.stopped
    assert result.step == 5


def test_mfu_formula_and_peak_table():
    # GPT-2 small, seq 1024: 6·124,439,808 + 6·12·768·1024
    assert telemetry.flops_per_token(124_439_808, 12, 768, 1024) == 6 * 124_439_808 + 6 * 12 * 768 * 1024
    bf16, fp32 = precision.policy("bf16"), precision.policy("fp32")
    assert telemetry.peak_tflops("NVIDIA H100 80GB HBM3", bf16) == 989.0
    assert telemetry.peak_tflops("NVIDIA A100-SXM4-40GB", fp32) == 19.5  # true fp32, not TF32
    assert telemetry.peak_tflops("TPU v5 lite", bf16) == 197.0
    assert telemetry.peak_tflops("cpu", bf16) is None
    assert telemetry.peak_tflops("cpu", bf16, override=1.5) == 1.5
    assert telemetry.mfu(1e6, 1e9, 2, 1000.0) == pytest.approx(0.5)


def test_indivisible_dims_are_replicated_with_a_note_that_says_how_to_fix_the_vocab(monkeypatch):
    from types import SimpleNamespace

    from jax.sharding import PartitionSpec as P

    monkeypatch.setattr(sharding, "_NOTED", set())
    mesh = SimpleNamespace(shape={"data": 2, "fsdp": 2, "tensor": 4})  # all spec_for reads
    with pytest.warns(UserWarning, match=r"dim 50257 of wte\.embedding is not divisible by mesh\.tensor=4.*"
                                         r"model\.vocab_multiple=128 pads the token table"):
        assert sharding.spec_for("wte.embedding", (50257, 768), mesh) == P(None, "fsdp")
    with pytest.warns(UserWarning, match=r"dim 6 of h\.0\.attn\.c_attn\.kernel is not divisible by mesh\.tensor=4"):
        assert sharding.spec_for("params.h.0.attn.c_attn.kernel", (64, 3, 6, 16), mesh) == P("fsdp", None, None, None)
    x = jnp.ones((3, 5, 7))
    assert sharding.constrain(x, "residual") is x  # outside a mesh context the model's layouts are no-ops


def test_mesh_and_tpu_checks():
    with pytest.raises(ConfigError, match=r"mesh: data×fsdp×tensor = 2×2×1 = 4 but there are 8 devices"):
        sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
    assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    with pytest.raises(ConfigError, match=r"at most one of data/fsdp/tensor may be -1"):
        _cfg(**{"mesh.fsdp": -1})
    with pytest.raises(ConfigError, match=r"train.micro_batch_size=5 does not divide train.batch_size=16"):
        _cfg(**{"train.micro_batch_size": 5})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        config.validate(_cfg(**{"precision.regime": "fp16"}), backend="tpu")
    assert any("fp16 on a TPU" in str(x.message) for x in w)


@pytest.mark.slow
def test_tiny_quickstart_learns_and_logs_every_metric(tmp_path):
    """The README's first command, as is (offline: wandb in offline mode), on a fresh workdir."""
    out = subprocess.run([sys.executable, "-m", "jaxlm.main", "--config=configs/tiny.py", f"--workdir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*records)
    missing = set(telemetry.TRAIN_METRICS + telemetry.LAYER_METRICS + telemetry.OUTPUT_METRICS
                  + telemetry.EVAL_METRICS) - keys
    assert not missing, missing
    assert telemetry.COMPILE_TIME in keys
    run = json.loads((tmp_path / "run.json").read_text())
    unigram = run["data"]["splits"]["train"]["unigram_entropy"]
    final = [r for r in records if telemetry.EVAL_LOSS in r][-1]
    assert final["step"] == 300
    assert final[telemetry.EVAL_LOSS] < unigram - 1.0, (final[telemetry.EVAL_LOSS], unigram)
    assert records[1][telemetry.LOSS] > unigram  # it started above: it really learned
    assert run["config"]["model"]["n_embd"] == 64 and run["versions"]["jax"]
    assert (tmp_path / "wandb").is_dir()  # offline wandb run, no network needed


@pytest.mark.slow  # over 4 s: out of the fast lane (runs in CI)
def test_the_step_donates_its_state():
    """The old state's buffers are reused by the new one: parameters and optimizer state are never
    held twice on the device."""
    tr = _trainer(_cfg())
    state = tr.init(np.uint32(0))
    new, _ = tr.train_step(state, jax.device_put(_batch(tr.cfg), tr.batch_sharding))
    assert all(x.is_deleted() for x in jax.tree.leaves(state))
    assert not any(x.is_deleted() for x in jax.tree.leaves(new))


@pytest.mark.slow  # 5-15 s: the fast lane stays short
def test_gpt2_recipe_in_fp16_skips_until_the_2_pow_32_scale_fits_and_then_updates_at_the_configured_lr():
    """Mistral's start (DeepSpeed 0.3.13): the scale starts at 2^32 and every overflow halves it, skipping
    the step; the schedule counts applied updates only; the first applied update runs at optim.lr, the
    second at the log warmup's lr(0) = 0, the third at lr·ln 2/ln W."""
    cfg = config.load(ROOT / "jaxlm" / "configs" / "gpt2_small.py", {
        "model.n_layer": 2, "model.n_embd": 64, "model.n_head": 4, "model.n_positions": 32,
        "model.embd_pdrop": 0.0, "model.attn_pdrop": 0.0, "model.resid_pdrop": 0.0,
        "data.vocab_size": 512, "train.batch_size": 16, "train.seq_len": 32, "train.steps": 400,
        "optim.warmup_steps": 40})
    assert cfg.precision.regime == "fp16_upcast" and cfg.precision.loss_scale_init == 2.0**32
    tr = _trainer(cfg)
    state = tr.init(np.uint32(21))
    batch = jnp.asarray(_batch(cfg))
    lr, skipped, applied = cfg.optim.lr, 0, []
    while len(applied) < 3:
        before = _host(state.params)
        state, m = tr.train_step(state, batch)
        if not bool(m["finite"]):
            assert not applied, "an overflow after the scale fitted"
            skipped += 1
            assert float(m[telemetry.LR]) == pytest.approx(lr, rel=1e-6)  # the schedule has not advanced
            assert float(state.loss_scale["scale"]) == 2.0 ** (32 - skipped)  # every overflow halves
            continue
        moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(_host(state.params))))
        applied.append((float(m[telemetry.LR]), moved))
        assert skipped < 30
    assert skipped >= 3  # 2^32 does not fit at first
    (lr1, moved1), (lr2, moved2), (lr3, moved3) = applied
    # Adam's first step moves a weight by ~lr, plus lr·0.1·w of decay (LayerNorm gains, w = 1, decay too)
    assert lr1 == pytest.approx(lr, rel=1e-6) and 0.5 * lr < moved1 <= 1.11 * lr
    assert lr2 == 0.0 and moved2 == 0.0  # log warmup at k = 0: nothing moves
    assert lr3 == pytest.approx(lr * np.log(2) / np.log(40), rel=1e-6) and moved3 > 0
    assert int(state.step) == skipped + 3 and int(state.loss_scale["skipped"]) == skipped


@pytest.mark.slow  # 5-15 s: the fast lane stays short
def test_deepspeed_order_unscales_by_the_updated_scale_halving_the_gradients_where_it_doubles():
    """precision.loss_scale_update_first (ZeRO-2's order): the step whose clean run completes the window
    doubles the scale first and unscales by it; the other steps are unchanged."""
    norms = {}
    for first in (False, True):
        cfg = _cfg(**{"precision.regime": "fp16", "precision.loss_scale_init": 2.0**10,
                      "precision.loss_scale_window": 2, "precision.loss_scale_update_first": first})
        tr = _trainer(cfg)
        state, batch = tr.init(np.uint32(0)), jnp.asarray(_batch(cfg))
        norms[first] = []
        for _ in range(2):
            state, m = tr.train_step(state, batch)
            assert bool(m["finite"])
            norms[first].append(float(m[telemetry.GRAD_NORM]))
        assert float(state.loss_scale["scale"]) == 2.0**11  # doubled at step 2 either way
    assert norms[True][0] == norms[False][0]
    assert norms[True][1] == pytest.approx(norms[False][1] / 2, rel=1e-6)
