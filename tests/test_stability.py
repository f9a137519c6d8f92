"""Issue 20's machinery: the fp8 regime, the stability switches (qk_norm, z_loss, attn_logit_softcap),
the generalised ablation grid and the learning-rate sensitivity of its report."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import hf, model, precision
from jaxlm.ablate import analysis, grid, report, runs
from jaxlm.errors import CheckpointError, ConfigError

from conftest import ROOT

# --- fp8 ------------------------------------------------------------------------------------------

# (format, relative error bound of a normal value: half an ulp, smallest normal, smallest subnormal)
FORMATS = [(precision.E4M3, 2.0**-4, 2.0**-6, 2.0**-9), (precision.E5M2, 2.0**-3, 2.0**-14, 2.0**-16)]


@pytest.mark.parametrize("fmt,rel,min_normal,min_sub", FORMATS)
def test_fp8_round_trip_is_within_the_formats_error_bound(fmt, rel, min_normal, min_sub):
    x = np.asarray(jax.random.normal(jax.random.key(0), (4096,)), np.float32)
    x = x * np.exp2(np.asarray(jax.random.randint(jax.random.key(1), (4096,), -12, 12), np.float32))
    q, scale = precision.fp8_quantize(jnp.asarray(x), fmt)
    s = float(scale)
    assert s == 2.0 ** round(math.log2(s))  # a power of two ...
    fmax = float(jnp.finfo(fmt).max)
    assert np.abs(x).max() * s <= fmax < 2 * np.abs(x).max() * s  # ... the largest that keeps amax in range
    back = np.asarray(precision.fp8_dequantize(q, scale, jnp.float32))
    err = np.abs(back - x)
    normal = np.abs(x) * s >= min_normal
    assert (err[normal] <= rel * np.abs(x[normal])).all()
    assert (err[~normal] <= min_sub / 2 / s).all()  # subnormals: half the smallest step, unscaled
    # exact in the 16-bit compute dtypes: the power-of-two scale adds no rounding
    for dt in (jnp.bfloat16, jnp.float16):
        np.testing.assert_array_equal(np.asarray(precision.fp8_qdq(jnp.asarray(x, dt), fmt), np.float32),
                                      np.asarray(precision.fp8_qdq(jnp.asarray(x, dt).astype(jnp.float32), fmt)))


@pytest.mark.parametrize("fmt,rel,min_normal,min_sub", FORMATS)
def test_fp8_saturates_at_the_range_and_never_makes_inf(fmt, rel, min_normal, min_sub):
    fmax = float(jnp.finfo(fmt).max)
    q, _ = precision.fp8_quantize(jnp.asarray([1e9, -1e9, 2 * fmax, fmax, 1.0]), fmt, scale=jnp.float32(1.0))
    np.testing.assert_array_equal(np.asarray(q, np.float32), [fmax, -fmax, fmax, fmax, 1.0])
    st = precision.fp8_stats(jnp.asarray([3.0, 1e-30, 0.0, -3.0]), fmt)
    assert float(st["amax"]) == 3.0 and float(st["saturated"]) == 0.0 and float(st["underflow"]) == 0.25


@pytest.mark.slow  # over 4 s: out of the fast lane (runs in CI)
def test_fp8_dot_matches_numpy_on_the_quantised_operands():
    a = jax.random.normal(jax.random.key(0), (16, 32), jnp.float32).astype(jnp.bfloat16)
    b = (jax.random.normal(jax.random.key(1), (32, 8)) * 1e-3).astype(jnp.bfloat16)
    dn = (((1,), (0,)), ((), ()))
    out = precision.fp8_dot_general(a, b, dn)
    assert out.dtype == jnp.bfloat16

    def qdq(x, fmt):  # the reference: scale to the format's max by a power of two, round, unscale
        x = np.asarray(x, np.float32)
        s = 2.0 ** np.floor(np.log2(float(jnp.finfo(fmt).max) / np.abs(x).max()))
        return np.asarray(jnp.asarray(x * s).astype(fmt), np.float32) / s

    ref = qdq(a, precision.E4M3) @ qdq(b, precision.E4M3)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=2**-8, atol=1e-6)
    g = jax.random.normal(jax.random.key(2), (16, 8))
    da, db = jax.grad(lambda a, b: (precision.fp8_dot_general(a, b, dn).astype(jnp.float32) * g).sum(), (0, 1))(a, b)
    g8 = qdq(np.asarray(g.astype(jnp.bfloat16), np.float32), precision.E5M2)
    np.testing.assert_allclose(np.asarray(da, np.float32), g8 @ qdq(b, precision.E4M3).T, rtol=2**-7, atol=1e-6)
    np.testing.assert_allclose(np.asarray(db, np.float32), qdq(a, precision.E4M3).T @ g8, rtol=2**-7, atol=1e-4)


def _defs(hlo: str) -> dict[str, str]:
    """SSA name -> its defining line, in the lowered program's main function."""
    main = hlo[hlo.index("func.func public @main"):]
    main = main[: main.index("\n  }\n")]
    return {m.group(1): line for line in main.splitlines() if (m := re.match(r"\s*(%[\w#]+) = ", line))}


