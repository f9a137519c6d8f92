"""The precision policy and the attention overflow that motivates it (Mistral's fp16 problem)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import attention, model, precision
from jaxlm.errors import ConfigError


def test_regime_presets():
    p = precision.policy("fp16_upcast")
    assert (p.param_dtype, p.compute_dtype, p.attn_dtype) == (jnp.float32, jnp.float16, jnp.float32)
    assert p.upcasts_attention and p.is_fp16
    p = precision.policy("bf16")
    assert (p.compute_dtype, p.attn_dtype) == (jnp.bfloat16, jnp.bfloat16) and not p.upcasts_attention
    assert not p.is_fp16
    p = precision.policy("fp16")
    assert p.attn_dtype == jnp.float16 and not p.upcasts_attention
    assert precision.policy("bf16", attn_dtype="fp32").attn_dtype == jnp.float32


def test_unknown_regime_and_dtype_name_the_field():
    with pytest.raises(ConfigError, match=r"precision.regime.*'fp4'.*fp32, bf16, bf16_upcast, fp16, fp16_upcast, fp8"):
        precision.policy("fp4")
    with pytest.raises(ConfigError, match=r"precision.compute_dtype.*'int8'"):
        precision.policy("fp32", compute_dtype="int8")


def _constant_qk(value, T=6, H=2, K=64):
    """Q = K = `value` everywhere: every score equals K*value^2/sqrt(K), so softmax is uniform."""
    q = jnp.full((1, T, H, K), value, jnp.float32)
    v = jax.random.normal(jax.random.key(0), (1, T, H, K))
    return q, q, v


def _run(regime, q, k, v, **kw):
    pol = precision.policy(regime)
    return attention.attention(q, k, v, policy=pol, layer_idx=0, collect_stats=True, **kw)


@pytest.mark.slow  # over 4 s: out of the fast lane (runs in CI)
def test_fp16_scores_overflow_and_upcast_does_not():
    # 64 * 40^2 = 102400 > 65504: the product overflows in fp16 before it is scaled by 1/8.
    q, k, v = _constant_qk(40.0)
    out16, s16 = _run("fp16", q, k, v)
    assert bool(s16.nonfinite), "naive fp16 must overflow"
    assert not np.isfinite(np.asarray(out16, np.float32)).all()

    ref, sref = _run("fp32", q, k, v)
    assert np.isfinite(ref).all() and not bool(sref.nonfinite)
    assert float(sref.max) == pytest.approx(102400 / 8)
    for regime, tol in (("fp16_upcast", 2e-3), ("bf16_upcast", 2e-2), ("bf16", 2e-2)):
        out, s = _run(regime, q, k, v)
        assert not bool(s.nonfinite), regime
        np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=tol * float(jnp.abs(ref).max()))


@pytest.mark.slow  # over 4 s: out of the fast lane (runs in CI)
def test_megatron_layer_scaling_avoids_the_overflow_and_preserves_the_function():
    q, k, v = _constant_qk(40.0)
    ref, _ = attention.attention(q, k, v, policy=precision.policy("fp32"), layer_idx=3)
    out, s = attention.attention(q, k, v, policy=precision.policy("fp16"), layer_idx=3,
                                 query_key_layer_scaling=True, collect_stats=True)
    assert not bool(s.nonfinite)  # 102400 / 4 fits in fp16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-3 * float(jnp.abs(ref).max()))
    # fp32: identical function with or without it (summation order aside)
    x = jax.random.normal(jax.random.key(1), (3, 1, 9, 2, 16))
    a, _ = attention.attention(*x, policy=precision.policy("fp32"), layer_idx=5)
    b, _ = attention.attention(*x, policy=precision.policy("fp32"), layer_idx=5, query_key_layer_scaling=True)
    np.testing.assert_allclose(a, b, atol=1e-5)
    # whereas HF's inverse-layer-index scaling changes it
    c, _ = attention.attention(*x, policy=precision.policy("fp32"), layer_idx=5, inverse_layer_idx=True)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def _overflow_model(regime):
    """A tiny GPT-2 whose layer-0 Q and K are a constant 40 (zero kernels, bias 40): QK^T = 102400."""
    cfg = model.GPT2Config(vocab_size=97, n_positions=32, n_embd=128, n_layer=2, n_head=2,
                           embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    gd, params = model.create(cfg, precision.policy(regime), seed=0)
    c_attn = params["h"][0]["attn"]["c_attn"]
    c_attn["kernel"] = c_attn["kernel"].at[:, :2].set(0.0)  # output (3, H, K): q and k are [:2]
    c_attn["bias"] = c_attn["bias"].at[:2].set(40.0)
    return gd, params


@pytest.mark.slow  # 5-15 s: the fast lane stays short
def test_overflow_in_the_model_is_flagged_by_telemetry():
    tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, 97)
    logits = {}
    for regime in ("fp32", "fp16", "fp16_upcast", "bf16"):
        gd, params = _overflow_model(regime)
        logits[regime], stats = model.apply(gd, params, tokens, collect_stats=True)
        assert stats["nonfinite"].shape == (2,)
        if regime == "fp16":
            assert bool(stats["nonfinite"][0]), "telemetry must flag the fp16 overflow in layer 0"
            assert not np.isfinite(logits[regime]).all()
        else:
            assert not bool(stats["nonfinite"].any()), regime
            assert np.isfinite(logits[regime]).all(), regime
    ref = np.asarray(logits["fp32"])
    scale = np.abs(ref).max()
    np.testing.assert_allclose(logits["fp16_upcast"], ref, atol=1e-2 * scale)


@pytest.mark.slow  # over 4 s: out of the fast lane (runs in CI)
@pytest.mark.parametrize("regime,tol", [("bf16", 3e-2), ("bf16_upcast", 3e-2), ("fp16_upcast", 4e-3), ("fp16", 4e-3)])
def test_low_precision_logits_agree_with_fp32_on_normal_input(regime, tol):
    cfg = model.GPT2Config(vocab_size=211, n_positions=64, n_embd=96, n_layer=3, n_head=6,
                           initializer_range=0.1, scale_attn_by_inverse_layer_idx=True)
    tokens = jax.random.randint(jax.random.key(0), (2, 40), 0, 211)
    gd, p32 = model.create(cfg, precision.policy("fp32"), seed=3)
    ref = np.asarray(model.logits(gd, p32, tokens))
    gd, p = model.create(cfg, precision.policy(regime), seed=3)  # same seed: same fp32 master weights
    out = np.asarray(model.logits(gd, p, tokens))
    assert out.dtype == np.float32
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < tol, f"{regime}: relative error {err:.2e}"
    assert err > 0  # really computed in lower precision


def test_cudnn_forced_on_cpu_explains_why_not():
    pol = precision.policy("fp16")
    with pytest.raises(ConfigError, match=r"model.attention_impl='cudnn' cannot be used.*GPU.*float16"):
        attention.resolve_implementation("cudnn", pol, head_dim=64, dropout=False, query_key_layer_scaling=False)
    assert attention.resolve_implementation("auto", pol, head_dim=64, dropout=False,
                                            query_key_layer_scaling=False) == "reference"
    up = precision.policy("fp16_upcast")
    assert attention.resolve_implementation("auto", up, head_dim=64, dropout=False,
                                            query_key_layer_scaling=False, backend="gpu") == "cudnn"
    # attention dropout on a GPU: the flash kernel (cuDNN's dropout seed is static), on any mesh
    assert attention.resolve_implementation("auto", up, head_dim=64, dropout=True,
                                            query_key_layer_scaling=False, backend="gpu") == "flash"
    assert attention.describe("flash", {"data": 2, "fsdp": 1, "tensor": 4}) == (
        "flash (shard_map over data=2×tensor=4; dropout masks hash global rows and heads)")
    with pytest.raises(ConfigError, match=r"'cudnn' cannot be used.*dropout seed is a compile-time constant"):
        attention.resolve_implementation("cudnn", up, head_dim=64, dropout=True, query_key_layer_scaling=False,
                                         backend="gpu")
    with pytest.raises(ConfigError, match=r"'flash' cannot be used.*'fp16'.*not the same function"):
        attention.resolve_implementation("flash", pol, head_dim=64, dropout=True, query_key_layer_scaling=False,
                                         backend="gpu")


@pytest.mark.parametrize("regime", ["fp32", "bf16", "bf16_upcast", "fp16", "fp16_upcast"])
def test_every_matmul_of_the_train_step_runs_in_the_regime_dtype(regime):
    """The whole compiled step (forward, backward, optimizer), read from its StableHLO: 16-bit regimes
    multiply 16-bit operands only (fp32 scores and logits are 16-bit products with fp32 results, and
    their backward rounds the cotangent first), so no matmul falls back to float32/TF32; the fp32
    regime asks for true float32 (HIGHEST) everywhere, not the TF32/bf16 passes JAX's default allows."""
    import re

    from jaxlm import config, sharding, train

    from conftest import ROOT

    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {"train.batch_size": 4, "train.seq_len": 16,
                                                    "model.n_positions": 16, "precision.regime": regime})
    tr = train.Trainer(cfg, sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1]), cfg.data.vocab_size)
    batch = jax.ShapeDtypeStruct((4, 17), jnp.int32, sharding=tr.batch_sharding)
    hlo = tr.train_step.lower(train.abstract_state(tr), batch).as_text()
    dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) >= 6 * cfg.model.n_layer  # 3 per matmul (forward + 2 backward), 6+ matmuls per layer
    operand = {"fp32": "f32", "bf16": "bf16", "bf16_upcast": "bf16", "fp16": "f16", "fp16_upcast": "f16"}[regime]
    for line in dots:
        lhs, rhs = re.search(r":\s*\(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)\s*->", line).groups()
        assert (lhs, rhs) == (operand, operand), line
        assert ("precision = [HIGHEST, HIGHEST]" in line) == (regime == "fp32"), line


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_widening_einsum_backward_rounds_only_the_cotangent(dtype):
    a = jax.random.normal(jax.random.key(0), (8, 32), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (64, 32), jnp.float32).astype(dtype)
    w = jax.random.normal(jax.random.key(2), (8, 64), jnp.float32)
    ours = lambda a, b: (precision.einsum("nd,vd->nv", a, b, out_dtype=jnp.float32) * w).sum()
    autodiff = lambda a, b: (jnp.einsum("nd,vd->nv", a, b, preferred_element_type=jnp.float32) * w).sum()
    assert float(ours(a, b)) == float(autodiff(a, b))  # the forward pass is the same program
    for g, ref in zip(jax.grad(ours, (0, 1))(a, b), jax.grad(autodiff, (0, 1))(a, b)):
        assert g.dtype == dtype
        # the same gradient up to the rounding of the cotangent to `dtype` (a few units in the last place)
        eps = float(jnp.finfo(dtype).eps)
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(ref, np.float32), rtol=4 * eps, atol=4 * eps)
