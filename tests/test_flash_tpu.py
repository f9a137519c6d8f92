"""The TPU (Mosaic) flash kernel with in-kernel dropout, jaxlm.flash_tpu, in Pallas's TPU interpret mode on
the CPU: the reference path's function, mask included, forward and backward; and the train step lowered
for TPU (jax.export on this CPU): Mosaic custom calls, no (B, H, T, T) array."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from jaxlm import attention, config, flash, flash_tpu, precision, sharding, train

from conftest import ROOT

F32 = precision.FP32


def _qkv(B, T, H, K, seed=0):
    return [jax.random.normal(k, (B, T, H, K), F32) for k in jax.random.split(jax.random.key(seed), 3)]


@pytest.mark.slow  # TPU interpret mode simulates every grid step: 5-20 s per case
@pytest.mark.parametrize("rate,inverse,block", [(0.0, True, 32), (0.1, True, 128), (0.3, False, 32)])
def test_tpu_kernel_equals_the_reference_path_forward_and_backward(monkeypatch, rate, inverse, block):
    """Output and the three gradients against the einsum path at p = 0, 0.1, 0.3, with and without
    inverse-layer-index scaling (layer 2: the score scale is divided by 3; three cases, not six, to keep
    the interpreter's cost down: each rate once, each scaling at least once). T = 2 blocks (of 32, and
    of the kernel's own 128, whose row statistics take the lane-tiling path) makes a 2×2 grid, so the
    causal block skip and the online softmax across key blocks both run."""
    monkeypatch.setattr(flash_tpu, "BLOCK", block)
    T = 2 * block
    q, k, v = _qkv(2, T, 2, 16)
    do = jax.random.normal(jax.random.key(9), q.shape, F32)
    pol, key, layer = precision.policy("fp32"), jax.random.PRNGKey(5), 2
    scale = attention.score_scale(16, layer, inverse)

    def tpu(q, k, v):
        out = flash_tpu.flash_attention(q, k, v, scale=scale, dropout_rate=rate, dropout_key=key,
                                        interpret=pltpu.InterpretParams())
        return jnp.sum(out * do), out

    def ref(q, k, v):
        out, _ = attention.attention(q, k, v, policy=pol, layer_idx=layer, inverse_layer_idx=inverse,
                                     implementation="reference", dropout_rate=rate, dropout_key=key)
        return jnp.sum(out * do), out

    (_, o_t), g_t = jax.value_and_grad(tpu, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, o_r), g_r = jax.value_and_grad(ref, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(o_t, o_r, atol=2e-6, rtol=1e-5)
    for a, b in zip(g_t, g_r):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()), rtol=1e-5)


@pytest.mark.slow  # one rate: the threshold is the only difference between rates (p = 0.3's mask is checked
@pytest.mark.parametrize("rate", [0.1])  # through the gradients above)
def test_tpu_kernel_draws_the_reference_mask_at_the_configured_rate(rate):
    """The mask read off the kernel's output (q = k = 0: row t's probabilities are 1/(t+1); v the
    one-hot of the key position: output[t, s] is that probability, dropped or scaled) is
    bit-identical to the reference path's, and the realised drop rate is p within 4 standard errors."""
    B, T, H = 2, 128, 2
    zeros = jnp.zeros((B, T, H, T), F32)
    v = jnp.broadcast_to(jnp.eye(T, dtype=F32)[None, :, None, :], (B, T, H, T))
    key = jax.random.PRNGKey(11)
    out = flash_tpu.flash_attention(zeros, zeros, v, scale=1.0, dropout_rate=rate, dropout_key=key,
                                    interpret=pltpu.InterpretParams())
    kept = np.asarray(out).transpose(0, 2, 1, 3) > 0
    causal = np.tril(np.ones((T, T), bool))
    assert np.array_equal(kept, np.asarray(flash.reference_keep_mask(key, B, H, T, T, rate)) & causal)
    scaled = np.asarray(out).transpose(0, 2, 1, 3)[kept] * (np.arange(1, T + 1)[None, None, :, None] + 0 * kept)[kept]
    np.testing.assert_allclose(scaled, 1.0 / (1.0 - rate), rtol=1e-6)  # kept: p / (1 - rate)
    n = B * H * int(causal.sum())
    dropped = 1.0 - kept.sum() / n
    assert abs(dropped - rate) < 4 * (rate * (1 - rate) / n) ** 0.5, (dropped, rate)


def test_auto_picks_the_tpu_kernel_with_attention_dropout_only():
    up = precision.policy("bf16_upcast")
    kw = dict(head_dim=64, query_key_layer_scaling=False, backend="tpu")
    assert attention.resolve_implementation("auto", up, dropout=True, **kw) == "flash"
    assert attention.resolve_implementation("auto", up, dropout=False, **kw) == "reference"  # XLA's attention
    assert attention.resolve_implementation("auto", precision.policy("bf16"), dropout=True, **kw) == "reference"


@pytest.mark.slow  # 5-15 s: traces and lowers the whole step
def test_the_train_step_lowered_for_tpu_holds_mosaic_kernels_and_no_score_matrix():
    """The tiny recipe with attention dropout, attention_impl='flash', traced on this CPU and exported
    for TPU: its attention is the Mosaic kernels (forward, dK/dV and dQ per layer; the remat
    recomputation of the forward may add more) and the program holds no (B, H, T, T) array."""
    B, T = 2, 256  # T != 128: the log-sum-exp residual is (B, H, T, 128), lane-broadcast
    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {
        "model.attn_pdrop": 0.1, "model.attention_impl": "flash", "precision.regime": "bf16_upcast",
        "train.batch_size": B, "train.seq_len": T, "model.n_positions": T, "optim.warmup_steps": 0})
    trainer = train.Trainer(cfg, sharding.make_mesh(cfg.mesh), 256)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), trainer.abstract_state,
                         trainer.state_sharding)
    batch = jax.ShapeDtypeStruct((B, T + 1), jnp.int32, sharding=trainer.batch_sharding)
    text = export.export(trainer.train_step, platforms=["tpu"])(state, batch).mlir_module()
    kernels = re.findall(r'kernel_name = "(flash_tpu_\w+)"', text) or re.findall(r"flash_tpu_\w+", text)
    n_layer, H = cfg.model.n_layer, cfg.model.n_head
    assert text.count("tpu_custom_call") >= 3 * n_layer, text.count("tpu_custom_call")
    assert {"flash_tpu_forward", "flash_tpu_backward_dkdv", "flash_tpu_backward_dq"} <= set(kernels), set(kernels)
    assert "triton" not in text
    assert not re.findall(rf"tensor<{B}x{H}x{T}x{T}x", text)
