"""The ablation report: from run directories (from one or several machines) to report.md,
report.html and PNG plots.

    path = build([DIR, ...], OUT, target_loss=None)     # OUT/report.md; also report.html and the plots

The parts: reading runs (``jaxlm.ablate.runs``), the analyses (``analysis``: LR sensitivity, time
to a loss), the plots (``plots``) and here the document. The document is written once, in Markdown
(``Doc``); report.html is that Markdown rendered by Python-Markdown (``markdown`` with its ``tables``
extension, already a dependency of TensorBoard) inside a small styled page.

With several learning rates the report adds the learning-rate sweep of Wortsman et al. (2023):
final loss vs LR per configuration, the LR sensitivity of each (``analysis.lr_sensitivity``), and
the max attention logit vs step at the highest LR. Under train.budget it adds the loss at equal
time and the time to a target loss.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from pathlib import Path

import markdown
import numpy as np

from jaxlm import files
from jaxlm import telemetry as T
from jaxlm.ablate import analysis, plots
from jaxlm.ablate.runs import find_runs
from jaxlm.errors import DataError

PLOTS = ("loss.png", "loss_scale.png", "grad_norm.png", "attn_max_heatmap.png", "resid_rms_heatmap.png",
         "resid_rms_final.png")
LR_PLOTS = ("lr_sweep.png", "attn_max_top_lr.png", "log_z_top_lr.png")
CAPTIONS = {
    "loss.png": "Training loss vs step per regime; seeds as a band; a diverged run on top, x at its last finite loss.",
    "loss_scale.png": "fp16 dynamic loss scale vs step (1 for regimes without loss scaling).",
    "grad_norm.png": "Gradient global norm before and after clipping.",
    "attn_max_heatmap.png": "Max pre-softmax attention score per layer over time (first seed of each regime).",
    "resid_rms_heatmap.png": "Residual-stream RMS per layer over time.",
    "resid_rms_final.png": "Per-layer residual-stream RMS at the last sampled step.",
}
_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
          "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
          "text-align:right}th{background:#f4f4f4}img{max-width:100%}em{color:#555}")


class Doc:
    """The report as Markdown blocks; ``html`` renders the same text."""

    def __init__(self):
        self.blocks: list[str] = []

    def h(self, text, level=2):
        self.blocks.append("#" * level + " " + text)

    def p(self, text):
        self.blocks.append(text)

    def table(self, headers, rows):
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        self.blocks.append("\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]))

    def img(self, path, caption):
        self.blocks.append(f"![{caption}]({path})\n\n*{caption}*")

    def markdown(self) -> str:
        return "\n\n".join(self.blocks) + "\n"

    def html(self, title) -> str:
        body = markdown.markdown(self.markdown(), extensions=["tables"])
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{_STYLE}</style>"
                f"</head><body>\n{body}\n</body></html>\n")


def _fmt(values, digits=3) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "–"
    if not all(math.isfinite(x) for x in v):
        return "non-finite"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{np.mean(v):.{digits}f} ± {np.std(v):.{digits}f}"


def plot_names(runs) -> tuple[str, ...]:
    """The step plots this set of runs gets: the loss-scale panel only where a run is fp16 (loss scaling)."""
    return tuple(n for n in PLOTS if n != "loss_scale.png" or any(r.loss_scaling for r in runs))


def _plots(by_group, names, out: Path) -> None:
    plots.plot_over_steps(by_group, T.LOSS, out / "loss.png", "train loss (nats/token)",
                          "Training loss (line: mean over seeds, band: min-max; dotted: first non-finite step)")
    if "loss_scale.png" in names:
        plots.plot_over_steps(by_group, T.LOSS_SCALE, out / "loss_scale.png", "loss scale", "fp16 dynamic loss scale",
                              log_y=True, band=False)
    plots.plot_over_steps(by_group, T.GRAD_NORM, out / "grad_norm.png", "gradient norm",
                          "Gradient norm before (solid) and after (dashed) clipping", log_y=True, band=False,
                          style_key=T.GRAD_NORM_CLIPPED)
    plots.plot_layer_heatmaps(by_group, T.ATTN_MAX, out / "attn_max_heatmap.png", "Max attention score per layer")
    plots.plot_layer_heatmaps(by_group, T.RESID_RMS, out / "resid_rms_heatmap.png", "Residual-stream RMS per layer")
    plots.plot_final_layers(by_group, T.RESID_RMS, out / "resid_rms_final.png", "RMS",
                            "Per-layer activation RMS, last sample")


def build(dirs, out, target_loss: float | None = None) -> Path:
    """Writes OUT/report.md, OUT/report.html and the plots for the runs found under `dirs`."""
    missing = [str(d) for d in dirs if not Path(d).is_dir()]
    if missing:
        raise DataError(f"no such directory: {', '.join(missing)}")
    runs = find_runs(dirs)
    if not runs:
        raise DataError(f"no run directories (run.json + metrics.jsonl) under {', '.join(map(str, dirs))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by_group: dict = defaultdict(list)
    for r in sorted(runs, key=lambda r: (r.device, r.config_label, r.lr, r.seed)):
        by_group[r.group].append(r)
    names = plot_names(runs)
    with warnings.catch_warnings():  # all-NaN slices are expected where a regime diverged
        warnings.filterwarnings("ignore", message="(Mean of empty slice|All-NaN slice)", category=RuntimeWarning)
        _plots(by_group, names, out)

    doc = Doc()
    doc.h("jaxlm precision ablation", 1)
    devices = sorted({r.device for r in runs})
    doc.p(f"{len(runs)} runs from {len(dirs)} director{'y' if len(dirs) == 1 else 'ies'}; accelerators: "
          f"{', '.join(devices)}; regimes: {', '.join(sorted({r.label for r in runs}))}.")
    _final_loss_section(doc, by_group)
    _stability_section(doc, by_group)
    _throughput_section(doc, by_group)
    if any(r.budget != "none" for r in runs):
        _budget_sections(doc, by_group, out, target_loss)
    doc.h("Plots")
    for name in names:
        doc.img(name, CAPTIONS[name])
    if len({r.lr for r in runs}) > 1:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="(Mean of empty slice|All-NaN slice)", category=RuntimeWarning)
            _lr_section(doc, runs, out)
    files.atomic_write(out / "report.md", doc.markdown())
    files.atomic_write(out / "report.html", doc.html("jaxlm precision ablation"))
    return out / "report.md"


def _final_loss_section(doc: Doc, by_group) -> None:
    doc.h("Final loss (mean ± std over seeds)")
    rows = []
    for (device, label), rs in by_group.items():
        train_l = [r.last(T.LOSS) for r in rs]
        eval_l = [r.last(T.EVAL_LOSS) for r in rs]
        ppl = [math.exp(x) if x is not None and math.isfinite(x) and x < 700 else (float("nan") if x is not None else None)
               for x in eval_l]
        steps = [r.records[-1][T.STEP] if r.records else 0 for r in rs]
        rows.append([device, label, len(rs), max(steps), _fmt(train_l), _fmt(eval_l), _fmt(ppl, 2)])
    doc.table(["accelerator", "regime", "seeds", "steps", "train loss", "val loss", "val perplexity"], rows)


def _stability_section(doc: Doc, by_group) -> None:
    doc.h("Stability per run")
    doc.p("First non-finite step: the first step whose training loss is not finite (every step's loss is "
          "logged); fp16's steps skipped for overflowing gradients are counted apart.")
    rows = []
    for (device, label), rs in by_group.items():
        for r in rs:
            first = r.first_nonfinite_step()
            rows.append([device, label, r.seed, "none" if first is None else first,
                         int(r.last(T.SKIPPED) or 0), _fmt([r.last(T.LOSS_SCALE)], 0), r.status])
    doc.table(["accelerator", "regime", "seed", "first non-finite step", "skipped steps", "final loss scale",
               "status"], rows)


def _throughput_section(doc: Doc, by_group) -> None:
    doc.h("Throughput by accelerator")
    rows = []
    for (device, label), rs in by_group.items():
        tps, mfu = [], []
        for r in rs:
            s, v = r.series(T.TOKENS_PER_S)
            if len(v) > 1:
                tps.append(float(np.median(v[1:])))  # the first window includes compilation
            elif len(v):
                tps.append(float(v[0]))
            s, v = r.series(T.MFU)
            v = v[np.isfinite(v)] if len(v) else v
            if len(v):
                mfu.append(float(np.median(v)))
        rows.append([device, label, _fmt(tps, 0), _fmt([100 * x for x in mfu], 1) + (" %" if mfu else "")])
    doc.table(["accelerator", "regime", "tokens/s (median)", "MFU"], rows)


def _lr_section(doc, runs, out: Path) -> None:
    points = analysis.lr_points(runs)
    plots.plot_lr_sweep(points, out / "lr_sweep.png")
    plots.plot_at_top_lr(runs, T.ATTN_MAX, out / "attn_max_top_lr.png", "max attention score (over layers)",
                         "Max pre-softmax attention score")
    plots.plot_at_top_lr(runs, T.LOG_Z, out / "log_z_top_lr.png", "mean log Z", "Output log-partition function",
                         per_layer=False)
    doc.h("Learning-rate sensitivity")
    doc.p("Per configuration (Wortsman et al. 2023): LR sensitivity = mean over the LRs of [min(final loss, "
          "loss at init) − the best over the LRs], final losses averaged over seeds, a diverged run counted at "
          "its loss at init. 'diverges at': the smallest LR at which a seed ended non-finite or not below its "
          "initial loss.")
    rows = []
    for (device, label), by_lr in points.items():
        s = analysis.lr_sensitivity(by_lr)
        seeds = sorted({len(v) for v in by_lr.values()})
        rows.append([device, label, ", ".join(f"{lr:g}" for lr in sorted(by_lr)), "/".join(map(str, seeds)),
                     f"{s['sensitivity']:.3f}", f"{s['best_lr']:g}", f"{s['best_loss']:.3f}",
                     "none" if s["diverges_at"] is None else f"{s['diverges_at']:g}",
                     " ".join(f"{s['losses'][lr]:.2f}" for lr in sorted(by_lr))])
    doc.table(["accelerator", "configuration", "LRs", "seeds", "LR sensitivity", "best LR", "best loss",
               "diverges at", "loss per LR"], rows)
    for name, caption in (("lr_sweep.png", "Final loss vs learning rate per configuration."),
                          ("attn_max_top_lr.png", "Max attention score (over layers) vs step at the highest LR."),
                          ("log_z_top_lr.png", "Mean output log Z vs step at the highest LR (what z-loss pulls to 0).")):
        doc.img(name, caption)


def _budget_sections(doc: Doc, by_group, out: Path, target_loss: float | None) -> None:
    """Final validation loss at the budget, time to a target loss, and the loss-vs-time panel; rows
    ranked within each accelerator only (seconds on different machines are not comparable)."""
    doc.h("At equal time: final validation loss at the budget (mean ± std over seeds)")
    rows = []
    for (device, label), rs in by_group.items():
        finals = [r.last(T.EVAL_LOSS) for r in rs]
        steps = [r.records[-1][T.STEP] if r.records else 0 for r in rs]
        mean = float(np.mean([x for x in finals if x is not None])) if any(x is not None for x in finals) else math.inf
        rows.append((device, mean, [device, label, sorted({r.budget for r in rs}), len(rs),
                                    _fmt([float(x) for x in steps], 0), _fmt(finals)]))
    ranked = []
    for device in sorted({d for d, _, _ in rows}):
        mine = sorted(((m, row) for d, m, row in rows if d == device), key=lambda x: x[0])
        ranked += [row[:2] + [i + 1] + [", ".join(row[2])] + row[3:] for i, (_, row) in enumerate(mine)]
    doc.table(["accelerator", "recipe/regime", "rank (this accelerator)", "budget", "seeds", "steps", "val loss"],
              ranked)
    if target_loss is not None:
        doc.h(f"Time to validation loss {target_loss:g} (training minutes, mean ± std over seeds that reach it)")
        rows = []
        for (device, label), rs in by_group.items():
            times = [analysis.time_to_loss(r, target_loss) for r in rs]
            reached = [t / 60 for t in times if t is not None]
            rows.append([device, label, f"{len(reached)}/{len(rs)}", _fmt(reached, 2)])
        doc.table(["accelerator", "recipe/regime", "seeds reaching it", "minutes"], rows)
    plots.plot_loss_over_time(by_group, out / "loss_vs_time.png", target_loss)
    doc.img("loss_vs_time.png", "Validation loss vs training time, one panel per accelerator, one line per seed.")
