"""The flash-attention kernel with in-kernel dropout (jaxlm.flash), run interpreted on the CPU: the
same function as the reference path, dropout mask included; the mask's statistics; and the
trainer's dropout keys as a pure function of (seed, step, micro-batch, layer)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from jaxlm import attention, config, flash, model, precision, sharding, telemetry, train

from conftest import ROOT

HELPERS = ROOT / "tests" / "helpers"

F32 = precision.FP32


def _qkv(B=2, T=128, H=2, K=16, seed=0):
    return [jax.random.normal(k, (B, T, H, K), F32) for k in jax.random.split(jax.random.key(seed), 3)]


@pytest.mark.slow  # over 4 s: out of the fast lane (runs in CI)
@pytest.mark.parametrize("rate,layer_idx,inverse", [(0.0, 0, False), (0.1, 0, False), (0.3, 3, True)])
def test_flash_equals_the_reference_path_forward_and_backward(rate, layer_idx, inverse):
    """Interpreted kernel vs the einsum path, dropout on: outputs and all three gradients agree to
    float32 rounding, so the kernel draws exactly the reference path's mask."""
    q, k, v = _qkv()
    do = jax.random.normal(jax.random.key(9), q.shape, F32)
    pol = precision.policy("fp32")
    key = jax.random.PRNGKey(5)

    def run(impl):
        def f(q, k, v):
            out, _ = attention.attention(q, k, v, policy=pol, layer_idx=layer_idx, inverse_layer_idx=inverse,
                                         implementation=impl, dropout_rate=rate, dropout_key=key)
            return jnp.sum(out * do), out
        (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    (o_f, g_f), (o_r, g_r) = run("flash"), run("reference")
    np.testing.assert_allclose(o_f, o_r, atol=2e-6, rtol=1e-5)
    for a, b in zip(g_f, g_r):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()), rtol=1e-5)


@pytest.mark.slow  # over 3 s: out of the fast lane (runs in CI)
@pytest.mark.parametrize("rate", [0.1, 0.03])  # 0.03 is no multiple of 1/16 or 1/256
def test_the_realised_drop_rate_is_the_configured_one(rate):
    B, H, T = 4, 4, 256
    keep = flash.reference_keep_mask(jax.random.PRNGKey(0), B, H, T, T, rate)
    n = keep.size
    dropped = 1.0 - float(keep.mean())
    se = (rate * (1 - rate) / n) ** 0.5
    assert abs(dropped - rate) < 4 * se, (dropped, rate, se)
    # no structure along rows, columns or heads: each slice's rate is within its own 5 SE
    for axis in (0, 1, 2, 3):
        per = 1.0 - np.asarray(keep.mean(axis=tuple(a for a in range(4) if a != axis)))
        se_slice = (rate * (1 - rate) / (n / keep.shape[axis])) ** 0.5
        assert np.abs(per - rate).max() < 5 * se_slice, axis
    # neighbouring positions are independent: P(both dropped) = rate^2
    both = float((~keep[..., 1:] & ~keep[..., :-1]).mean())
    assert abs(both - rate**2) < 5 * (rate**2 / n) ** 0.5 + 1e-4


def test_dropout_output_is_unbiased():
    """E[dropout attention] = attention without dropout: the mean over 64 keys is within a few
    standard errors of the no-dropout output, position by position (p = 0.1)."""
    q, k, v = _qkv(B=1, T=64, H=2, K=16, seed=1)
    scale = 16**-0.5
    run = jax.jit(lambda key: flash.flash_attention(q, k, v, scale=scale, dropout_rate=0.1, dropout_key=key,
                                                    interpret=True))
    outs = np.stack([np.asarray(run(jax.random.PRNGKey(i))) for i in range(64)])
    clean = np.asarray(flash.flash_attention(q, k, v, scale=scale, interpret=True))
    se = outs.std(0) / np.sqrt(len(outs)) + 1e-6
    z = (outs.mean(0) - clean) / se
    assert np.abs(z).mean() < 1.0  # |z| of a standard normal: mean 0.80; a bias would grow it
    assert np.abs(z[:, 16:]).max() < 6  # (the first rows average over few keys: not normal there)
    assert np.abs(outs[0] - clean).max() > 1e-2  # dropout really happened


