"""Probe results on disk and as pictures.

Per run and task (``write_task``): ``<task>.json`` (the settings and the rows), ``<task>.csv`` (the
rows: one per (layer, step)) and ``<task>.png``: heat maps of compression and of selectivity (layer
0 = embedding output, layer i = block i's output; one column per checkpoint), and the compression of
the layer that compresses best at the last step, over steps (log x; step 0 drawn at 1), with its
control task's compression dashed. A model that is no run's checkpoint (``probe --hf``) has a label,
``hf:<directory name>``, in place of a step, and its third panel is compression by layer.

Across seeds (``seeds``, ``python -m jaxlm.probe report RUN_A RUN_B ... --out=DIR``): per task, every
layer's compression over steps, the mean over runs as a line and the runs' min-max as a band, as the
ablation report draws seeds; ``DIR/<task>.png`` and ``DIR/<task>_seeds.csv``.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from jaxlm import files
from jaxlm.errors import DataError

FIELDS = ("task", "step", "layer", "online_bits", "uniform_bits", "compression", "accuracy", "control_online_bits",
          "control_compression", "control_accuracy", "selectivity", "majority_accuracy", "classes", "n_train",
          "n_test")


def _plain(v):
    return float(v) if isinstance(v, (float, np.floating)) else int(v) if isinstance(v, (np.integer,)) else v


def write_task(out: Path, task: str, rows: list[dict], info: dict) -> None:
    rows = [{k: _plain(r[k]) for k in FIELDS} for r in rows]
    files.atomic_write_json(out / f"{task}.json", {"task": task, **info, "rows": rows}, indent=1)
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    files.atomic_write(out / f"{task}.csv", text.getvalue())
    plot_task(rows, out / f"{task}.png", f"{task}: {info.get('source', '')}")


def grid(rows: list[dict], key: str) -> tuple[list[int], list[int], np.ndarray]:
    """(steps, layers, values[layer, step]) of one field."""
    steps = sorted({r["step"] for r in rows})
    layers = sorted({r["layer"] for r in rows})
    m = np.full((len(layers), len(steps)), np.nan)
    for r in rows:
        m[layers.index(r["layer"]), steps.index(r["step"])] = r[key]
    return steps, layers, m


def _plt():
    import matplotlib  # heavy, and only for the plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg backend

    return plt


def _log_steps(ax, steps):
    ax.set_xscale("log")
    ax.set_xlabel("step (log scale; step 0 drawn at 1)" if 0 in steps else "step (log scale)")


def _layer_names(layers):
    return ["embed" if layer == 0 else f"block {layer}" for layer in layers]


def plot_task(rows: list[dict], path: Path, title: str) -> None:
    plt = _plt()
    steps, layers, comp = grid(rows, "compression")
    _, _, sel = grid(rows, "selectivity")
    _, _, ctrl = grid(rows, "control_compression")
    trained = all(isinstance(s, int) for s in steps)  # a run's checkpoints; else one model's label (probe --hf)
    fig, ax = plt.subplots(1, 3, figsize=(15, 3.2 + 0.25 * len(layers)))
    for a, m, name, cmap, kw in ((ax[0], comp, "compression (uniform / online codelength)", "viridis", {}),
                                 (ax[1], sel, "selectivity (accuracy - control accuracy)", "RdBu_r",
                                  {"vmin": -np.nanmax(np.abs(sel)), "vmax": np.nanmax(np.abs(sel))})):
        im = a.imshow(m, aspect="auto", origin="lower", cmap=cmap, interpolation="nearest", **kw)
        a.set_yticks(range(len(layers)), _layer_names(layers))
        every = max(1, len(steps) // 8)
        a.set_xticks(range(0, len(steps), every), [str(s) for s in steps[::every]], rotation=45 if trained else 0)
        a.set(xlabel="checkpoint step" if trained else "model", title=name)
        fig.colorbar(im, ax=a)
    if trained:
        best = int(np.nanargmax(comp[:, -1]))
        x = [max(s, 1) for s in steps]
        ax[2].plot(x, comp[best], "o-", label=f"{_layer_names(layers)[best]} (best at the last step)")
        ax[2].plot(x, ctrl[best], "s--", color="C0", alpha=0.6, label="its control task")
        _log_steps(ax[2], steps)
        ax[2].set(title="best layer over training")
    else:  # one model without steps (probe --hf): its layers
        ax[2].plot(range(len(layers)), comp[:, 0], "o-", label=str(steps[0]))
        ax[2].plot(range(len(layers)), ctrl[:, 0], "s--", color="C0", alpha=0.6, label="its control task")
        ax[2].set_xticks(range(len(layers)), _layer_names(layers), rotation=45)
        ax[2].set(title="compression by layer")
    ax[2].axhline(1.0, color="grey", lw=0.8)
    ax[2].set(ylabel="compression")
    ax[2].legend(fontsize=8)
    ax[2].grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def read_task(run_probe_dir: Path, task: str) -> list[dict]:
    return json.loads((run_probe_dir / f"{task}.json").read_text())["rows"]


def seeds(run_dirs, out) -> list[Path]:
    """Per task found in every run's ``probe/`` directory: compression over steps, one line (mean) and
    one min-max band per layer. Returns the PNGs written."""
    dirs = [Path(d) / "probe" if (Path(d) / "probe").is_dir() else Path(d) for d in run_dirs]
    if len(dirs) < 1:
        raise DataError("report: give at least one run directory (each with a probe/ directory)")
    for d in dirs:
        if not list(d.glob("*.json")):
            raise DataError(f"{d}: no probe results; run python -m jaxlm.probe --workdir=RUN first")
    common = set.intersection(*[{p.stem for p in d.glob("*.json")} for d in dirs])
    if not common:
        raise DataError(f"report: the runs share no probed task ({', '.join(map(str, dirs))})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    written = []
    for task in sorted(common):
        grids = [grid(read_task(d, task), "compression") for d in dirs]
        steps, layers = grids[0][0], grids[0][1]
        same = [g[2] for g in grids if g[0] == steps and g[1] == layers]
        if len(same) < len(grids):
            raise DataError(f"report: the runs probed {task} at different steps or layers; probe the same steps")
        stack = np.stack(same)  # (runs, layers, steps)
        mean, lo, hi = stack.mean(0), stack.min(0), stack.max(0)
        fig, ax = plt.subplots(figsize=(8, 4.5))
        x = [max(s, 1) for s in steps]
        for i, name in enumerate(_layer_names(layers)):
            ax.plot(x, mean[i], "o-", color=f"C{i % 10}", label=name)
            if len(same) > 1:
                ax.fill_between(x, lo[i], hi[i], color=f"C{i % 10}", alpha=0.2)
        ax.axhline(1.0, color="grey", lw=0.8)
        _log_steps(ax, steps)
        ax.set(ylabel="compression", title=f"{task}: mean and min-max over {len(same)} runs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{task}.png", dpi=100)
        plt.close(fig)
        text = io.StringIO()
        w = csv.writer(text, lineterminator="\n")
        w.writerow(["step", "layer", "runs", "mean", "min", "max"])
        for li, layer in enumerate(layers):
            for si, s in enumerate(steps):
                w.writerow([s, layer, len(same), f"{mean[li, si]:.6g}", f"{lo[li, si]:.6g}", f"{hi[li, si]:.6g}"])
        files.atomic_write(out / f"{task}_seeds.csv", text.getvalue())
        written.append(out / f"{task}.png")
    return written
