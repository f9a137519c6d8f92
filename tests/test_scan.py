"""model.scan_layers: one block of stacked parameters run by a scan is the loop over per-layer blocks
(the same parameters, losses, gradients, telemetry and decode), its program does not grow with depth,
and outside the program nothing changes: HF files, sharding rules, checkpoints of the other layout."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm import config, hf, model, naming, precision, sharding, train
from jaxlm import scan as scan_lib

from conftest import ROOT, SHARED_DATA, train_tiny_run

# every layer-index dependence on, dropout on (embedding, attention, residual)
CFG = model.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=3, n_head=2, attention_impl="reference",
                       scale_attn_by_inverse_layer_idx=True, query_key_layer_scaling=True)


def _pair(cfg=CFG, regime="fp32"):
    pol = precision.policy(regime)
    return pol, model.create(cfg, pol, 0), model.create(cfg.replace(scan_layers=True), pol, 0)


def _random_params(cfg=CFG):
    """Parameters of `cfg`'s layout, random numbers (no model run: cheap)."""
    rng = np.random.default_rng(0)
    _, abstract = model.abstract(cfg, precision.policy("fp32"))
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract)
    params["wte"]["embedding"][cfg.vocab_size:] = 0  # the token table's padding rows are zero
    return params


def _close(a, b, what):
    fa, fb = naming.flat(model.per_layer(a)), naming.flat(model.per_layer(b))
    assert fa.keys() == fb.keys(), what
    for k in fa:  # fp32 rounding: XLA fuses a loop body and an unrolled block differently
        np.testing.assert_allclose(np.asarray(fa[k], np.float32), np.asarray(fb[k], np.float32), rtol=1e-5,
                                   atol=1e-6, err_msg=f"{what}: {k}")


def test_stacked_parameters_are_named_with_a_layers_axis():
    pol = precision.policy("fp32")
    (_, loop), (_, scan) = model.abstract(CFG, pol), model.abstract(CFG.replace(scan_layers=True), pol)
    assert set(loop["h"]) == {0, 1, 2} and scan["h"]["attn"]["c_attn"]["kernel"].shape == (3, 32, 3, 2, 16)
    assert naming.flat(model.per_layer(scan)).keys() == naming.flat(loop).keys()
    assert naming.flat(model.layout_for(CFG.replace(scan_layers=True), loop)).keys() == naming.flat(scan).keys()
    # the 'layers' axis is first and on no mesh axis; per-layer names keep their axes
    assert model.param_axes("params.h.attn.c_attn.kernel") == ("layers", "embed", "qkv", "heads", "head_dim")
    assert model.param_axes("opt_state.0.mu.h.mlp.c_fc.bias") == ("layers", "mlp")
    assert model.param_axes("params.h.2.mlp.c_fc.bias") == ("mlp",)
    assert sharding.LOGICAL_RULES["layers"] is None
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    assert sharding.spec_for("params.h.attn.c_attn.kernel", (3, 32, 3, 2, 16), mesh) == \
        jax.sharding.PartitionSpec(None, "fsdp", None, "tensor", None)


@pytest.mark.slow  # lowers four programs: ~25 s under load
def test_the_program_holds_one_block_whatever_the_depth():
    """Lowered (not compiled): the scanned program's size does not grow with n_layer (but for the
    per-layer constants: the score-scale tables), the loop's does."""
    def size(n_layer, scan):
        cfg = CFG.replace(n_layer=n_layer, scan_layers=scan)
        graphdef, params = model.abstract(cfg, precision.policy("fp32"))
        tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
        loss = lambda p, t: model.token_losses(graphdef, p, t, t, dropout_key=jax.random.key(0))[0].mean()
        return len(jax.jit(jax.grad(loss)).lower(params, tokens).as_text())

    loop2, loop8, scan2, scan8 = size(2, False), size(8, False), size(2, True), size(8, True)
    assert loop8 > 2.5 * loop2, (loop2, loop8)
    assert scan8 < 1.1 * scan2, (scan2, scan8)


