"""Studies: the fp16 stress preset, the ablation grid and its report, eval, generation."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxlm import eval as eval_lib
from jaxlm import generate, model, saved_run, telemetry
from jaxlm import run as run_lib
from jaxlm.data import tokenizer as tok_lib

from conftest import ROOT, once_per_session

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The stress preset, shortened: naive fp16 vs fp16_upcast, layer scaling on, one seed."""
    def build(out):
        cmd = [sys.executable, "-m", "jaxlm.ablate", "--config=configs/stress_fp16.py", "--regimes=fp16,fp16_upcast",
               "--layer-scaling=on", "--seeds=21", "--steps=40", f"--out={out}", "--config.log.wandb_mode=offline"]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert res.returncode == 0, res.stderr[-3000:]
        return out, res

    return once_per_session(tmp_path_factory, "stress-grid", build)


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _f(x):
    return float(x)  # "nan"/"inf" strings too


@pytest.mark.slow
def test_stress_preset_fp16_overflows_and_upcast_trains(grid):
    out, _ = grid
    naive = _records(out / "cells" / "fp16-lson-s21")
    upcast = _records(out / "cells" / "fp16_upcast-lson-s21")
    assert any(any(r.get(telemetry.LAYER_NONFINITE, [])) for r in naive), "fp16 scores must overflow"
    assert naive[-1][telemetry.SKIPPED] > 0
    assert not any(any(r.get(telemetry.LAYER_NONFINITE, [])) for r in upcast)
    assert upcast[-1][telemetry.SKIPPED] == 0
    losses = [_f(r[telemetry.LOSS]) for r in upcast if telemetry.LOSS in r]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses
    # the overflow is the attention one: upcast's raw QK^T (score × 16 × layer) is past fp16's range
    assert max(_f(r[telemetry.ATTN_MAX][0]) for r in upcast if telemetry.ATTN_MAX in r) * 16 > 65504


@pytest.mark.slow
def test_every_cell_is_an_offline_wandb_run_of_the_study_by_regime_with_the_switched_keys(grid):
    """What W&B's grouping and parallel coordinates read, from the run files wandb wrote (offline)."""
    from helpers import wandb_offline

    out, _ = grid
    for cell, regime in (("fp16-lson-s21", "fp16"), ("fp16_upcast-lson-s21", "fp16_upcast")):
        info = wandb_offline.run_info(out / "cells" / cell)
        assert (info["group"], info["job_type"], info["name"]) == (out.name, regime, cell)
        c = info["config"]
        assert (c["regime"], c["seed"], c["scale_attn_by_inverse_layer_idx"], c["query_key_layer_scaling"]) == (
            regime, 21, True, False)  # the switched keys, top-level
        assert c["precision"]["regime"] == regime and c["train"]["steps"] == 40  # and the whole config, nested


