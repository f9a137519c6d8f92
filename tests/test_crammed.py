"""Cramming's model switches (no Linear biases, gated-GELU MLP, embedding/final LayerNorm choices) and
configs/crammed.py: what each switch changes, HF parity where the function is GPT-2's, refusal where not."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm import config, hf, model, naming, optim, precision
from jaxlm.configs import crammed
from jaxlm.errors import CheckpointError, ConfigError

from conftest import ROOT

SMALL = dict(vocab_size=61, n_positions=16, n_embd=24, n_layer=2, n_head=3, attention_impl="reference",
             embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, vocab_multiple=1)


def _params(**switches):
    cfg = model.GPT2Config(**SMALL, **switches)
    gd, params = model.create(cfg, precision.policy("fp32"), 0)
    return cfg, gd, naming.flat(params)


@pytest.mark.slow  # over 4 s: out of the fast lane (runs in CI)
def test_each_switch_changes_exactly_its_parameters():
    _, _, base = _params()
    _, _, nobias = _params(use_bias=False)
    assert sorted(set(base) - set(nobias)) == sorted(
        f"h.{i}.{m}.bias" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert all(k.endswith((".kernel", ".embedding", ".scale", ".bias")) for k in nobias)  # LayerNorms keep theirs
    _, _, gated = _params(mlp_kind="gated_gelu")
    assert gated["h.0.mlp.c_fc.kernel"].shape == (24, 96) and gated["h.0.mlp.c_proj.kernel"].shape == (48, 24)
    _, _, emb = _params(ln_embed=True, ln_final=False)
    assert set(emb) - set(base) == {"ln_embed.scale", "ln_embed.bias"} and set(base) - set(emb) == {"ln_f.scale", "ln_f.bias"}
    with pytest.raises(ConfigError, match="model.mlp_kind: unknown 'swiglu'; allowed: gelu, gated_gelu"):
        model.GPT2Config(mlp_kind="swiglu")


def test_the_gated_mlp_is_gelu_of_one_half_times_the_other():
    cfg = model.GPT2Config(**SMALL, mlp_kind="gated_gelu")
    mlp = model.MLP(cfg, precision.policy("fp32"), rngs=nnx.Rngs(0))
    x = np.random.RandomState(0).randn(2, 3, 24).astype(np.float32)
    h = x @ np.asarray(mlp.c_fc.kernel[...]) + np.asarray(mlp.c_fc.bias[...])
    a, b = h[..., :48], h[..., 48:]
    want = np.asarray(jax.nn.gelu(a, approximate=True)) * b @ np.asarray(mlp.c_proj.kernel[...]) + np.asarray(
        mlp.c_proj.bias[...])
    np.testing.assert_allclose(np.asarray(mlp(x)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # over 4 s: out of the fast lane (runs in CI)
def test_no_bias_model_exports_to_hf_with_the_same_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg, gd, _ = _params(use_bias=False)
    _, params = model.create(cfg, precision.policy("fp32"), 3)
    params = jax.tree.map(lambda p: p * 5.0 if p.ndim > 1 else p, params)  # logits O(1): the tolerance means something
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 11))
    ours = np.asarray(model.logits(gd, params, tokens))
    assert np.abs(ours).max() > 1.0
    hf.save_pretrained(tmp_path / "hf", cfg, precision.policy("fp32"), params)
    m = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    with torch.no_grad():
        ref = m(torch.tensor(tokens)).logits.numpy()
    assert np.abs(ref - ours).max() <= 1e-4
    assert float(m.transformer.h[0].mlp.c_fc.bias.detach().abs().max()) == 0.0


@pytest.mark.parametrize("switch,why", [(dict(mlp_kind="gated_gelu"), "model.mlp_kind='gated_gelu'"),
                                        (dict(ln_embed=True), "model.ln_embed=True"),
                                        (dict(ln_final=False), "model.ln_final=False")])
def test_switches_that_change_the_function_are_refused_by_hf_export(tmp_path, switch, why):
    cfg, _, _ = _params(**switch)
    _, params = model.create(cfg, precision.policy("fp32"), 0)
    with pytest.raises(CheckpointError, match=f"cannot be exported as a Hugging Face GPT-2: {why}"):
        hf.save_pretrained(tmp_path / "hf", cfg, precision.policy("fp32"), params)
    assert not (tmp_path / "hf").exists()


def test_the_crammed_config_is_the_recipe():
    c = config.load(ROOT / "jaxlm" / "configs" / "crammed.py")
    m, o, t = c.model, c.optim, c.train
    assert (m.use_bias, m.mlp_kind, m.ln_embed, m.ln_final) == (False, "gated_gelu", True, True)
    assert m.embd_pdrop == m.attn_pdrop == m.resid_pdrop == 0.0
    assert (o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm, o.lr) == (0.9, 0.98, 1e-12, 0.01, 0.5, 1e-3)
    assert (o.schedule, t.batch_ramp, t.budget) == ("triangle", 0.6, "10m")
    assert t.seq_len == config.load(ROOT / "jaxlm" / "configs" / "tiny.py").train.seq_len
    # weight decay still only on matrices: no biases to exclude, LayerNorms (embedding one too) excluded
    _, params = model.create(config.model_config(c), precision.policy("fp32"), 0)
    decayed = {k for k, v in naming.flat(optim.decay_mask(params)).items() if v}
    assert "ln_embed.scale" not in decayed and "h.0.mlp.c_fc.kernel" in decayed
    small = crammed.get_config("small")
    assert small.model.n_layer == 12 and small.train.budget == "20m" and small.optim.warmup_steps == 0
