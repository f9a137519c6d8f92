"""jaxlm.bench's PyTorch baselines: the nanoGPT-style model is jaxlm's function, and the bench prints
the ratios against every baseline (never timings)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("use_bias", [True, False])
def test_nanogpt_baseline_computes_jaxlm_loss_and_gradients_from_the_same_weights(use_bias):
    import jax
    import jax.numpy as jnp

    from jaxlm import bench_torch, naming, precision
    from jaxlm import model as model_lib

    # vocab 65 (nanoGPT's characters) is padded to 128 rows in jaxlm: the baseline has 65, as nanoGPT does
    cfg = model_lib.GPT2Config(vocab_size=65, n_positions=24, n_embd=48, n_layer=2, n_head=3, embd_pdrop=0.0,
                               attn_pdrop=0.0, resid_pdrop=0.0, loss_chunk=8, use_bias=use_bias)
    graphdef, params = model_lib.create(cfg, precision.policy("fp32"), 3)
    # larger-than-init weights so the loss is far from log(65) and a mismatch cannot hide
    rng = np.random.RandomState(1)
    params = jax.tree.map(lambda x: x + 0.2 * rng.standard_normal(x.shape).astype(np.float32), params)
    batch = np.random.RandomState(0).randint(0, 65, (3, 21))
    tokens, targets = batch[:, :-1], batch[:, 1:]

    def loss_fn(p):
        return model_lib.token_losses(graphdef, p, jnp.asarray(tokens), jnp.asarray(targets))[0].mean()

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)

    model = bench_torch.nanogpt(cfg)
    bench_torch.load_jaxlm_params(model, params, cfg)
    model.train()  # dropout 0: train and eval are the same function
    torch_loss = model(torch.from_numpy(tokens), torch.from_numpy(targets))
    torch_loss.backward()
    loss, torch_loss = float(loss), float(torch_loss.detach())
    assert abs(loss - np.log(65)) > 0.5  # not the uniform loss either
    assert abs(torch_loss - loss) <= 1e-5 * loss
    flat = naming.flat(model_lib.per_layer(grads))
    wte = np.asarray(flat["wte.embedding"])[:65]  # the tied table: embedding and head gradients summed
    assert np.abs(model.wte.weight.grad.numpy() - wte).max() <= 1e-5 * np.abs(wte).max()
    fc = np.asarray(flat["h.1.mlp.c_fc.kernel"]).T
    assert np.abs(model.h[1].c_fc.weight.grad.numpy() - fc).max() <= 1e-5 * np.abs(fc).max()


def test_baseline_optimizer_decays_the_matrices_only():
    from jaxlm import bench_torch, config

    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py")
    model = bench_torch.nanogpt(cfg.model, 100)
    decay, no_decay = bench_torch.adamw(model, cfg.optim).param_groups
    assert decay["weight_decay"] == cfg.optim.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert decay["betas"] == (cfg.optim.b1, cfg.optim.b2) and decay["eps"] == cfg.optim.eps


@pytest.mark.slow
def test_a_tiny_bench_prints_the_ratio_to_every_baseline():
    res = subprocess.run(
        [sys.executable, "-m", "jaxlm.bench", "--shape=nanogpt_baby", "--config=configs/tiny.py", "--notorch_compile",
         "--steps=4", "--warmup=1",
         "--rounds=2", "--batch_per_device=2", "--config.train.seq_len=16", "--config.model.n_positions=16",
         "--config.model.n_layer=1", "--config.model.n_embd=32", "--config.model.n_head=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    # the shape's keys under the explicit --config.* overrides; its batch under --batch_per_device
    assert "shape nanogpt_baby: d 32 x 1 layers, 2 heads, vocab 65" in out and "batch 2 x 16 tokens" in out
    header = next(line for line in out.splitlines() if line.startswith("regime"))
    assert "vs HF" in header and "vs eager" in header
    ratios = next(line for line in out.splitlines() if line.startswith("ratios"))
    assert "jaxlm/eager" in ratios and "jaxlm/HF" in ratios
    assert "jaxlm/compiled" not in ratios and "vs compiled" not in header  # --notorch_compile (its compile: ~40 s)
    assert "nanoGPT-style GPT-2" in out and "HF GPT2LMHeadModel" in out
