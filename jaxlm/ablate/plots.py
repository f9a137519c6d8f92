"""The report's plots (matplotlib, Agg, PNG): curves over steps by group with seeds as a band,
per-layer heat maps, the learning-rate sweep, and validation loss over training time.

A group is (accelerator kind, configuration label) -> its runs (seeds); see jaxlm.ablate.runs.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from pathlib import Path

import numpy as np

from jaxlm.ablate.analysis import eval_by_time


def seeds(n: int) -> str:
    return f"{n} seed{'' if n == 1 else 's'}"


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
    with warnings.catch_warnings():  # all-NaN steps are expected where every seed diverged
        warnings.simplefilter("ignore", RuntimeWarning)
        return steps, np.nanmean(finite, axis=0), np.nanmin(finite, axis=0), np.nanmax(finite, axis=0), len(mat)


def plot_over_steps(by_group, key, path, ylabel, title, log_y=False, band=True, style_key=None):
    """One line per group (mean over seeds; a min-max band), and optionally `style_key` dashed in the
    same colour; see draw_over_steps."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    draw_over_steps(ax, by_group, key, band=band, style_key=style_key)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    if log_y:
        ax.set_yscale("log")
    _grid_and_legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_over_steps(ax, by_group, key, band=True, style_key=None) -> None:
    """The curves of plot_over_steps on `ax`. A group with a diverged seed is drawn above the others
    (a curve that matches another until it diverges is not hidden beneath it), with a dotted line at
    its first non-finite step, an x at its last finite value there, and 'diverged at step N' in the
    legend; each seed that diverged is its own line (the mean over seeds would drop it)."""
    colors = _color_map(by_group)
    n_groups = len(by_group)
    for i, (g, runs) in enumerate(by_group.items()):
        bad = {r.seed: r.first_nonfinite_step() for r in runs if r.first_nonfinite_step() is not None}
        z = 2.0 + (n_groups + i if bad else i) * 0.01  # diverged groups above every other line
        c = _seed_curve([r for r in runs if r.seed not in bad] or runs, key)
        if c is None:
            continue
        steps, mean, lo, hi, n = c
        label = _group_label(g) + (f" ({seeds(len(runs))})" if len(runs) > 1 else "")
        if bad:
            label += f", diverged at step {min(bad.values())}"
        ax.plot(steps, mean, color=colors[g], label=label, zorder=z, **_line_style(i, len(steps)))
        if band and n > 1:
            ax.fill_between(steps, lo, hi, color=colors[g], alpha=0.2, zorder=z - 0.5)
        for r in runs:
            if r.seed not in bad:
                continue
            s, v = r.series(key)
            if len(runs) > 1:  # this seed's own line
                ax.plot(s, v, color=colors[g], lw=1, ls="-.", zorder=z)
            ok = np.isfinite(v) & (s < bad[r.seed])
            if ok.any():
                ax.plot(s[ok][-1], v[ok][-1], "x", color=colors[g], ms=10, mew=2.5, zorder=z + 0.005)
            ax.axvline(bad[r.seed], color=colors[g], ls=":", lw=1, zorder=z)
        c2 = _seed_curve(runs, style_key) if style_key else None
        if c2 is not None:
            ax.plot(c2[0], c2[1], color=colors[g], ls="--", lw=1, zorder=z)


def _grid_and_legend(ax, fontsize: int = 8) -> None:
    """The panels' common ending: a light grid, and a legend where a line is labelled."""
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # an empty panel has no legend
        ax.legend(fontsize=fontsize)


def log_ticks(axis, values) -> None:
    """Ticks for a log-scale `axis` over `values` that label at least 3 values (matplotlib's default labels
    only the powers of ten, one over a range like 0.8-8): 1-2-5 over 1-3 decades, evenly spaced values
    under a decade, the powers of ten over more; plain numbers, no minor labels."""
    from matplotlib import ticker  # matplotlib: lazy, as above

    finite = [float(v) for a in values for v in np.ravel(a) if math.isfinite(v) and v > 0]
    span = math.log10(max(finite) / min(finite)) if finite else 0.0
    axis.set_major_locator(ticker.MaxNLocator(5) if span < 1 else ticker.LogLocator(subs=(1, 2, 5)) if span <= 3
                           else ticker.LogLocator())
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _panel_title(text: str, width: int = 44) -> str:
    """A heat map's panel title, wrapped to its panel's width at 10 points."""
    return "\n".join(textwrap.wrap(text, width))


