"""The ablation report: from run directories (from one or several machines) to report.md,
report.html and PNG plots.

A run directory is any folder holding ``run.json`` and ``metrics.jsonl`` (what ``jaxlm.main``
writes). Runs are grouped by (accelerator kind, configuration): the regime, the model's stability
switches that are on (layer scaling, qk_norm, z_loss, softcap) and, when the runs have several, the
learning rate; seeds are aggregated.

With several learning rates the report adds the learning-rate sweep of Wortsman et al. (2023):
final loss vs LR per configuration, the LR sensitivity of each (``lr_sensitivity``), and the max
attention logit vs step at the highest LR.
"""

from __future__ import annotations

import html
import json
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jaxlm import files
from jaxlm import telemetry as T
from jaxlm.errors import DataError


@dataclass
class Run:
    path: Path
    device: str
    regime: str
    layer_scaling: bool
    seed: int
    records: list[dict]
    done: dict | None = None
    model: dict = field(default_factory=dict)  # the run's model config section
    lr: float = 0.0
    show_lr: bool = False  # the label names the LR (set when the runs have several)
    variant: str = ""  # the run directory's name less its seed, where it is not a grid cell's (e.g. 'crammed')
    budget: str = "none"  # train.budget

    @property
    def group(self) -> tuple[str, str]:
        return self.device, self.label

    @property
    def config_label(self) -> str:
        """The regime and the model's stability switches that are on (what a LR sweep varies over)."""
        m = self.model
        out = self.regime + (" +layer-scale" if self.layer_scaling else "")
        out += " +megatron-scale" if m.get("query_key_layer_scaling") else ""
        out += " +qk_norm" if m.get("qk_norm") else ""
        out += f" +z_loss={m['z_loss']:g}" if m.get("z_loss") else ""
        out += f" +softcap={m['attn_logit_softcap']:g}" if m.get("attn_logit_softcap") else ""
        return out

    @property
    def label(self) -> str:
        return (self.config_label + (f" {self.variant}" if self.variant else "")
                + (f" lr={self.lr:g}" if self.show_lr else ""))

    @property
    def init_loss(self) -> float:
        """The loss before the first update (step 1's loss is computed with the initial parameters)."""
        first = next((r for r in self.records if T.LOSS in r), {})  # (the step-0 record holds the compile time)
        losses = first.get(T.STEP_LOSSES) or [first.get(T.LOSS, float("nan"))]
        return _num(losses[0])

    @property
    def final_loss(self) -> float:
        """The last validation loss (else the last training loss); NaN if the run stopped early or ended
        non-finite -- a diverged run."""
        if (self.done or {}).get("stopped"):
            return float("nan")
        v = self.last(T.EVAL_LOSS)
        v = self.last(T.LOSS) if v is None else v
        return float("nan") if v is None else v

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a scalar metric; 'nan'/'inf' strings become floats."""
        pts = [(r[T.STEP], _num(r[key])) for r in self.records if key in r and not isinstance(r[key], list)]
        if not pts:
            return np.zeros(0), np.zeros(0)
        s, v = zip(*pts)
        return np.asarray(s), np.asarray(v, float)

    def layers(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values[step, layer]) of a per-layer metric."""
        pts = [(r[T.STEP], [_num(x) for x in r[key]]) for r in self.records if isinstance(r.get(key), list)]
        if not pts:
            return np.zeros(0), np.zeros((0, 0))
        s, v = zip(*pts)
        return np.asarray(s), np.asarray(v, float)

    def first_nonfinite_step(self) -> int | None:
        for r in self.records:
            bad = r.get(T.NONFINITE, 0) or any(r.get(T.LAYER_NONFINITE) or []) or (
                T.LOSS in r and not math.isfinite(_num(r[T.LOSS])))
            if bad:
                return r[T.STEP]
        return None

    def last(self, key: str):
        s, v = self.series(key)
        return (float(v[-1]) if len(v) else None)


