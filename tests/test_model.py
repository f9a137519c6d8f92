"""GPT-2 structure: parameter counts, initialisation, config errors, dropout."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlm import config, layers, model, precision
from jaxlm.errors import ConfigError, DataError

ROOT = __import__("conftest").ROOT


@pytest.mark.slow  # over 3 s: out of the fast lane (runs in CI)
@pytest.mark.parametrize("size", ["small", "medium"])
def test_param_count_equals_hugging_face(size):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    s = model.SIZES[size]
    hf_cfg = transformers.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=s["n_embd"],
                                     n_layer=s["n_layer"], n_head=s["n_head"])
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(hf_cfg)
    hf_count = sum(p.numel() for p in hf.parameters())  # the tied head is counted once
    cfg = model.GPT2Config(**s)
    _, params = model.abstract(cfg, precision.policy("fp32"))
    assert model.count_params(params, cfg) == hf_count  # without the token table's padding rows
    if size == "small":
        assert hf_count == 124_439_808


def test_configs_build_the_documented_sizes():
    for name, size in [("gpt2_small", "small"), ("gpt2_medium", "medium"), ("gpt2_large", "large"), ("gpt2_xl", "xl")]:
        cfg = config.load(ROOT / "jaxlm" / "configs" / f"{name}.py")
        mc = config.model_config(cfg)
        assert {k: getattr(mc, k) for k in model.SIZES[size]} == model.SIZES[size]
        assert mc.vocab_size == 50257 and mc.n_positions == 1024


@pytest.mark.slow  # over 3 s: out of the fast lane (runs in CI)
def test_initialisation_follows_gpt2():
    cfg = model.GPT2Config(vocab_size=4000, n_positions=256, n_embd=256, n_layer=8, n_head=4)
    _, p = model.create(cfg, precision.policy("fp32"), seed=0)
    p = model.per_layer(p)  # the loop's layout, whatever model.scan_layers says
    std = lambda x: float(np.std(np.asarray(x)))
    assert std(p["wte"]["embedding"]) == pytest.approx(0.02, rel=0.05)
    assert std(p["h"][0]["attn"]["c_attn"]["kernel"]) == pytest.approx(0.02, rel=0.05)
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert std(p["h"][3]["attn"]["c_proj"]["kernel"]) == pytest.approx(resid, rel=0.05)
    assert std(p["h"][3]["mlp"]["c_proj"]["kernel"]) == pytest.approx(resid, rel=0.05)
    assert not np.asarray(p["h"][1]["mlp"]["c_fc"]["bias"]).any()
    assert (np.asarray(p["ln_f"]["scale"]) == 1).all() and not np.asarray(p["ln_f"]["bias"]).any()


@pytest.mark.parametrize("overrides,pattern", [
    ({"model.n_head": 5}, r"model.n_embd=64 is not divisible by model.n_head=5"),
    ({"precision.regime": "fp4"}, r"precision.regime.*'fp4'.*allowed: fp32, bf16"),
    ({"train.seq_len": 512}, r"train.seq_len=512 exceeds model.n_positions=128"),
    ({"model.attention_impl": "fused"}, r"model.attention_impl.*'fused'.*auto, reference, cudnn, flash"),
    ({"model.attn_pdrop": 1.5}, r"model.attn_pdrop"),
    ({"model.remat": "some"}, r"--config.model.remat=some: unknown 'some'; allowed: none, dots, full"),
])
def test_bad_config_names_the_field(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config.load(ROOT / "jaxlm" / "configs" / "tiny.py", overrides)


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r'config.model.n_heads: unknown key; Did you mean "n_head"'):
        config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {"model.n_heads": 4})


def test_sequence_longer_than_positions_fails_at_call():
    cfg = model.GPT2Config(vocab_size=50, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    gd, p = model.create(cfg, precision.policy("fp32"))
    with pytest.raises(ConfigError, match=r"sequence length 9 exceeds model.n_positions=8"):
        model.logits(gd, p, jnp.zeros((1, 9), jnp.int32))


@pytest.mark.slow  # over 4 s: out of the fast lane (runs in CI)
def test_dropout_is_random_with_a_key_and_off_without():
    cfg = model.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                           embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)
    gd, p = model.create(cfg, precision.policy("fp32"))
    toks = jnp.arange(16)[None] % 50
    ev1, ev2 = model.apply(gd, p, toks), model.apply(gd, p, toks)
    np.testing.assert_array_equal(ev1, ev2)
    a = model.apply(gd, p, toks, dropout_key=jax.random.key(1))
    b = model.apply(gd, p, toks, dropout_key=jax.random.key(1))
    c = model.apply(gd, p, toks, dropout_key=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(ev1)).max() > 1e-4
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-4


@pytest.mark.slow  # over 4 s: out of the fast lane (runs in CI)
def test_stats_are_free_when_off_and_per_layer_when_on():
    cfg = model.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=3, n_head=2)
    gd, p = model.create(cfg, precision.policy("fp32"))
    toks = jnp.arange(16)[None] % 50
    # off: the traced program has none of the stats' ops (is_finite appears only in them)
    assert "is_finite" not in str(jax.make_jaxpr(lambda p: model.apply(gd, p, toks))(p))
    assert "is_finite" in str(jax.make_jaxpr(lambda p: model.apply(gd, p, toks, collect_stats=True))(p))
    logits, stats = model.apply(gd, p, toks, collect_stats=True)
    np.testing.assert_allclose(logits, model.apply(gd, p, toks), atol=1e-6)
    assert set(stats) == {"resid_rms", "attn_max", "attn_min", "nonfinite", "logit_mean", "log_z"}
    assert all(stats[k].shape == (3,) for k in ("resid_rms", "attn_max", "attn_min", "nonfinite"))
    assert (stats["attn_max"] >= stats["attn_min"]).all() and (stats["resid_rms"] > 0).all()


@pytest.mark.slow  # eager (op-by-op) forward and backward, three times: ~30-40 s on 2 CPU cores
def test_remat_keeps_loss_and_gradients_and_saves_fewer_activations():
    """Recomputation trades memory for compute only: same loss and gradients (dropout included,
    its masks are regenerated from the same key), fewer bytes kept for the backward pass."""
    results = {}
    for remat in ("none", "dots", "full"):
        cfg = model.GPT2Config(vocab_size=97, n_positions=32, n_embd=64, n_layer=3, n_head=4, remat=remat)
        gd, p = model.create(cfg, precision.policy("fp32"), 0)
        toks = jax.random.randint(jax.random.key(1), (4, 17), 0, 97)

        def loss(p):
            logits = model.apply(gd, p, toks[:, :-1], dropout_key=jax.random.key(3))
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), toks[:, 1:, None], -1).mean()

        value, backward = jax.vjp(loss, p)  # eager: the residuals are concrete arrays in `backward`
        saved = sum(x.nbytes for x in jax.tree.leaves(backward))
        results[remat] = (value, backward(jnp.ones_like(value))[0], saved)
    v0, g0, saved0 = results["none"]
    for remat in ("dots", "full"):
        v, g, saved = results[remat]
        assert abs(float(v) - float(v0)) <= 1e-6
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert results["full"][2] < results["dots"][2] < 0.5 * saved0


@pytest.mark.slow  # 5-15 s: the fast lane stays short
def test_a_padded_token_table_is_the_same_model_and_its_padding_stays_zero():
    """vocab_multiple only pads the table: same draw for the real rows, zero padding rows whose
    logits are masked, the same loss, and a zero gradient for the padding (so it stays zero)."""
    plain = model.GPT2Config(vocab_size=97, n_positions=32, n_embd=64, n_layer=2, n_head=4, vocab_multiple=1)
    padded = plain.replace(vocab_multiple=64)
    assert padded.padded_vocab_size == 128 and plain.padded_vocab_size == 97
    pol = precision.policy("fp32")
    (gd0, p0), (gd1, p1) = model.create(plain, pol, 5), model.create(padded, pol, 5)
    np.testing.assert_array_equal(p1["wte"]["embedding"][:97], p0["wte"]["embedding"])
    assert model.count_params(p1, padded) == model.count_params(p0) == model.count_params(p1) - 31 * 64
    toks = jax.random.randint(jax.random.key(1), (2, 17), 0, 97)
    full = model.apply(gd1, p1, toks[:, :-1])
    assert full.shape == (2, 16, 128) and float(full[..., 97:].max()) == float(jnp.finfo(jnp.float32).min)
    np.testing.assert_allclose(model.logits(gd1, p1, toks[:, :-1]), model.logits(gd0, p0, toks[:, :-1]), atol=1e-5)

    def loss(gd, p):
        logits = model.apply(gd, p, toks[:, :-1])
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), toks[:, 1:, None], -1).mean()

    assert abs(float(loss(gd1, p1)) - float(loss(gd0, p0))) <= 1e-6
    grad = jax.grad(loss, argnums=1)(gd1, p1)["wte"]["embedding"]
    assert not np.asarray(grad[97:]).any() and np.asarray(grad[:97]).any()


@pytest.mark.slow  # over 3 s: out of the fast lane (runs in CI)
def test_token_ids_outside_the_vocabulary_are_refused():
    cfg = model.GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    gd, p = model.create(cfg, precision.policy("fp32"))
    for bad in ([[1, 2, 97]], [[-1, 3]]):
        with pytest.raises(DataError, match=r"outside the vocabulary \[0, 97\)"):
            model.logits(gd, p, np.array(bad))
        with pytest.raises(DataError, match="outside the vocabulary"):
            model.apply(gd, p, np.array(bad))
    assert model.logits(gd, p, np.array([[0, 96]])).shape == (1, 2, 97)


def test_layernorm_variance_is_two_pass_like_pytorch():
    """Features sharing a large mean: E[x^2] - mean^2 in float32 cancels away the variance."""
    cfg = model.GPT2Config(vocab_size=97, n_positions=16, n_embd=256, n_layer=1, n_head=2)
    ln = layers.layernorm(cfg, precision.policy("fp32"), nnx.Rngs(0))
    x = 3000.0 + np.random.RandomState(0).randn(4, 256).astype(np.float32) * 0.05
    ref = (x.astype(np.float64) - x.mean(-1, keepdims=True)) / np.sqrt(x.astype(np.float64).var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.asarray(ln(jnp.asarray(x))), ref, atol=2e-2)  # torch: 7e-3; E[x^2]-mean^2: 43


@pytest.mark.slow  # 5-15 s: the fast lane stays short
@pytest.mark.parametrize("chunk", [0, 5])  # one piece; 5 does not divide T=16 (a padded last chunk)
def test_chunked_cross_entropy_equals_the_full_logits_loss_and_gradients(chunk):
    """The training loss never materialises the (B, T, V) logits, yet equals optax's cross-entropy
    of the full logits: loss within 1e-6, every gradient (the tied table's included) within 1e-5."""
    cfg = model.GPT2Config(vocab_size=61, vocab_multiple=16, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                           embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, loss_chunk=chunk)
    gd, p = model.create(cfg, precision.policy("fp32"), 0)
    toks = jax.random.randint(jax.random.key(1), (3, 17), 0, 61)

    def full(p):
        logits = model.apply(gd, p, toks[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()

    def chunked(p):
        return model.token_losses(gd, p, toks[:, :-1], toks[:, 1:])[0].mean()

    (l_full, g_full), (l_chunk, g_chunk) = (jax.jit(jax.value_and_grad(f))(p) for f in (full, chunked))
    assert abs(float(l_full) - float(l_chunk)) <= 1e-6
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_full), jax.tree.leaves(g_chunk)):
        rel = float(jnp.linalg.norm(b - a) / jnp.linalg.norm(a))  # relative error of each gradient tensor
        assert rel <= 1e-5, (jax.tree_util.keystr(path), rel)
    # log Z is the log-sum-exp over the real vocabulary (padding rows masked)
    logz = model.token_losses(gd, p, toks[:, :-1], toks[:, 1:])[1]
    ref = jax.nn.logsumexp(model.apply(gd, p, toks[:, :-1])[..., :61], axis=-1)
    np.testing.assert_allclose(logz, ref, rtol=1e-6)


@pytest.mark.slow  # over 4 s: out of the fast lane (runs in CI)
def test_chunked_loss_keeps_no_logits_for_the_backward_pass():
    """With chunks, the residuals saved for the backward pass hold no (B, T, V)-sized array (eager
    vjp: the residuals are concrete arrays in the backward function)."""
    cfg = model.GPT2Config(vocab_size=4096, vocab_multiple=1, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                           embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, loss_chunk=8)
    gd, p = model.create(cfg, precision.policy("fp32"), 0)
    toks = jax.random.randint(jax.random.key(1), (2, 65), 0, 4096)
    saved = {}
    for chunk in (0, 8):
        g = model.GPT2Config(**{**cfg.__dict__, "loss_chunk": chunk})
        gd_c, _ = model.create(g, precision.policy("fp32"), 0)
        _, backward = jax.vjp(lambda p: model.token_losses(gd_c, p, toks[:, :-1], toks[:, 1:])[0].mean(), p)
        saved[chunk] = max(x.size for x in jax.tree.leaves(backward))
    logits_size = 2 * 64 * 4096
    assert saved[0] >= logits_size  # unchunked: the logits (or their softmax) are kept
    assert saved[8] <= 4096 * 32  # chunked: nothing larger than the (V, D) token table itself
