"""Reads docs/equal_budget_study.sh's runs: each recipe's final validation loss (mean ± std over seeds)
and, per seed, the budget share at which a run first evaluated at or below the same seed's Mistral run's
final loss (linear between evaluations); writes the table (Markdown) and the curves (PNG).

    python docs/equal_budget_study.py OUT [PNG]
"""

import statistics
import sys
from collections import defaultdict
from pathlib import Path

from jaxlm import telemetry


def curve(run: Path):
    """[(budget spent, eval loss)] of a run's evaluations, and its steps."""
    records, _ = telemetry.read_metrics(run / "metrics.jsonl")
    pts = [(r[telemetry.BUDGET_SPENT], r[telemetry.EVAL_LOSS]) for r in records
           if telemetry.EVAL_LOSS in r and telemetry.BUDGET_SPENT in r]
    return pts, max(r["step"] for r in records)


def time_to(pts, target):
    """The budget spent when the curve first reached `target` (linear between evaluations), or None."""
    for (s0, l0), (s1, l1) in zip([(0.0, float("inf"))] + pts, pts):
        if l1 <= target:
            return s1 if l0 == float("inf") else s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return None


def main(out: Path, png: Path | None = None):
    runs = {p.name: curve(p) for p in sorted((out / "cells").iterdir()) if (p / "metrics.jsonl").exists()}
    by_recipe = defaultdict(dict)
    for name, (pts, steps) in runs.items():
        recipe, seed = name.rsplit("-s", 1)
        by_recipe[recipe][seed] = (pts, steps)
    budget = max(p[-1][0] for p, _ in runs.values())
    mistral = {s: pts[-1][1] for s, (pts, _) in by_recipe.get("mistral", {}).items()}
    print("| recipe | final validation loss per seed | mean ± std | steps (mean) | budget share to Mistral's final loss |")
    print("|---|---|---|---|---|")
    for recipe, seeds in sorted(by_recipe.items()):
        finals = [pts[-1][1] for pts, _ in seeds.values()]
        shares = [time_to(pts, mistral[s]) for s, (pts, _) in seeds.items() if s in mistral]
        shares = [x / budget for x in shares if x is not None]
        share = f"{statistics.mean(shares):.2f} (per seed {', '.join(f'{x:.2f}' for x in shares)})" if shares else "-"
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        steps = statistics.mean(st for _, st in seeds.values())
        print(f"| {recipe} | {', '.join(f'{s}: {x:.3f}' for s, x in zip(seeds, finals))} | "
              f"**{statistics.mean(finals):.3f} ± {std:.3f}** | {steps:,.0f} | {share} |")
    if png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, (recipe, seeds) in enumerate(sorted(by_recipe.items())):
            for j, (seed, (pts, _)) in enumerate(sorted(seeds.items())):
                ax.plot([s for s, _ in pts], [v for _, v in pts], color=f"C{i}", alpha=0.8,
                        label=recipe if j == 0 else None)
        ax.set(xlabel="CPU seconds of training steps (the budget)", ylabel="validation loss", ylim=(None, 5.0))
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