def _num(x) -> float:
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, str):
        return float(x)  # "nan", "inf", "-inf"
    return float(x) if x is not None else float("nan")


def find_runs(dirs) -> list[Run]:
    runs = []
    for d in dirs:
        for meta_file in sorted(Path(d).rglob("run.json")):
            run_dir = meta_file.parent
            if not (run_dir / "metrics.jsonl").exists():
                continue
            meta = json.loads(meta_file.read_text())
            records, _ = T.read_metrics(run_dir / "metrics.jsonl")
            done = json.loads((run_dir / "done.json").read_text()) if (run_dir / "done.json").exists() else None
            model = meta["config"]["model"]
            runs.append(Run(run_dir, meta["environment"]["device_kind"], meta["precision"]["name"],
                             bool(model["scale_attn_by_inverse_layer_idx"]),
                             int(meta["config"]["train"]["seed"]), records, done, model,
                             float(meta["config"]["optim"]["lr"]), variant=_variant(run_dir, meta["precision"]["name"]),
                             budget=str(meta["config"]["train"].get("budget", "none"))))
    if len({r.lr for r in runs}) > 1:
        for r in runs:
            r.show_lr = True
    return runs


# --- learning-rate sensitivity (Wortsman et al. 2023, section 3.2) -------------------------------

def lr_sensitivity(points: dict[float, list[tuple[float, float]]]) -> dict:
    """LR sensitivity of one configuration from {lr: [(final loss, loss at init) per seed]}:
    E over the LRs of [min(loss(η), loss at init) − the best such loss over the LRs], where loss(η) is
    the mean over seeds of each seed's min(final, init) and a diverged (non-finite) run counts as its
    loss at init. Also the best LR and loss, and the smallest LR at which a seed diverged (non-finite
    or not below its initial loss), or None."""
    clamped = {lr: float(np.mean([init if not math.isfinite(f) else min(f, init) for f, init in seeds]))
               for lr, seeds in sorted(points.items())}
    best_lr = min(clamped, key=clamped.get)
    best = clamped[best_lr]
    diverged = [lr for lr, seeds in sorted(points.items()) if any(not math.isfinite(f) or f >= i for f, i in seeds)]
    return {"sensitivity": float(np.mean([v - best for v in clamped.values()])), "best_lr": best_lr,
            "best_loss": best, "diverges_at": diverged[0] if diverged else None, "losses": clamped}