@pytest.mark.slow
def test_rerunning_the_grid_skips_finished_cells(grid):
    out, _ = grid
    cmd = [sys.executable, "-m", "jaxlm.ablate", "--config=configs/stress_fp16.py", "--regimes=fp16_upcast",
           "--layer-scaling=on", "--seeds=21", "--steps=40", f"--out={out}", "--config.log.wandb_mode=disabled"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "fp16_upcast-lson-s21: already finished, skipped" in res.stderr


@pytest.mark.slow
def test_report_from_two_machines(grid, tmp_path):
    from jaxlm.ablate import report

    out, _ = grid
    other = tmp_path / "h100"
    shutil.copytree(out / "cells", other)
    for meta in other.rglob("run.json"):  # the same grid, recorded on another accelerator
        m = json.loads(meta.read_text())
        m["environment"]["device_kind"] = "NVIDIA H100 80GB HBM3"
        meta.write_text(json.dumps(m))
    md = report.build([out / "cells", other], tmp_path / "report").read_text()
    for device in ("cpu", "NVIDIA H100 80GB HBM3"):
        for regime in ("fp16 +layer-scale", "fp16_upcast +layer-scale"):
            assert f"| {device} | {regime} |" in md
    stab = md.split("## Stability per run")[1].split("##")[0]
    row = next(line for line in stab.splitlines() if line.startswith("| cpu | fp16 +layer-scale | 21 |"))
    first_bad = int(row.split("|")[4])
    assert 0 < first_bad <= 40 and int(row.split("|")[5]) > 0
    assert "| cpu | fp16_upcast +layer-scale | 21 | none | 0 |" in stab
    assert "non-finite" in md.split("## Final loss")[1].split("##")[0]  # fp16's final loss
    html = (tmp_path / "report" / "report.html").read_text()
    for name in report.PLOTS:
        data = (tmp_path / "report" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
        from PIL import Image

        Image.open(tmp_path / "report" / name).verify()
        assert f"({name})" in md and f'src="{name}"' in html


@pytest.mark.slow
def test_eval_perplexity_equals_exp_mean_token_loss(grid):
    out, _ = grid
    run = out / "cells" / "fp16_upcast-lson-s21"
    cfg, trainer, state, meta, step = saved_run.load_run(run)
    text = eval_lib.encode_stream(tok_lib.load(meta["data"]["tokenizer"]),
                                  eval_lib.documents(cfg.data.source, cfg.data, "validation", 3), "validation")
    # independently: non-overlapping windows, log-softmax in numpy
    ctx = cfg.train.seq_len
    toks = text.tokens
    nll = []
    for s in range(0, len(toks) - 1, ctx):
        x = toks[s: s + ctx + 1]
        logits = np.asarray(model.logits(trainer.graphdef, state.params, x[:-1]), np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll.extend(-logp[np.arange(len(x) - 1), x[1:]])
    expect = math.exp(np.mean(nll))
    r = eval_lib.evaluate(trainer.graphdef, state.params, text, context=ctx, stride=ctx)
    assert r["tokens"] == len(toks) - 1 == len(nll)
    assert r["perplexity"] == pytest.approx(expect, rel=1e-4)
    docs_bytes = sum(len(d.encode("utf-8")) for d in _val_docs(cfg, 3))
    assert r["bytes"] == docs_bytes
    assert r["bits_per_byte"] == pytest.approx(np.sum(nll) / math.log(2) / docs_bytes, rel=1e-4)
    # a sliding window scores every token exactly once; the first window is the same in both
    slid = eval_lib.token_nll(trainer.graphdef, state.params, text, context=ctx, stride=ctx // 4)
    assert slid.size == r["tokens"]
    np.testing.assert_allclose(slid[:ctx], nll[:ctx], rtol=1e-4)


def _val_docs(cfg, n):
    from jaxlm.data import sources

    c = cfg.data.copy_and_resolve_references()
    c.max_docs = n
    return list(sources.open_source(c).documents("validation"))


@pytest.mark.slow
def test_eval_cli_all_steps_writes_csv_and_plot(grid):
    out, _ = grid
    run = out / "cells" / "fp16_upcast-lson-s21"
    res = subprocess.run([sys.executable, "-m", "jaxlm.eval", f"--workdir={run}", "--all-steps", "--max_docs=2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0, res.stderr[-2000:]
    rows = (run / "eval.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,perplexity,bits_per_byte") and len(rows) == 1 + 2  # steps 0 and 40
    assert (run / "eval.png").read_bytes().startswith(PNG)
    assert f"wrote {run / 'eval.csv'} and {run / 'eval.png'}" in res.stderr  # says where
    assert "method: every token of the text scored once" in res.stderr  # and how it differs from training's
    assert float(rows[2].split(",")[1]) < float(rows[1].split(",")[1])  # trained beats initial


@pytest.mark.slow
def test_generation_with_kv_cache_equals_without(grid):
    out, _ = grid
    _, trainer, state, meta, _ = saved_run.load_run(out / "cells" / "fp16_upcast-lson-s21")
    tok = tok_lib.load(meta["data"]["tokenizer"])
    prompt = tok.encode(["def __init__(self"])[0]
    args = (trainer.graphdef, state.params, trainer.model_cfg, trainer.policy, prompt, 24)
    cached = generate.generate(*args, temperature=0.0)
    plain = generate.generate(*args, temperature=0.0, use_cache=False)
    assert cached == plain and len(cached) == 24
    # fp32 too (the fp16_upcast cache is fp16)
    cfg32 = trainer.model_cfg
    from jaxlm import precision

    gd32, _ = model.create(cfg32, precision.policy("fp32"))
    args32 = (gd32, state.params, cfg32, precision.policy("fp32"), prompt, 16)
    assert generate.generate(*args32, temperature=0.0) == generate.generate(*args32, temperature=0.0, use_cache=False)
    a = generate.generate(*args, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    b = generate.generate(*args, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    c = generate.generate(*args, temperature=1.0, top_k=20, top_p=0.9, seed=4)
    assert a == b and a != c


def test_sampling_filters():
    logits = jax.numpy.log(jax.numpy.asarray([0.5, 0.3, 0.15, 0.05]))
    keys = jax.random.split(jax.random.key(0), 400)
    top_k = {int(generate.sample(logits, k, 1.0, 2, 1.0)) for k in keys}
    assert top_k == {0, 1}
    top_p = {int(generate.sample(logits, k, 1.0, 0, 0.7)) for k in keys}
    assert top_p == {0, 1}  # 0.5 < 0.7, then 0.5+0.3 covers it
    assert int(generate.sample(logits, keys[0], 0.0, 0, 1.0)) == 0


# --- the report's account of a diverged run (one definition of its first non-finite step) -----------

def _study_run(d, regime, seed, losses, every=5, compute="float32", done=True):
    """A run directory as jaxlm.main writes it: every step's loss in records of `every` steps."""
    d.mkdir(parents=True)
    meta = {"environment": {"device_kind": "cpu"},
            "precision": {"name": regime, "compute_dtype": compute, "attn_dtype": compute, "param_dtype": "float32"},
            "config": {"model": {"scale_attn_by_inverse_layer_idx": False}, "optim": {"lr": 1e-3},
                       "train": {"seed": seed, "budget": "none"}}}
    (d / "run.json").write_text(json.dumps(meta))
    recs = []
    for end in range(every, len(losses) + 1, every):
        chunk = [str(x) if not math.isfinite(x) else x for x in losses[end - every:end]]
        mean = float(np.mean(losses[end - every:end]))
        recs.append({"step": end, telemetry.LOSS: mean if math.isfinite(mean) else "nan",
                     telemetry.STEP_LOSSES: chunk, telemetry.LOSS_SCALE: 2.0 ** 15 if compute == "float16" else 1.0})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if done:
        (d / "done.json").write_text(json.dumps({"step": len(losses), "stopped": None}))


DIVERGES_AT_17 = [4.0 - 0.05 * i for i in range(16)] + [float("nan")] * 24  # steps 1..16 finite, NaN from 17


def test_the_cli_and_the_report_name_the_same_first_non_finite_step(tmp_path):
    from jaxlm.ablate import grid, runs

    _study_run(tmp_path / "fp16-s21", "fp16", 21, DIVERGES_AT_17, compute="float16")
    run = runs.read_run(tmp_path / "fp16-s21")
    # the record at step 20 holds steps 16..20: the first NaN is step 17, not the record's step 20
    assert run.first_nonfinite_step() == 17
    assert grid.outcome(tmp_path / "fp16-s21") == run.status == "diverged (non-finite training loss at step 17)"
    _study_run(tmp_path / "fp32-s21", "fp32", 21, [4.0 - 0.05 * i for i in range(40)])
    assert runs.read_run(tmp_path / "fp32-s21").status == "finished"


def test_a_diverged_curve_is_drawn_above_the_others_and_marked(tmp_path):
    from jaxlm.ablate import plots, runs

    plt = plots._plt()
    same = [4.0 - 0.05 * i for i in range(40)]  # fp16 follows fp32 exactly until it diverges
    d = ROOT / "unused"
    bad = runs.Run(d, "cpu", "fp16", False, 21, [], {"step": 40})
    ok = runs.Run(d, "cpu", "fp32", False, 21, [], {"step": 40})
    for r, losses in ((bad, same[:16] + [float("nan")] * 24), (ok, same)):
        r.records = [{"step": e, telemetry.LOSS: float(np.mean(losses[e - 5:e])),
                      telemetry.STEP_LOSSES: losses[e - 5:e]} for e in range(5, 41, 5)]
    fig, ax = plt.subplots()
    plots.draw_over_steps(ax, {bad.group: [bad], ok.group: [ok]}, telemetry.LOSS)  # the diverged group first
    lines = {line.get_label(): line for line in ax.get_lines()}
    diverged = next(v for k, v in lines.items() if "fp16" in k)
    assert "diverged at step 17" in diverged.get_label()
    assert diverged.get_zorder() > lines[ok.label + " [cpu]"].get_zorder()  # on top of fp32's, not beneath it
    xs = [line for line in ax.get_lines() if line.get_marker() == "x"]
    assert len(xs) == 1 and xs[0].get_xdata()[0] == 15 and xs[0].get_zorder() > diverged.get_zorder() - 0.01
    plt.close(fig)
    for r in (bad, ok):  # loss over training time: "(1 seed)", not "(1 seeds)"
        r.records = [{"step": 10, telemetry.TRAIN_TIME: 60.0, telemetry.EVAL_LOSS: 3.0}]
    labels = plots.plot_loss_over_time({bad.group: [bad], ok.group: [ok, ok]}, tmp_path / "t.png")
    assert labels == ["fp16 (1 seed)", "fp32 (2 seeds)"]


def _layers_run(device, regime, model, rms, steps=(50,)):
    from jaxlm.ablate import runs

    r = runs.Run(ROOT / "unused", device, regime, True, 21, [], {"step": 60}, model=model)
    r.records = [{"step": s, telemetry.LOSS: 3.0, telemetry.RESID_RMS: list(rms)} for s in steps]
    return r


@pytest.mark.parametrize("rms", [(1.0, 1.1, 1.3), (0.8, 2.0, 8.0), (0.5, 3.0, 40.0), (1e-2, 1.0, 1e6)])
def test_the_rms_panel_labels_at_least_three_values(rms):
    """Its log axis labels >= 3 values over narrow and wide ranges (matplotlib's default labels only the
    powers of ten: one label over 0.8-8)."""
    from jaxlm.ablate import plots

    plt = plots._plt()
    r = _layers_run("cpu", "fp32", {}, rms)
    fig, ax = plt.subplots(figsize=(7, 4))
    plots.draw_final_layers(ax, {r.group: [r]}, telemetry.RESID_RMS, "RMS", "Per-layer activation RMS")
    fig.canvas.draw()
    lo, hi = ax.get_ylim()
    locs = [v for v in ax.yaxis.get_major_locator()() if lo <= v <= hi]
    labels = [t for t in ax.yaxis.get_major_formatter().format_ticks(locs) if t]
    plt.close(fig)
    assert len(labels) >= 3 and len(set(labels)) == len(labels), (rms, labels)


def test_heat_map_titles_fit_their_panels_at_a_legible_size_and_one_sampled_step_warns_nothing():
    """A long configuration label is wrapped to its panel's width at 10 points; a run with its layer stats
    at one step only (a short budgeted cell) is drawn as one column, with no matplotlib warning."""
    import warnings

    from jaxlm.ablate import plots

    model = {"query_key_layer_scaling": True, "qk_norm": True, "z_loss": 1e-4, "attn_logit_softcap": 30.0}
    by_group = {r.group: [r] for r in (_layers_run("NVIDIA H100 80GB HBM3", "fp16_upcast", model, (1.0, 2.0)),
                                       _layers_run("cpu", "fp32", {}, (1.0, 3.0), steps=(5, 10, 15)))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 'Attempting to set identical low and high xlims' before
        fig = plots.layer_heatmaps(by_group, telemetry.RESID_RMS, "Residual-stream RMS per layer")
        fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.get_title()][:2]
    assert len(panels) == 2
    for ax in panels:
        assert ax.title.get_fontsize() >= 10
        assert ax.title.get_window_extent(renderer).width <= ax.get_window_extent(renderer).width * 1.05, ax.get_title()
        assert ax.get_xlim()[0] < ax.get_xlim()[1]
    assert "\n" in panels[0].get_title()  # the long one wrapped
    assert panels[0].get_xlim() == (49.5, 50.5) and panels[1].get_xlim() == (2.5, 17.5)  # columns centred on steps
    plots._plt().close(fig)


@pytest.mark.slow  # a subprocess and two reports: 5-15 s
def test_ablate_report_says_where_it_wrote_and_has_no_loss_scale_panel_without_fp16(tmp_path):
    study = tmp_path / "study"
    _study_run(study / "fp32-s21", "fp32", 21, [4.0 - 0.05 * i for i in range(40)])
    _study_run(study / "bf16-s21", "bf16", 21, DIVERGES_AT_17, compute="bfloat16")
    res = subprocess.run([sys.executable, "-m", "jaxlm.ablate", "report", str(study), "--out=rep"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0, res.stderr[-2000:]
    rep = (tmp_path / "rep").resolve()
    assert f"report: wrote {rep / 'report.md'} and {rep / 'report.html'} (with 5 plots) in {rep}" in res.stdout
    md = (rep / "report.md").read_text()
    assert not (rep / "loss_scale.png").exists() and "loss_scale.png" not in md  # no fp16 cell, no loss scale
    assert "| cpu | bf16 | 21 | 17 | 0 | 1 | diverged (non-finite training loss at step 17) |" in md
    html = (rep / "report.html").read_text()  # the same document, rendered by Python-Markdown
    assert "<td>diverged (non-finite training loss at step 17)</td>" in html and '<img alt="' in html
    from jaxlm.ablate import report

    _study_run(study / "fp16-s21", "fp16", 21, DIVERGES_AT_17, compute="float16")
    md = report.build([study], tmp_path / "rep2").read_text()
    assert (tmp_path / "rep2" / "loss_scale.png").read_bytes().startswith(PNG) and "(loss_scale.png)" in md


@pytest.mark.slow  # a real tiny run: 5-15 s
def test_a_real_bf16_divergence_has_one_first_non_finite_step_everywhere(tmp_path):
    """bf16 stops at its first non-finite log record (train.stop_on_nonfinite): the stop line, the grid's
    status and the report's run all name the first step whose own loss is non-finite, not the record's."""
    from jaxlm import config
    from jaxlm.ablate import grid, runs

    # lr 1e30: Adam's first update moves every parameter by ~1e30, so step 2's forward overflows
    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {
        "precision.regime": "bf16", "optim.lr": 1e30, "optim.warmup_steps": 0, "train.steps": 10, "log.every": 5,
        "train.batch_size": 8, "train.seq_len": 32, "model.n_positions": 32, "log.wandb_mode": "disabled",
        "log.stats_every": 0, "train.eval_every": 0, "log.tensorboard": False, "data.max_docs": 40,
        "data.tokenizer_max_docs": 40, "data.vocab_size": 512})
    result = run_lib.run(cfg, tmp_path, log=lambda s: None)
    run = runs.read_run(tmp_path)
    bad = run.first_nonfinite_step()
    assert result.step == 5 and bad is not None and 1 < bad < 5  # inside the record at step 5
    assert result.stopped.startswith(f"non-finite training loss at step {bad} ") and "regime 'bf16'" in result.stopped
    assert json.loads((tmp_path / "done.json").read_text())["stopped"] == result.stopped  # as the run wrote it
    assert run.status == grid.outcome(tmp_path, result.stopped) == f"diverged (non-finite training loss at step {bad})"