def plot_layer_heatmaps(by_group, key, path, title, log_color=True):
    plt = _plt()
    fig = layer_heatmaps(by_group, key, title, log_color)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def layer_heatmaps(by_group, key, title, log_color=True):
    """The figure of plot_layer_heatmaps: one panel per group (its first seed), layers by steps."""
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
        # each column centred on its step, half a step's spacing either side (one sampled step: +-0.5)
        half = (steps[-1] - steps[0]) / (2 * (len(steps) - 1)) if len(steps) > 1 else 0.5
        im = ax.imshow(np.abs(vals).T, aspect="auto", origin="lower", cmap=cmap, norm=norm,
                       extent=(steps[0] - half, steps[-1] + half, -0.5, vals.shape[1] - 0.5), interpolation="nearest")
        ax.set(xlabel="step", ylabel="layer", yticks=range(vals.shape[1]), **({"xticks": steps} if len(steps) == 1 else {}))
        ax.set_title(_panel_title(_group_label(g) + f" seed {run.seed}"), fontsize=10)
    for ax in axes.ravel()[len(groups):]:
        ax.set_axis_off()
    if im is not None:
        bar = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.9, label="|value| (log)")
        if log_color:
            log_ticks(bar.ax.yaxis, [vmin, vmax])
    fig.suptitle(title + " (red: non-finite)")
    return fig


def plot_final_layers(by_group, key, path, ylabel, title):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    draw_final_layers(ax, by_group, key, ylabel, title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_final_layers(ax, by_group, key, ylabel, title) -> None:
    """Each group's per-layer `key` at its last sample (mean over seeds), log y (see log_ticks)."""
    colors = _color_map(by_group)
    drawn = []
    for g, runs in by_group.items():
        finals = []
        for r in runs:
            steps, vals = r.layers(key)
            if len(steps):
                finals.append(vals[-1])
        if finals:
            m = np.vstack(finals)
            with np.errstate(all="ignore"), warnings.catch_warnings():  # (a layer non-finite in every seed)
                warnings.simplefilter("ignore", RuntimeWarning)
                drawn.append(np.nanmean(np.where(np.isfinite(m), m, np.nan), axis=0))
            ax.plot(range(m.shape[1]), drawn[-1], "o-", color=colors[g], label=_group_label(g))
    n_layers = max((r.layers(key)[1].shape[1] for rs in by_group.values() for r in rs), default=1)
    ax.set(xlabel="layer", ylabel=ylabel, title=title + " (missing: non-finite)", yscale="log",
           xticks=range(n_layers))
    log_ticks(ax.yaxis, drawn)
    _grid_and_legend(ax)


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


def plot_loss_over_time(by_group, path: Path, target_loss: float | None = None) -> list[str]:
    """Validation loss vs training seconds, one panel per accelerator (times of different machines are
    never drawn on one axis); one thin line per seed, each recipe/regime its colour. Returns the
    legend's labels, panel by panel."""
    plt = _plt()
    devices = sorted({g[0] for g in by_group})
    fig, axes = plt.subplots(1, len(devices), figsize=(7 * len(devices), 4.5), squeeze=False)
    colors = _color_map(by_group)
    for ax, device in zip(axes[0], devices):
        for g, runs in by_group.items():
            if g[0] != device:
                continue
            for i, r in enumerate(runs):
                t, v = eval_by_time(r)
                ax.plot(t / 60, v, color=colors[g], lw=1.2, marker=".", ms=3,
                        label=f"{g[1]} ({seeds(len(runs))})" if i == 0 else None)
        if target_loss is not None:
            ax.axhline(target_loss, color="k", ls=":", lw=1)
        ax.set(xlabel="training time (minutes; compile, eval, saves not counted)", ylabel="validation loss",
               title=device)
        _grid_and_legend(ax)
    labels = [label for ax in axes[0] for label in ax.get_legend_handles_labels()[1]]
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return labels