@pytest.mark.slow  # compiles two models' forward and backward and the telemetry passes: ~20 s under load
def test_scan_equals_the_loop_parameters_loss_gradients_telemetry_and_decode():
    pol, (g0, p0), (g1, p1) = _pair()
    flat_loop, flat_scan = naming.flat(p0), naming.flat(model.per_layer(p1))
    assert all(np.array_equal(flat_loop[k], flat_scan[k]) for k in flat_loop)  # same seed, same numbers
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
    key = jax.random.key(3)  # dropout: each layer draws from its own key in both
    grad = lambda g: jax.jit(jax.value_and_grad(lambda p: model.token_losses(g, p, tokens, tokens,
                                                                             dropout_key=key)[0].mean()))
    (l0, d0), (l1, d1) = grad(g0)(p0), grad(g1)(p1)
    assert float(l0) == pytest.approx(float(l1), rel=1e-6)
    _close(d0, d1, "gradients")
    (o0, s0), (o1, s1) = (jax.jit(lambda p, g=g: model.apply(g, p, tokens, collect_stats=True))(p)
                          for g, p in ((g0, p0), (g1, p1)))
    np.testing.assert_allclose(o0, o1, rtol=1e-5, atol=1e-6)
    assert s0.keys() == s1.keys() and s0["resid_rms"].shape == (CFG.n_layer,)
    for k in s0:
        np.testing.assert_allclose(np.asarray(s0[k], np.float32), np.asarray(s1[k], np.float32), rtol=1e-5,
                                   atol=1e-6, err_msg=k)
    r0, r1 = (model.apply(g, p, tokens, collect_residuals=True)[1] for g, p in ((g0, p0), (g1, p1)))
    assert r1.shape == (CFG.n_layer + 1, 2, 16, CFG.n_embd)
    np.testing.assert_allclose(r0, r1, rtol=1e-5, atol=1e-6)
    # decoding: prefill then one token, each layout with its own cache (per-layer tuple / stacked)
    outs = []
    for cfg, g, p in ((CFG, g0, p0), (CFG.replace(scan_layers=True), g1, p1)):
        cache = model.empty_cache(cfg, 2, pol.compute_dtype)
        _, cache = model.apply(g, p, tokens[:, :10], cache=cache)
        outs.append(model.apply(g, p, tokens[:, 10:11], cache=cache)[0])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # the flash kernel interpreted, two layers as a lax.switch: ~10 s idle
def test_scan_with_the_flash_kernel_and_layer_scaling_is_the_loop():
    """The kernel takes its scale as a constant: under the scan the core is one branch per layer."""
    cfg = model.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=2, embd_pdrop=0.0,
                           attn_pdrop=0.2, resid_pdrop=0.0, attention_impl="flash",
                           scale_attn_by_inverse_layer_idx=True)
    toks = jax.random.randint(jax.random.key(1), (2, 65), 0, 97)
    results = []
    for c in (cfg, cfg.replace(scan_layers=True)):
        gd, p = model.create(c, precision.policy("fp32"), 0)
        loss = lambda p, gd=gd: model.token_losses(gd, p, toks[:, :-1], toks[:, 1:],
                                                   dropout_key=jax.random.key(3))[0].mean()
        results.append(jax.jit(jax.value_and_grad(loss))(p))
    (l0, d0), (l1, d1) = results
    assert float(l0) == pytest.approx(float(l1), rel=1e-6)
    _close(d0, d1, "gradients")


def test_hf_export_is_byte_identical_and_imports_into_either_layout(tmp_path):
    cfg = CFG.replace(query_key_layer_scaling=False)  # HF-exportable
    pol = precision.policy("fp32")
    loop = _random_params(cfg)
    scan = model.layout_for(cfg.replace(scan_layers=True), loop)
    a = hf.save_pretrained(tmp_path / "loop", cfg, pol, loop)
    b = hf.save_pretrained(tmp_path / "scan", cfg.replace(scan_layers=True), pol, scan)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    tensors = hf._read_tensors(a)
    _, back = hf.params_from_hf(tensors, cfg.replace(scan_layers=True), pol)
    assert naming.flat(back).keys() == naming.flat(scan).keys()
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(scan)))