@pytest.mark.slow  # 5-15 s: the fast lane stays short
def test_a_model_with_flash_is_the_reference_model_dropout_included():
    """attention_impl='flash' (interpreted here) and 'reference' give the same training loss and
    gradients with attention dropout on: one mask, two implementations."""
    results = {}
    for impl in ("flash", "reference"):
        cfg = model.GPT2Config(vocab_size=97, n_positions=64, n_embd=64, n_layer=2, n_head=4, embd_pdrop=0.0,
                               attn_pdrop=0.2, resid_pdrop=0.0, attention_impl=impl)
        gd, p = model.create(cfg, precision.policy("fp32"), 0)
        toks = jax.random.randint(jax.random.key(1), (2, 65), 0, 97)
        loss = lambda p: model.token_losses(gd, p, toks[:, :-1], toks[:, 1:], dropout_key=jax.random.PRNGKey(3))[0].mean()
        results[impl] = jax.jit(jax.value_and_grad(loss))(p)
    (lf, gf), (lr, gr) = results["flash"], results["reference"]
    assert abs(float(lf) - float(lr)) < 1e-5
    for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gr)):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()) + 1e-8, rtol=1e-4)


@pytest.mark.slow  # 5-15 s: the fast lane stays short
def test_dropout_keys_are_a_pure_function_of_seed_step_and_micro_batch():
    """Same (train.seed, step): the same masks, so the same update bit for bit; another step or
    another seed: other masks. (Layers and micro-batches get keys split/folded from the step's.)"""
    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py")
    cfg = config.with_overrides(cfg, {"model.attn_pdrop": 0.1, "train.batch_size": 4, "train.seq_len": 32,
                                      "model.n_positions": 32, "optim.warmup_steps": 0})
    trainer = train.Trainer(cfg, sharding.make_mesh(cfg.mesh), 64)
    batch = jnp.asarray(np.random.RandomState(0).randint(0, 64, (4, 33)), jnp.int32)

    def loss_at(step, seed=0):
        state = trainer.init(jnp.uint32(seed)).replace(step=jnp.int32(step))
        _, metrics = trainer.train_step(state, batch)
        return float(metrics[telemetry.LOSS])

    a, b = loss_at(7), loss_at(7)
    assert a == b
    assert loss_at(8) != a
    keys = [trainer.step_key(jax.random.PRNGKey(0), s, m) for s in (7, 8) for m in (0, 1)]
    assert len({tuple(np.asarray(flash.key_bits(k)).tolist()) for k in keys}) == 4
    # per layer: GPT2 splits the key per layer, Block that into (attention probabilities, ...)
    layer_keys = [jax.random.split(k, 3)[0] for k in jax.random.split(keys[0], cfg.model.n_layer + 1)[:-1]]
    masks = [flash.reference_keep_mask(k, 1, 1, 32, 32, 0.1) for k in layer_keys]
    assert bool(jnp.any(masks[0] != masks[1]))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_the_kernels_lower_to_triton_for_a_gpu_without_a_score_matrix(dtype):
    """Lowered for CUDA on this CPU (jax.export, no GPU needed): the forward and both backward
    kernels become Triton custom calls, so every op in them has a Triton lowering, and the program
    holds no (B, H, T, T) array: scores, probabilities and the mask stay inside the kernels."""
    B, T, H, K = 2, 256, 4, 64
    spec = jax.ShapeDtypeStruct((B, T, H, K), dtype)

    def loss(q, k, v):
        out = flash.flash_attention(q, k, v, scale=0.125, dropout_rate=0.1, dropout_key=jax.random.PRNGKey(0))
        return jnp.sum(out.astype(F32))

    exported = export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        spec, spec, spec)
    text = exported.mlir_module()
    assert text.count("@__gpu$xla.gpu.triton") == 3  # forward, dK/dV, dQ
    assert f"tensor<{B}x{H}x{T}x{T}x" not in text and f"tensor<{B}x{T}x{H}x{T}x" not in text


