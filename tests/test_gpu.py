"""What only a GPU can show: cuDNN attention against the reference, fp16 overflow on tensor cores,
true fp32 matmuls. Skipped elsewhere; on a GPU machine run (the CPU is the fp32 reference)

    JAX_PLATFORMS=cuda,cpu python -m pytest -q tests/test_gpu.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import attention, model, precision

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