def lr_points(runs) -> dict:
    """{(device, config label): {lr: [(final loss, init loss) per seed]}} of the finished runs (a run still
    going or interrupted has no final loss yet)."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r.done is None:
            continue
        out[(r.device, r.config_label)][r.lr].append((r.final_loss, r.init_loss))
    return out


def _variant(run_dir: Path, regime: str) -> str:
    """'crammed' of a run directory 'crammed-s21'; '' for a grid cell (named '<regime>-<switches>-s<seed>',
    whose switches the label names already) or a name without a seed suffix."""
    base, sep, seed = run_dir.name.rpartition("-s")
    if not sep or not seed.isdigit() or base == regime or base.startswith(regime + "-"):
        return ""
    return base


# --- document blocks rendered to both Markdown and HTML ----------------------------------------

@dataclass
class Doc:
    blocks: list = field(default_factory=list)

    def h(self, text, level=2):
        self.blocks.append(("h", level, text))

    def p(self, text):
        self.blocks.append(("p", text))

    def table(self, headers, rows):
        self.blocks.append(("table", headers, rows))

    def img(self, path, caption):
        self.blocks.append(("img", path, caption))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                out.append("| " + " | ".join(b[1]) + " |")
                out.append("|" + "---|" * len(b[1]))
                out.extend("| " + " | ".join(str(c) for c in row) + " |" for row in b[2])
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1]})\n\n*{b[2]}*")
            out.append("")
        return "\n".join(out)

    def html(self, title) -> str:
        e = html.escape
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
               "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
               "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
               "text-align:right}th{background:#f4f4f4}img{max-width:100%}figcaption{color:#555}</style>"
               "</head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{e(b[1])}</p>")
            elif b[0] == "table":
                out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in b[1]) + "</tr>")
                out.extend("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in b[2])
                out.append("</table>")
            elif b[0] == "img":
                out.append(f"<figure><img src='{e(b[1])}' alt='{e(b[2])}'><figcaption>{e(b[2])}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out)


def _fmt(values, digits=3) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "–"
    if not all(math.isfinite(x) for x in v):
        return "non-finite"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{np.mean(v):.{digits}f} ± {np.std(v):.{digits}f}"


# --- plots ------------------------------------------------------------------------------------

def _plt():
    import matplotlib  # heavy, and only for the plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg backend

    return plt


def _color_map(groups):
    return {g: f"C{i % 10}" for i, g in enumerate(groups)}


_MARKERS = "osv^Dx+*<>"


def _line_style(i: int, n_points: int) -> dict:
    """Group i's line: wider for earlier groups (drawn first, so beneath) and its own marker at its own
    offset, so a curve lying exactly on another (fp16 on fp32 before it diverges) still shows."""
    every = max(n_points // 6, 1)
    return dict(lw=max(2.8 - 0.4 * i, 0.9), marker=_MARKERS[i % len(_MARKERS)], ms=5,
                markevery=(min(i * max(every // 4, 1), max(n_points - 1, 0)), every))


def _group_label(g):
    device, label = g
    return f"{label} [{device}]"


def _seed_curve(runs, key):
    """(steps, mean, min, max, n seeds) of a scalar metric over the runs that logged the same steps."""
    curves = [(s, v) for s, v in (r.series(key) for r in runs) if len(s)]
    if not curves:
        return None
    steps = curves[0][0]
    mat = np.vstack([v for s, v in curves if len(s) == len(steps) and np.array_equal(s, steps)])
    finite = np.where(np.isfinite(mat), mat, np.nan)
    return steps, np.nanmean(finite, axis=0), np.nanmin(finite, axis=0), np.nanmax(finite, axis=0), len(mat)


def plot_over_steps(by_group, key, path, ylabel, title, log_y=False, band=True, style_key=None):
    """One line per group (mean over seeds; a min-max band), a dotted line at the first non-finite
    step, and optionally `style_key` dashed in the same colour."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = _color_map(by_group)
    for i, (g, runs) in enumerate(by_group.items()):
        c = _seed_curve(runs, key)
        if c is None:
            continue
        steps, mean, lo, hi, n = c
        ax.plot(steps, mean, color=colors[g], label=_group_label(g) + (f" ({n} seeds)" if n > 1 else ""),
                **_line_style(i, len(steps)))
        if band and n > 1:
            ax.fill_between(steps, lo, hi, color=colors[g], alpha=0.2)
        bad = [b for b in (r.first_nonfinite_step() for r in runs) if b is not None]
        if bad:
            ax.axvline(min(bad), color=colors[g], ls=":", lw=1)
        c2 = _seed_curve(runs, style_key) if style_key else None
        if c2 is not None:
            ax.plot(c2[0], c2[1], color=colors[g], ls="--", lw=1)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    if log_y:
        ax.set_yscale("log")
    _grid_and_legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grid_and_legend(ax, fontsize: int = 8) -> None:
    """The panels' common ending: a light grid, and a legend where a line is labelled."""
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # an empty panel has no legend
        ax.legend(fontsize=fontsize)