def _from_fp8(name: str, defs: dict[str, str], depth: int = 6) -> set[str]:
    """The float8 types `name` was converted from, through converts, scalings and layout changes."""
    line = defs.get(name.split("#")[0], "")
    m = re.search(r"stablehlo\.convert %\S+ : \(tensor<[^>]*x(f8\w+)>\)", line)
    if m:
        return {m.group(1)}
    if depth == 0 or not re.search(r"stablehlo\.(convert|divide|multiply|transpose|reshape|broadcast_in_dim) ", line):
        return set()
    operands = re.findall(r"(%[\w#]+)", line.split("=", 1)[1].split(":")[0])
    return set().union(*[_from_fp8(o, defs, depth - 1) for o in operands]) if operands else set()


def test_fp8_train_step_quantises_every_large_matmul_and_nothing_else():
    """Read from the lowered train step: the Linear layers' matmuls (forward and both backward products)
    take operands converted from float8 (e4m3 forward; e5m2 for the cotangent in the backward); the
    head's and the attention core's matmuls take none."""
    from jaxlm import config, sharding, train

    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {"train.batch_size": 4, "train.seq_len": 16,
                                                    "model.n_positions": 16, "precision.regime": "fp8"})
    tr = train.Trainer(cfg, sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1]), cfg.data.vocab_size)
    batch = jax.ShapeDtypeStruct((4, 17), jnp.int32, sharding=tr.batch_sharding)
    hlo = tr.train_step.lower(train.abstract_state(tr), batch).as_text()
    defs = _defs(hlo)
    V, H, T = 1024, cfg.model.n_head, 16  # the head's dots involve the vocabulary, the core's the (B, H, T, S) scores
    core_or_head = (f"x{V}", f"4x{H}x{T}x{T}")
    large, other = [], []
    for line in defs.values():
        if "stablehlo.dot_general" not in line:
            continue
        ops = re.findall(r"dot_general (%[\w#]+), (%[\w#]+)", line)[0]
        (other if any(s in line for s in core_or_head) else large).append([_from_fp8(o, defs) for o in ops])
    L = cfg.model.n_layer
    assert len(large) == 3 * 4 * L and len(other) == 3 * (2 * L + 1)  # forward + 2 backward products each
    fwd = [f for f in large if f == [{"f8E4M3FN"}, {"f8E4M3FN"}]]
    bwd = [f for f in large if sorted(map(sorted, f)) == [["f8E4M3FN"], ["f8E5M2"]]]
    assert len(fwd) == 4 * L and len(bwd) == 8 * L, large
    assert all(f == [set(), set()] for f in other), other


@pytest.mark.slow  # 5-15 s: the fast lane stays short
def test_fp8_stats_are_sown_per_layer():
    cfg = model.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    gd, p = model.create(cfg, precision.policy("fp8"))
    _, stats = model.apply(gd, p, jnp.arange(16)[None] % 50, collect_stats=True)
    assert all(stats[k].shape == (2,) for k in ("fp8_amax", "fp8_saturated", "fp8_underflow"))
    assert (stats["fp8_amax"] > 0).all() and (stats["fp8_saturated"] == 0).all()
    assert stats["logit_mean"].shape == () and stats["log_z"].shape == ()


# --- the stability switches ---------------------------------------------------------------------

CFG = model.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2, attention_impl="reference")
TOKS = (jnp.arange(12)[None] * 7) % 50


def test_switches_off_are_todays_model():
    gd, p = model.create(CFG, precision.policy("fp32"), seed=3)
    off = CFG.replace(qk_norm=False, z_loss=0.0, attn_logit_softcap=0.0)
    gd_off, p_off = model.create(off, precision.policy("fp32"), seed=3)
    assert jax.tree.structure(p) == jax.tree.structure(p_off)
    assert "q_norm" not in str(jax.tree.structure(p))  # the HF parameter set (tests/test_hf.py's parity holds)
    np.testing.assert_array_equal(model.apply(gd, p, TOKS), model.apply(gd_off, p_off, TOKS))
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply(gd_off, p, TOKS))(p_off))
    assert jaxpr.count("= tanh ") == CFG.n_layer  # GELU's only: no soft-cap
    with pytest.raises(CheckpointError, match=r"cannot be exported as a Hugging Face GPT-2: model.qk_norm=True"):
        hf.config_to_hf(CFG.replace(qk_norm=True), precision.policy("fp32"))
    with pytest.raises(CheckpointError, match=r"model.attn_logit_softcap=5.0"):
        hf.config_to_hf(CFG.replace(attn_logit_softcap=5.0), precision.policy("fp32"))
    hf.config_to_hf(CFG.replace(z_loss=1e-4, query_key_layer_scaling=True), precision.policy("fp32"))  # export fine
    assert model.param_axes("params.h.3.attn.k_norm.bias") == ("head_dim",)  # what the train step's sharding reads
    with pytest.raises(ConfigError, match=r"model.z_loss"):
        CFG.replace(z_loss=-1.0)


