"""Seeds side by side: metrics over the checkpoints of several runs (jaxlm's own, imported ones:
``jaxlm.hf_import``), the runs as a band, Mistral's "how much do seeds differ" picture.

    python -m jaxlm.ablate seeds RUN [RUN ...] --out=DIR

Read from each run directory, where there:

* ``eval.csv`` (``eval --all-steps``): loss, perplexity, bits per byte (LAMBADA: accuracy, perplexity);
  every run's must score the same text (the same ``--data``, or runs of one corpus without it);
* ``probe/<task>.json`` (``probe --all-steps`` or ``--steps``): each layer's compression;
* ``harness/<step>.json``: lm-evaluation-harness results of one checkpoint (the harness records one
  checkpoint per call: ``harness --step=N --output=RUN/harness/N.json``), every metric but the stderrs.

A metric is compared over the runs that all have it, at the steps they all have: per metric the mean, the
standard deviation (over the runs, as the ablation report's), min and max. Written to DIR: one PNG per
source (``eval.png``, ``probe_<task>.png``, ``harness_<task>.png``: per metric the mean as a line, the
min-max band, each run's own curve thin over all of its steps; log x, step 0 drawn at 1), ``seeds.csv``
(metric, step, runs, mean, std, min, max, then each run's value) and ``seeds.md`` (per metric the band at
the last step in common, and the pictures).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from jaxlm import files
from jaxlm.errors import ConfigError, DataError

EVAL_COLUMNS = ("loss", "perplexity", "bits_per_byte", "accuracy")


def read_eval(run: Path) -> dict[str, dict[int, float]]:
    """{'eval/<column>': {step: value}} of a run's eval.csv (none: {})."""
    path = run / "eval.csv"
    if not path.is_file():
        return {}
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for row in csv.DictReader(io.StringIO(path.read_text())):
        for col in EVAL_COLUMNS:
            if row.get(col) not in (None, ""):
                out[f"eval/{col}"][int(row["step"])] = float(row[col])
    return dict(out)


def read_probe(run: Path) -> dict[str, dict[int, float]]:
    """{'probe/<task>/layer<i>': {step: compression}} of a run's probe results (none: {})."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for path in sorted((run / "probe").glob("*.json")):
        for r in json.loads(path.read_text()).get("rows", []):
            out[f"probe/{r['task']}/layer{r['layer']}"][int(r["step"])] = float(r["compression"])
    return dict(out)


def read_harness(run: Path) -> dict[str, dict[int, float]]:
    """{'harness/<task>/<metric>': {step: value}} of a run's harness/<step>.json files (none: {})."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for path in sorted((run / "harness").glob("*.json")):
        if not path.stem.isdigit():
            continue
        for task, metrics in json.loads(path.read_text()).get("results", {}).items():
            for name, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and "_stderr" not in name:
                    out[f"harness/{task}/{name.replace(',none', '')}"][int(path.stem)] = float(v)
    return dict(out)


def read_run(run: Path) -> dict[str, dict[int, float]]:
    return {**read_eval(run), **read_probe(run), **read_harness(run)}