def test_a_train_state_converts_between_layouts_with_its_optimizer_moments():
    loop = _random_params()
    state = {"params": loop, "opt_state": optax.adamw(1e-3).init(loop), "step": jnp.zeros((), jnp.int32)}
    stacked = scan_lib.to_layout(state, stacked=True)
    assert stacked["opt_state"][0].mu["h"]["ln_1"]["scale"].shape == (3, CFG.n_embd)
    back = scan_lib.to_layout(stacked, stacked=False)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(state)))
    # a checkpoint restore target (abstract, sharded): the other layout, and the conversion back
    replicated = sharding.replicated(sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
    other, convert = scan_lib.other_layout(target)
    assert other["opt_state"][0].nu["h"]["attn"]["c_attn"]["kernel"].shape == (3, 32, 3, 2, 16)
    restored = convert(jax.tree.map(jnp.copy, stacked))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state)))


@pytest.mark.slow  # trains the tiny run, then resumes it in-process: ~1 min under load
def test_a_loop_checkpoint_resumes_with_scan_on_the_same_losses(tmp_path):
    """A run written by the loop, continued from its step-2 checkpoint with model.scan_layers=True (the
    checkpoint converts on restore), logs the losses the loop logged at steps 3 and 4 (fp32 rounding)."""
    small = {"train.steps": 4, "train.batch_size": 4, "train.seq_len": 32, "log.every": 1}
    written = train_tiny_run(tmp_path / "written", **small)  # checkpoints 0-4
    root = tmp_path / "scan" / "run"
    shutil.copytree(written, root)
    for step in (3, 4):
        shutil.rmtree(root / "checkpoints" / str(step))
    (root / "done.json").unlink()
    train_tiny_run(root.parent, **small, **{"model.scan_layers": True, "checkpoint.allow_config_change": True})
    records = {name: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for name, run in (("loop", written), ("scan", root))}
    losses = {name: {r["step"]: r["train/loss"] for r in rs if "train/loss" in r and r["step"] > 2}
              for name, rs in records.items()}
    assert sorted(losses["scan"]) == [3, 4] and sorted(losses["loop"]) == [3, 4]
    assert losses["scan"] == pytest.approx(losses["loop"], rel=1e-5)
    # it resumed (a run started afresh would log the same losses): its records of steps 1-2 begin with the
    # loop's, times included (then its own compile time, logged at step 2)
    early = {name: [r for r in rs if r["step"] <= 2] for name, rs in records.items()}
    assert early["loop"] and early["scan"][: len(early["loop"])] == early["loop"]


@pytest.mark.slow  # 2 × 20 tiny steps in-process: ~20 s
def test_the_tiny_configs_losses_with_scan_are_the_loops(steps=20):
    """configs/tiny.py's model, optimizer and batch shape, trained on the bytes of tinyshakespeare (no
    tokenizer: the point is the layouts, not the text), loop and scan. The suite runs the first 20 of
    the config's 300 steps (inside the warmup, long enough to learn the byte frequencies); all 300
    passed too (PERFORMANCE.md, 2026-12-02)."""
    text = SHARED_DATA / "tinyshakespeare.txt"
    if not text.exists():
        pytest.skip(f"{text} is absent")
    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {"data.vocab_size": 256})
    n, b, t = steps, cfg.train.batch_size, cfg.train.seq_len
    ids = np.frombuffer(text.read_bytes()[: n * b * (t + 1)], np.uint8).astype(np.int32).reshape(n, b, t + 1)
    losses = {}
    for scan in (False, True):
        cfg.model.scan_layers = scan
        trainer = train.Trainer(cfg, sharding.make_mesh(cfg.mesh), vocab_size=256)
        state, out = trainer.init(np.uint32(cfg.train.seed)), []
        for batch in ids:
            state, metrics = trainer.train_step(state, jnp.asarray(batch))
            out.append(float(metrics["train/loss"]))
        losses[scan] = np.asarray(out)
    assert losses[False][-1] < losses[False][0] - 0.3  # it learned
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)  # fp32 rounding


def test_the_gpt2_configs_scan_and_the_tiny_one_loops():
    assert config.model_config(config.load(ROOT / "jaxlm" / "configs" / "gpt2_xl.py")).scan_layers
    assert not config.model_config(config.load(ROOT / "jaxlm" / "configs" / "tiny.py")).scan_layers