@pytest.mark.slow  # one subprocess, 8 simulated devices, four meshes: ~60-90 s on 2 cores
def test_flash_on_any_mesh_is_the_one_device_run_masks_included():
    """DP=8, FSDP=8, FSDP=2×TP=4 and DP=2×TP=4 with attention dropout 0.1 (tests/helpers/flash_meshes.py):
    the kernel runs under shard_map, each shard hashing its global rows and heads, so the mask it
    applies is bit-identical to the reference path's global mask on every mesh, and the loss and every
    gradient equal the one-device flash run and the reference path (fp32, 1e-6 relative). The kernel
    adds no collective: the census is the reference path's. Exported for CUDA (TPU), the sharded train
    step holds the Triton (Mosaic) kernels and no (B, H, T, T) array, global or per shard."""
    out = subprocess.run([sys.executable, str(HELPERS / "flash_meshes.py")], capture_output=True, text=True,
                         timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    check_meshes(json.loads(out.stdout.strip().splitlines()[-1]))


def check_meshes(res: dict) -> None:
    """The assertions on flash_meshes.py's JSON (a function, so a saved output can be checked too)."""
    one = res["one_device"]
    assert one["mask_equal"] and one["grad_rel_flash_vs_reference"]["norm"] <= 1e-6, one
    for name in ("DP=8", "FSDP=8", "FSDP=2xTP=4", "DP=2xTP=4"):
        r = res[name]
        assert r["attention"] == "flash" and r["mask_equal"], (name, r)
        assert r["loss_rel_vs_flash1"] <= 1e-6 and r["loss_rel_vs_reference1"] <= 1e-6, (name, r)
        assert r["grad_rel_vs_flash1"]["norm"] <= 1e-6 and r["grad_rel_vs_reference1"]["norm"] <= 1e-6, (name, r)
        assert r["grad_rel_vs_flash1"]["max"] <= 1e-5, (name, r)
        counts = r["census_flash"]["counts"]  # what the sharding test allows: no activation resharded
        assert "all-to-all" not in counts and "collective-permute" not in counts, (name, counts)
        assert r["census_flash"]["global_batch"] == [], (name, r["census_flash"])
    assert res["DP=8"]["census_flash"]["counts"] == {"all-reduce": 1}  # the one fused gradient all-reduce
    cuda, tpu = res["export_cuda"], res["export_tpu"]
    assert cuda["triton_calls"] >= 3 * cuda["n_layer"] and cuda["mosaic_calls"] == 0, cuda
    assert tpu["mosaic_calls"] >= 3 * tpu["n_layer"] and tpu["triton_calls"] == 0, tpu  # the TPU kernel, sharded
    assert cuda["score_arrays"] == [] and tpu["score_arrays"] == [], (cuda, tpu)


@pytest.mark.slow  # two subprocesses on 4 simulated devices: ~30-60 s on 2 cores
def test_killed_on_fsdp4_resumed_on_dp2_tp2_draws_the_same_masks(tmp_path):
    """Attention dropout 0.1 in the flash kernel (tests/helpers/flash_resume.py): a run on FSDP=4 saves
    step 3 and is SIGKILLed; resumed on DP=2×TP=2 its steps 3-5 have the uninterrupted run's losses up
    to summation order: the masks hash global rows and heads, so the mesh does not change them."""
    helper, env = str(HELPERS / "flash_resume.py"), {**os.environ, "JAX_PLATFORMS": "cpu"}
    first = subprocess.run([sys.executable, helper, "first", str(tmp_path)], capture_output=True, text=True,
                           timeout=600, env=env)
    assert first.returncode == -9, first.stderr[-3000:]  # killed, as intended, after printing
    second = subprocess.run([sys.executable, helper, "second", str(tmp_path)], capture_output=True, text=True,
                            timeout=600, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = (json.loads(p.stdout.strip().splitlines()[-1]) for p in (first, second))
    assert a["attention"] == b["attention"] == "flash"
    assert a["mesh"] != b["mesh"]
    uninterrupted, resumed = np.array(a["losses"][3:]), np.array(b["losses"])
    np.testing.assert_allclose(resumed, uninterrupted, rtol=1e-5, atol=0)