def _np_attention(x, p, cfg, softcap=0.0, qk_norm=False):
    """One attention layer in numpy: fused QKV, optional per-head LayerNorm of q and k, causal softmax."""
    a = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in p.items() if isinstance(d, dict)}
    qkv = np.einsum("btd,dchk->btchk", x, a["c_attn"]["kernel"]) + a["c_attn"]["bias"]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if qk_norm:
        def ln(t, prm):
            mu, var = t.mean(-1, keepdims=True), t.var(-1, keepdims=True)
            return (t - mu) / np.sqrt(var + cfg.layer_norm_epsilon) * prm["scale"] + prm["bias"]
        q, k = ln(q, a["q_norm"]), ln(k, a["k_norm"])
    s = np.einsum("bthk,bshk->bhts", q, k) / math.sqrt(cfg.head_dim)
    if softcap:
        s = softcap * np.tanh(s / softcap)
    T = x.shape[1]
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshk->bthk", w, v).reshape(x.shape)
    return o @ a["c_proj"]["kernel"] + a["c_proj"]["bias"]


@pytest.mark.slow  # over 4 s: out of the fast lane (runs in CI)
@pytest.mark.parametrize("switch", [dict(qk_norm=True), dict(attn_logit_softcap=0.5)])
def test_qk_norm_and_softcap_against_numpy(switch):
    from flax import nnx

    cfg = CFG.replace(**switch)
    gd, p = model.create(cfg, precision.policy("fp32"), seed=1)
    attn = p["h"][0]["attn"]
    key = iter(jax.random.split(jax.random.key(5), 8))
    for name in ("q_norm", "k_norm"):  # non-trivial LayerNorm parameters, so that they count
        if name in attn:
            attn[name] = {n: jax.random.normal(next(key), v.shape) for n, v in attn[name].items()}
    attn["c_attn"]["kernel"] = attn["c_attn"]["kernel"] * 20  # scores of order 1, so the cap bites
    x = np.asarray(jax.random.normal(next(key), (2, 12, 32)), np.float32)
    m = nnx.merge(gd, p)
    ours, _ = m.h[0].attn(jnp.asarray(x))
    ref = _np_attention(x.astype(np.float64), attn, cfg, cfg.attn_logit_softcap, cfg.qk_norm)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=2e-4, atol=2e-5)
    plain = _np_attention(x.astype(np.float64), attn, cfg)
    assert np.abs(ref - plain).max() > 1e-2 * np.abs(plain).max()  # the switch changes the function


@pytest.mark.slow  # 5-15 s: the fast lane stays short
def test_z_loss_is_added_to_the_objective_not_to_the_reported_loss():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 8)) * 3
    logits = logits.at[..., 6:].set(jnp.finfo(jnp.float32).min)  # padding columns add nothing to Z
    l64 = np.asarray(logits[..., :6], np.float64)
    log_z = np.log(np.exp(l64).sum(-1))
    lz = jax.nn.logsumexp(logits, axis=-1)
    assert float(model.z_loss(lz, 1e-2)) == pytest.approx(1e-2 * np.mean(log_z**2), rel=1e-5)

    from jaxlm import config, sharding, train

    for z in (0.0, 0.5):
        cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {"train.batch_size": 2, "train.seq_len": 8,
                                                        "model.n_positions": 8, "model.z_loss": z})
        tr = train.Trainer(cfg, sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1]), cfg.data.vocab_size)
        params = tr.init(0).params
        batch = jnp.arange(18).reshape(2, 9) % cfg.data.vocab_size
        objective, loss = tr._loss(params, batch, None, 1.0)
        lg = model.apply(tr.graphdef, params, batch[:, :-1])
        assert float(objective - loss) == pytest.approx(float(model.z_loss(jax.nn.logsumexp(lg, axis=-1), z)),
                                                        rel=1e-5, abs=1e-7)


# --- the grid and its report --------------------------------------------------------------------

