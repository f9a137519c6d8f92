"""What only a GPU can show: cuDNN and the flash kernel (Triton, attention dropout inside) against
the reference, fp16 overflow on tensor cores, true fp32 matmuls, the recipe's step picking flash.
Skipped elsewhere; on a GPU machine run (the CPU is the fp32 reference)

    JAX_PLATFORMS=cuda,cpu python -m pytest -q tests/test_gpu.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import attention, config, flash, model, precision, sharding, telemetry, train

from conftest import ROOT

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (JAX_PLATFORMS=cuda,cpu)")


def _qkv(dtype, B=2, T=256, H=4, K=64, scale=1.0, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return [(scale * jax.random.normal(k, (B, T, H, K), jnp.float32)).astype(dtype) for k in ks]


@pytest.mark.parametrize("regime", ["fp16_upcast", "bf16_upcast"])
@pytest.mark.parametrize("layer_idx,inverse", [(0, False), (5, True)])
def test_cudnn_attention_equals_the_reference_forward_and_backward(regime, layer_idx, inverse):
    pol = precision.policy(regime)
    q, k, v = _qkv(pol.compute_dtype)
    impl = attention.resolve_implementation("auto", pol, head_dim=64, dropout=False, query_key_layer_scaling=False)
    assert impl == "cudnn"

    def run(implementation):
        f = lambda q, k, v: attention.attention(q, k, v, policy=pol, layer_idx=layer_idx, inverse_layer_idx=inverse,
                                                implementation=implementation)[0]
        out, vjp = jax.vjp(f, q, k, v)
        return [np.asarray(x, np.float32) for x in (out, *vjp(jnp.ones_like(out)))]

    tol = 4 * float(jnp.finfo(pol.compute_dtype).eps)  # a few roundings of the 16-bit output apart
    for ours, ref in zip(run("cudnn"), run("reference")):
        np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_naive_fp16_scores_overflow_on_tensor_cores_and_upcast_does_not():
    q, k, v = _qkv(jnp.float16, scale=60.0)  # q·k over 64 dims: std ~2.9e4, max ~1.3e5 > 65504
    for regime, finite in (("fp16", False), ("fp16_upcast", True)):
        _, stats = attention.attention(q, k, v, policy=precision.policy(regime), layer_idx=0, collect_stats=True)
        assert bool(stats.nonfinite) != finite, regime


def test_fp32_regime_multiplies_in_true_fp32_not_tf32():
    cfg = model.GPT2Config(vocab_size=512, n_positions=64, n_embd=128, n_layer=2, n_head=4)
    gd, params = model.create(cfg, precision.policy("fp32"), 0)
    tokens = jnp.arange(64)[None] % 512
    ours = np.asarray(model.logits(gd, params, tokens), np.float64)
    with jax.default_device(jax.devices("cpu")[0]):  # the CPU computes float32 matmuls exactly in float32
        ref = np.asarray(model.logits(gd, jax.device_put(params, jax.devices("cpu")[0]), tokens), np.float64)
    # TF32 rounds operands to 10 mantissa bits (~5e-4 relative each); true fp32 agrees to ~1e-6
    assert np.abs(ours - ref).max() <= 2e-5 * np.abs(ref).max()


@pytest.mark.parametrize("regime", ["fp16_upcast", "bf16_upcast"])
@pytest.mark.parametrize("rate,layer_idx,inverse", [(0.0, 0, False), (0.1, 0, False), (0.1, 5, True)])
def test_flash_attention_with_dropout_equals_the_reference_forward_and_backward(regime, rate, layer_idx, inverse):
    """The compiled Triton kernel draws the reference path's mask: at p = 0 and p = 0.1 the same
    output and gradients within the cuDNN test's tolerance."""
    pol = precision.policy(regime)
    q, k, v = _qkv(pol.compute_dtype, T=512)
    assert attention.resolve_implementation("auto", pol, head_dim=64, dropout=rate > 0,
                                            query_key_layer_scaling=False) == ("flash" if rate else "cudnn")
    key = jax.random.PRNGKey(11)

    def run(implementation):
        f = lambda q, k, v: attention.attention(q, k, v, policy=pol, layer_idx=layer_idx, inverse_layer_idx=inverse,
                                                implementation=implementation, dropout_rate=rate,
                                                dropout_key=key)[0]
        out, vjp = jax.vjp(jax.jit(f), q, k, v)
        return [np.asarray(x, np.float32) for x in (out, *vjp(jnp.ones_like(out)))]

    tol = 4 * float(jnp.finfo(pol.compute_dtype).eps)
    for ours, ref in zip(run("flash"), run("reference")):
        np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_flash_dropout_rate_and_mean_on_the_gpu():
    """On the device: the realised drop rate is p (not rounded), and the mean output over keys is the
    no-dropout output."""
    q, k, v = _qkv(jnp.bfloat16, B=1, T=256, H=2)
    run = jax.jit(lambda key, rate: flash.flash_attention(q, k, v, scale=0.125, dropout_rate=rate, dropout_key=key),
                  static_argnums=1)
    clean = np.asarray(run(jax.random.PRNGKey(0), 0.0), np.float32)
    outs = np.stack([np.asarray(run(jax.random.PRNGKey(i), 0.1), np.float32) for i in range(64)])
    se = outs.std(0) / np.sqrt(len(outs)) + 1e-3
    assert np.abs((outs.mean(0) - clean) / se).mean() < 1.0
    keep = flash.reference_keep_mask(jax.random.PRNGKey(0), 4, 12, 1024, 1024, 0.03)
    assert abs((1 - float(keep.mean())) - 0.03) < 4 * (0.03 * 0.97 / keep.size) ** 0.5


def test_the_recipe_step_runs_flash_and_repeats_bit_for_bit():
    """gpt2_small's recipe at toy size on the GPU: the train step's attention is the flash kernel,
    and the same step from the same state gives the same loss bit for bit (deterministic ops)."""
    cfg = config.load(ROOT / "jaxlm" / "configs" / "gpt2_small.py")
    cfg = config.with_overrides(cfg, {"model.n_layer": 2, "train.batch_size": 4, "train.micro_batch_size": 0,
                                      "train.seq_len": 256, "model.vocab_size": 512})
    trainer = train.Trainer(cfg, sharding.make_mesh(cfg.mesh), 512)
    assert trainer.attention == "flash"
    batch = jax.device_put(np.random.RandomState(0).randint(0, 512, (4, 257)).astype(np.int32), trainer.batch_sharding)
    losses = []
    for _ in range(2):
        state = trainer.init(jnp.uint32(0))
        for _ in range(3):
            state, m = trainer.train_step(state, batch)
        losses.append(float(m[telemetry.LOSS]))
    assert losses[0] == losses[1] and np.isfinite(losses[0])