def plot_layer_heatmaps(by_group, key, path, title, log_color=True):
    plt = _plt()
    from matplotlib.colors import LogNorm  # matplotlib: lazy, as above

    groups = [(g, runs[0]) for g, runs in by_group.items() if len(runs[0].layers(key)[0])]
    if not groups:
        groups = [(g, runs[0]) for g, runs in by_group.items()]
    n = max(len(groups), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols + 1, 3.4 * rows), squeeze=False,
                             layout="constrained")
    finite_all = [v for _, r in groups for v in r.layers(key)[1].ravel() if math.isfinite(v) and v > 0]
    vmin, vmax = (min(finite_all), max(finite_all)) if finite_all else (1, 10)
    cmap = plt.get_cmap("viridis").with_extremes(bad="red")
    im = None
    for ax, (g, run) in zip(axes.ravel(), groups):
        steps, vals = run.layers(key)
        if not len(steps):
            ax.set_axis_off()
            continue
        vals = np.where(np.isfinite(vals), vals, np.nan)
        norm = LogNorm(vmin=max(vmin, 1e-3), vmax=max(vmax, vmin * 1.01)) if log_color else None
        im = ax.imshow(np.abs(vals).T, aspect="auto", origin="lower", cmap=cmap, norm=norm,
                       extent=(steps[0], steps[-1], -0.5, vals.shape[1] - 0.5), interpolation="nearest")
        ax.set(title=_group_label(g) + f" seed {run.seed}", xlabel="step", ylabel="layer",
               yticks=range(vals.shape[1]))
        ax.title.set_fontsize(8)
    for ax in axes.ravel()[len(groups):]:
        ax.set_axis_off()
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.9, label="|value| (log)")
    fig.suptitle(title + " (red: non-finite)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_final_layers(by_group, key, path, ylabel, title):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = _color_map(by_group)
    for g, runs in by_group.items():
        finals = []
        for r in runs:
            steps, vals = r.layers(key)
            if len(steps):
                finals.append(vals[-1])
        if finals:
            m = np.vstack(finals)
            with np.errstate(all="ignore"):
                ax.plot(range(m.shape[1]), np.nanmean(np.where(np.isfinite(m), m, np.nan), axis=0), "o-",
                        color=colors[g], label=_group_label(g))
    n_layers = max((r.layers(key)[1].shape[1] for rs in by_group.values() for r in rs), default=1)
    ax.set(xlabel="layer", ylabel=ylabel, title=title + " (missing: non-finite)", yscale="log",
           xticks=range(n_layers))
    _grid_and_legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lr_sweep(points, path):
    """Final loss vs LR per configuration (log-x; mean over seeds, min-max band); a diverged run is
    drawn at its loss at init, with an x."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    colors = _color_map(points)
    for i, (g, by_lr) in enumerate(points.items()):
        lrs = sorted(by_lr)
        vals = [[init if not math.isfinite(f) else min(f, init) for f, init in by_lr[lr]] for lr in lrs]
        mean = [np.mean(v) for v in vals]
        ax.plot(lrs, mean, color=colors[g], label=_group_label(g), **_line_style(i, len(lrs)))
        if max(len(v) for v in vals) > 1:
            ax.fill_between(lrs, [min(v) for v in vals], [max(v) for v in vals], color=colors[g], alpha=0.15)
        bad = [(lr, init) for lr in lrs for f, init in by_lr[lr] if not math.isfinite(f)]
        if bad:
            ax.scatter(*zip(*bad), marker="x", s=60, color=colors[g], zorder=5)
    ax.set(xscale="log", xlabel="learning rate", ylabel="final loss (nats/token)",
           title="Final loss vs learning rate (mean over seeds, band: min-max; x: diverged, drawn at init loss)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_at_top_lr(runs, key, path, ylabel, title, per_layer=True):
    """`key` vs step (its max over layers if per layer) at the highest LR, per configuration, first seed."""
    plt = _plt()
    top = max(r.lr for r in runs)
    chosen: dict = {}
    for r in sorted(runs, key=lambda r: r.seed):
        if r.lr == top:
            chosen.setdefault((r.device, r.config_label), r)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = _color_map(chosen)
    for i, (g, r) in enumerate(chosen.items()):
        if per_layer:
            steps, vals = r.layers(key)
            vals = np.nanmax(np.where(np.isfinite(vals), np.abs(vals), np.nan), axis=1) if len(steps) else vals
        else:
            steps, vals = r.series(key)
        if len(steps):
            ax.plot(steps, vals, color=colors[g], label=_group_label(g), **_line_style(i, len(steps)))
        bad = r.first_nonfinite_step()
        if bad is not None:
            ax.axvline(bad, color=colors[g], ls=":", lw=1)
    ax.set(xlabel="step", ylabel=ylabel, title=f"{title} at the highest LR ({top:g}); dotted: first non-finite step")
    ax.title.set_fontsize(9)
    if per_layer:
        ax.set_yscale("log")
    _grid_and_legend(ax, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


LR_PLOTS = ("lr_sweep.png", "attn_max_top_lr.png", "log_z_top_lr.png")


def _lr_section(doc, runs, out: Path) -> None:
    points = lr_points(runs)
    plot_lr_sweep(points, out / "lr_sweep.png")
    plot_at_top_lr(runs, T.ATTN_MAX, out / "attn_max_top_lr.png", "max attention score (over layers)",
                   "Max pre-softmax attention score")
    plot_at_top_lr(runs, T.LOG_Z, out / "log_z_top_lr.png", "mean log Z", "Output log-partition function",
                   per_layer=False)
    doc.h("Learning-rate sensitivity")
    doc.p("Per configuration (Wortsman et al. 2023): LR sensitivity = mean over the LRs of [min(final loss, "
          "loss at init) − the best over the LRs], final losses averaged over seeds, a diverged run counted at "
          "its loss at init. 'diverges at': the smallest LR at which a seed ended non-finite or not below its "
          "initial loss.")
    rows = []
    for (device, label), by_lr in points.items():
        s = lr_sensitivity(by_lr)
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


# --- the report ----------------------------------------------------------------------------------

PLOTS = ("loss.png", "loss_scale.png", "grad_norm.png", "attn_max_heatmap.png", "resid_rms_heatmap.png",
         "resid_rms_final.png")


def _plots(by_group, out: Path) -> None:
    plot_over_steps(by_group, T.LOSS, out / "loss.png", "train loss (nats/token)",
                    "Training loss (line: mean over seeds, band: min-max; dotted: first non-finite step)")
    plot_over_steps(by_group, T.LOSS_SCALE, out / "loss_scale.png", "loss scale", "fp16 dynamic loss scale",
                    log_y=True, band=False)
    plot_over_steps(by_group, T.GRAD_NORM, out / "grad_norm.png", "gradient norm",
                    "Gradient norm before (solid) and after (dashed) clipping", log_y=True, band=False,
                    style_key=T.GRAD_NORM_CLIPPED)
    plot_layer_heatmaps(by_group, T.ATTN_MAX, out / "attn_max_heatmap.png", "Max attention score per layer")
    plot_layer_heatmaps(by_group, T.RESID_RMS, out / "resid_rms_heatmap.png", "Residual-stream RMS per layer")
    plot_final_layers(by_group, T.RESID_RMS, out / "resid_rms_final.png", "RMS", "Per-layer activation RMS, last sample")


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

    with warnings.catch_warnings():  # all-NaN slices are expected where a regime diverged
        warnings.filterwarnings("ignore", message="(Mean of empty slice|All-NaN slice)", category=RuntimeWarning)
        _plots(by_group, out)

    doc = Doc()
    doc.h("jaxlm precision ablation", 1)
    devices = sorted({r.device for r in runs})
    doc.p(f"{len(runs)} runs from {len(dirs)} director{'y' if len(dirs) == 1 else 'ies'}; accelerators: "
          f"{', '.join(devices)}; regimes: {', '.join(sorted({r.label for r in runs}))}.")

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

    doc.h("Stability per run")
    rows = []
    for (device, label), rs in by_group.items():
        for r in rs:
            first = r.first_nonfinite_step()
            rows.append([device, label, r.seed, "none" if first is None else first,
                         int(r.last(T.SKIPPED) or 0), _fmt([r.last(T.LOSS_SCALE)], 0),
                         (r.done or {}).get("stopped") or ("finished" if r.done else "running/interrupted")])
    doc.table(["accelerator", "regime", "seed", "first non-finite step", "skipped steps", "final loss scale",
               "status"], rows)

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

    if any(r.budget != "none" for r in runs):
        _budget_sections(doc, by_group, out, target_loss)

    doc.h("Plots")
    captions = {
        "loss.png": "Training loss vs step per regime; seeds as a band.",
        "loss_scale.png": "fp16 dynamic loss scale vs step (1 for regimes without loss scaling).",
        "grad_norm.png": "Gradient global norm before and after clipping.",
        "attn_max_heatmap.png": "Max pre-softmax attention score per layer over time (first seed of each regime).",
        "resid_rms_heatmap.png": "Residual-stream RMS per layer over time.",
        "resid_rms_final.png": "Per-layer residual-stream RMS at the last sampled step.",
    }
    for name in PLOTS:
        doc.img(name, captions[name])
    if len({r.lr for r in runs}) > 1:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="(Mean of empty slice|All-NaN slice)", category=RuntimeWarning)
            _lr_section(doc, runs, out)
    files.atomic_write(out / "report.md", doc.markdown())
    files.atomic_write(out / "report.html", doc.html("jaxlm precision ablation"))
    return out / "report.md"


# --- studies by time (train.budget) ----------------------------------------------------------------

def _eval_by_time(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """(training seconds, validation loss) at each periodic evaluation: the seconds of training steps
    before it (budget/train_time_s; compilation, evaluation and saves not counted)."""
    pts = [(_num(r[T.TRAIN_TIME]), _num(r[T.EVAL_LOSS])) for r in run.records if T.EVAL_LOSS in r and T.TRAIN_TIME in r]
    if not pts:
        return np.zeros(0), np.zeros(0)
    t, v = zip(*pts)
    return np.asarray(t), np.asarray(v)


def time_to_loss(run: Run, target: float) -> float | None:
    """The training seconds at the first evaluation whose validation loss is at or below `target`."""
    for t, v in zip(*_eval_by_time(run)):
        if v <= target:
            return float(t)
    return None


def plot_loss_over_time(by_group, path: Path, target_loss: float | None = None) -> None:
    """Validation loss vs training seconds, one panel per accelerator (times of different machines are
    never drawn on one axis); one thin line per seed, each recipe/regime its colour."""
    plt = _plt()
    devices = sorted({g[0] for g in by_group})
    fig, axes = plt.subplots(1, len(devices), figsize=(7 * len(devices), 4.5), squeeze=False)
    colors = _color_map(by_group)
    for ax, device in zip(axes[0], devices):
        for g, runs in by_group.items():
            if g[0] != device:
                continue
            for i, r in enumerate(runs):
                t, v = _eval_by_time(r)
                ax.plot(t / 60, v, color=colors[g], lw=1.2, marker=".", ms=3,
                        label=f"{g[1]} ({len(runs)} seeds)" if i == 0 else None)
        if target_loss is not None:
            ax.axhline(target_loss, color="k", ls=":", lw=1)
        ax.set(xlabel="training time (minutes; compile, eval, saves not counted)", ylabel="validation loss",
               title=device)
        _grid_and_legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
            times = [time_to_loss(r, target_loss) for r in rs]
            reached = [t / 60 for t in times if t is not None]
            rows.append([device, label, f"{len(reached)}/{len(rs)}", _fmt(reached, 2)])
        doc.table(["accelerator", "recipe/regime", "seeds reaching it", "minutes"], rows)
    plot_loss_over_time(by_group, out / "loss_vs_time.png", target_loss)
    doc.img("loss_vs_time.png", "Validation loss vs training time, one panel per accelerator, one line per seed.")