def test_grid_cells_are_the_product_of_the_switches():
    from jaxlm import config

    cfg = config.load(ROOT / "jaxlm" / "configs" / "stress_fp16.py")
    sw = [grid.parse_switch("layer_scaling=none,megatron"), grid.parse_switch("model.qk_norm=off,on"),
          grid.parse_switch("optim.lr=1e-3,3e-2")]
    cells = grid.cells(["fp16", "fp8"], [21, 49], sw)
    assert len(cells) == 2 * 2 * 2 * 2 * 2 and len({c.name for c in cells}) == len(cells)
    c = next(c for c in cells if c.name == "fp8-lsmegatron-qk_norm-on-lr3e-2-s49")
    over = c.overrides(cfg)
    assert over == {"model.scale_attn_by_inverse_layer_idx": False, "model.query_key_layer_scaling": True,
                    "model.qk_norm": True, "optim.lr": 0.03}
    assert grid.cells(["fp16"], [21], [grid.parse_switch("layer_scaling=on")])[0].name == "fp16-lson-s21"  # as before
    for bad, pattern in (("model.qk_norm", "expected KEY=V1"), ("layer_scaling=mega", "none, hf, megatron")):
        with pytest.raises(ConfigError, match=pattern):
            grid.parse_switch(bad)
    with pytest.raises(ConfigError, match="model.qk_norm='maybe'.*on/off"):
        grid.Cell("fp16", 0, (("model.qk_norm", "maybe"),)).overrides(cfg)


def test_lr_sensitivity_equals_a_hand_computation():
    nan = float("nan")
    points = {1e-3: [(4.0, 7.0), (4.2, 7.0)],  # 4.1
              1e-2: [(3.0, 7.0), (3.4, 7.0)],  # 3.2: the best
              1e-1: [(nan, 7.0), (8.0, 7.0)]}  # diverged and above init: both count as 7.0
    s = analysis.lr_sensitivity(points)
    assert s["best_lr"] == 1e-2 and s["best_loss"] == pytest.approx(3.2)
    assert s["sensitivity"] == pytest.approx(((4.1 - 3.2) + 0 + (7.0 - 3.2)) / 3)
    assert s["diverges_at"] == 1e-1
    assert analysis.lr_sensitivity({1e-3: [(5.0, 7.0)], 1e-2: [(5.0, 7.0)]})["sensitivity"] == 0.0
    # a run's loss at init is step 1's loss (the first record holds only the compile time); final: validation
    recs = [{"step": 0, "perf/compile_time_s": 9.0}, {"step": 5, "train/loss": 6.5, "train/step_losses": [7.0, 6.0]},
            {"step": 10, "train/loss": 5.0, "eval/loss": 5.5}]
    run = runs.Run(ROOT, "cpu", "fp16", False, 21, recs, {"step": 10}, {"qk_norm": True}, 1e-2)
    assert (run.init_loss, run.final_loss, run.config_label) == (7.0, 5.5, "fp16 +qk_norm")
    assert math.isnan(runs.Run(ROOT, "cpu", "fp32", False, 21, recs, {"stopped": "non-finite"}).final_loss)


@pytest.mark.slow  # 5-15 s: the fast lane stays short
def test_interrupted_sweep_resumes(tmp_path, monkeypatch):
    """A two-LR grid whose second cell was interrupted after its step-2 checkpoint: rerunning skips the
    finished cell and resumes the other from step 2, ending where the uninterrupted run ended."""
    import json
    import shutil

    from jaxlm import config
    from jaxlm import run as run_lib

    from conftest import write_word_corpus

    corpus = write_word_corpus(tmp_path / "corpus", 30)
    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {
        "data.source": f"files:{corpus}/*.txt", "data.vocab_size": 300, "data.val_fraction": 0.2, "train.steps": 4,
        "train.eval_every": 0, "log.wandb_mode": "disabled", "log.stats_every": 0, "log.every": 1,
        "checkpoint.stages": ((2, 4),), "checkpoint.async_save": False})
    cells = grid.cells(["fp32"], [21], [grid.parse_switch("optim.lr=1e-3,1e-2")])
    grid.run_grid(cfg, cells, tmp_path / "g", log=lambda s: None)
    b = tmp_path / "g" / "cells" / cells[1].name
    final = json.loads((b / "metrics.jsonl").read_text().splitlines()[-1])[report.T.LOSS]
    (b / "done.json").unlink()  # the interruption: after the step-2 checkpoint, before the end
    shutil.rmtree(b / "checkpoints" / "4")
    (b / "metrics.jsonl").write_text("\n".join((b / "metrics.jsonl").read_text().splitlines()[:2]) + "\n")
    said = []
    real_run = run_lib.run
    monkeypatch.setattr(run_lib, "run", lambda c, w, log=None: real_run(c, w, log=said.append))
    lines = []
    status = grid.run_grid(cfg, cells, tmp_path / "g", log=lines.append)
    assert f"{cells[0].name}: already finished, skipped" in lines[0]
    assert any("resumed from the checkpoint at step 2" in s for s in said), said
    assert [s for _, s in status] == ["done before", "finished"]
    assert json.loads((b / "metrics.jsonl").read_text().splitlines()[-1])[report.T.LOSS] == final