def labels(runs: list[Path]) -> list[str]:
    """Each run's name in the report: its directory's name (with its parent's where two share one)."""
    names = [r.name for r in runs]
    return [f"{r.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]


def band(series: list[dict[int, float]]) -> list[dict]:
    """Per step all runs have: {step, runs, mean, std, min, max, values}."""
    steps = sorted(set.intersection(*[set(s) for s in series]))
    out = []
    for step in steps:
        v = np.array([s[step] for s in series])
        out.append({"step": step, "runs": len(v), "mean": float(v.mean()), "std": float(v.std()),
                    "min": float(v.min()), "max": float(v.max()), "values": [float(x) for x in v]})
    return out


def seeds_report(run_dirs, out) -> list[Path]:
    """Writes the report of runs `run_dirs` into `out`; returns the files written (PNGs, CSV, Markdown)."""
    runs = [Path(r) for r in run_dirs]
    if len(runs) < 2:
        raise ConfigError("seeds: give two or more run directories (python -m jaxlm.ablate seeds RUN RUN ... --out=DIR)")
    for r in runs:
        if not r.is_dir():
            raise DataError(f"seeds: {r}: no such run directory")
    names = labels(runs)
    data = [read_run(r) for r in runs]
    every = sorted(set.intersection(*[set(d) for d in data]), key=_natural)
    partial = sorted(set.union(*[set(d) for d in data]) - set(every))
    bands = {m: b for m in every if (b := band([d[m] for d in data]))}
    if not bands:
        raise DataError("seeds: the runs have no metric at a step in common; run eval --all-steps (and probe, harness) "
                        "on each: " + ", ".join(f"{n}: {len(d)} metric(s)" for n, d in zip(names, data)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [_plot(out / f"{source.replace('/', '_')}.png", source, metrics, bands, data, names)
               for source, metrics in _by_source(bands).items()]
    written.append(_write_csv(out / "seeds.csv", bands, names))
    written.append(_write_md(out / "seeds.md", bands, names, runs, partial, written))
    return written


def _natural(metric: str) -> list:
    """'probe/bm25/layer10' after 'probe/bm25/layer9'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", metric)]


def _by_source(bands) -> dict[str, list[str]]:
    """Metrics grouped by picture: 'eval', 'probe/<task>', 'harness/<task>'."""
    groups: dict[str, list[str]] = defaultdict(list)
    for m in bands:
        groups[m.rsplit("/", 1)[0]].append(m)
    return dict(groups)


def _plt():
    import matplotlib  # heavy, and only for the plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg backend

    return plt


def _plot(path: Path, source: str, metrics: list[str], bands, data, names) -> Path:
    """One panel per metric: each run thin, the mean over runs and their min-max band."""
    plt = _plt()
    cols = min(len(metrics), 4)
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        for i, (d, name) in enumerate(zip(data, names)):
            steps = sorted(d[m])
            ax.plot([max(s, 1) for s in steps], [d[m][s] for s in steps], lw=0.8, alpha=0.7, color=f"C{i % 10}",
                    label=name)
        b = bands[m]
        x = [max(r["step"], 1) for r in b]
        ax.fill_between(x, [r["min"] for r in b], [r["max"] for r in b], color="black", alpha=0.12, lw=0,
                        label=f"min-max of {b[0]['runs']} runs")
        ax.plot(x, [r["mean"] for r in b], color="black", lw=1.8, label="mean")
        ax.set_xscale("log")
        ax.set(title=m.rsplit("/", 1)[1], xlabel="step (log; step 0 at 1)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{source}: {len(names)} runs", fontsize=10)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    files.atomic_write(path, png.getvalue())
    return path


def _write_csv(path: Path, bands, names) -> Path:
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["metric", "step", "runs", "mean", "std", "min", "max", *names])
    for m, b in bands.items():
        for r in b:
            w.writerow([m, r["step"], r["runs"], *(f"{r[k]:.8g}" for k in ("mean", "std", "min", "max")),
                        *(f"{v:.8g}" for v in r["values"])])
    files.atomic_write(path, text.getvalue())
    return path


def _write_md(path: Path, bands, names, runs, partial, pictures) -> Path:
    lines = ["# Seeds side by side", "", "Runs: " + ", ".join(f"`{n}` ({r})" for n, r in zip(names, runs)), "",
             "Per metric at the last step every run has: mean ± std over the runs, min – max, each run's value. "
             "`seeds.csv` has every step in common.", "",
             "| metric | step | mean ± std | min – max | " + " | ".join(names) + " |",
             "|---|---:|---|---|" + "---:|" * len(names)]
    for m, b in bands.items():
        r = b[-1]
        lines.append(f"| {m} | {r['step']} | {r['mean']:.4g} ± {r['std']:.2g} | {r['min']:.4g} – {r['max']:.4g} | "
                     + " | ".join(f"{v:.4g}" for v in r["values"]) + " |")
    if partial:
        lines += ["", f"Not in every run, left out: {', '.join(partial[:20])}" + (" ..." if len(partial) > 20 else "")]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in pictures if p.suffix == ".png"] + [""]
    files.atomic_write(path, "\n".join(lines))
    return path
