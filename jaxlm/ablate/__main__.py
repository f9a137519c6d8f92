"""CLI for precision-ablation studies.

Run a grid (then write its report into OUT/report):

    python -m jaxlm.ablate --config=configs/stress_fp16.py --regimes=fp32,bf16,fp16,fp16_upcast,fp8 \
        --layer-scaling=none,hf,megatron --lrs=3e-4,1e-3,3e-3,1e-2,3e-2 \
        --switch=model.qk_norm=off,on --switch=model.z_loss=0,1e-4 \
        --seeds=21,49 --steps=N --out=DIR [--config.*=...]

The grid is the product of the regimes, every switch's values and the seeds. ``--switch KEY=V1,V2``
(repeatable) sweeps any config field; ``--lrs`` is ``--switch optim.lr=...`` and ``--layer-scaling``
is ``--switch layer_scaling=...`` (none | hf | megatron; off/on = none/hf). Several grids may share
one OUT (a fractional design): finished cells are skipped, and the report covers all of OUT/cells.

Studies by time: every cell gets the same wall-clock (or FLOP) budget, and the report adds
validation loss vs training time, time to --target-loss and the final loss at the budget:

    python -m jaxlm.ablate --config=configs/tiny.py --budget=15m --target-loss=3.5 --out=DIR

Build a report from run directories, also from several machines:

    python -m jaxlm.ablate report DIR [DIR ...] --out=REPORT

Seeds side by side (jaxlm's runs and imported ones: their eval.csv, probe and harness results over
steps, the runs as a band; ``jaxlm.ablate.seeds``):

    python -m jaxlm.ablate seeds RUN [RUN ...] --out=DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

from jaxlm import cli
from jaxlm import config as config_lib
from jaxlm.ablate import grid, report
from jaxlm.ablate import seeds as seeds_lib
from jaxlm.errors import ConfigError


def define_flags():
    cli.define_config("config", "Base config of every cell, e.g. configs/stress_fp16.py.")
    flags.DEFINE_list("regimes", ["fp32", "bf16", "fp16", "fp16_upcast"], "Precision regimes.")
    flags.DEFINE_list("layer_scaling", None, "Layer-index scaling: none | hf (scale_attn_by_inverse_layer_idx) | "
                      "megatron (query_key_layer_scaling); off/on = none/hf. Default: the config's.")
    flags.DEFINE_alias("layer-scaling", "layer_scaling")
    flags.DEFINE_list("lrs", None, "Learning rates (optim.lr) to sweep. Default: the config's.")
    flags.DEFINE_multi_string("switch", [], "KEY=V1,V2,...: a config field to sweep, e.g. model.qk_norm=off,on "
                              "(repeatable).")
    flags.DEFINE_list("seeds", None, "Seeds (default: the config's train.seeds).")
    flags.DEFINE_integer("steps", None, "Override train.steps of every cell.")
    flags.DEFINE_string("out", None, "Grid directory (run) or report directory (report, seeds).")
    flags.DEFINE_string("budget", None, "train.budget of every cell ('15m', '2h', '1e18flops'); --steps is then a step cap.")
    flags.DEFINE_float("target_loss", None, "Report the training time to this validation loss.")
    flags.DEFINE_alias("target-loss", "target_loss")


def main(argv):
    F = cli.FLAGS
    args = argv[1:]
    if args and args[0] == "report":
        if len(args) < 2:
            raise ConfigError("usage: python -m jaxlm.ablate report DIR [DIR ...] --out=REPORT")
        cli.require(out=F.out)
        print(wrote(report.build(args[1:], F.out, target_loss=F.target_loss)))
        return
    if args and args[0] == "seeds":
        cli.require(out=F.out)
        written = seeds_lib.seeds_report(args[1:], F.out)
        print(f"seeds: wrote {', '.join(p.name for p in written)} in {Path(F.out).resolve()}")
        return
    if args:
        raise ConfigError(f"unexpected arguments {args}; did you mean 'report' or 'seeds'?")
    cli.require(config=F.config, out=F.out)
    cfg = F.config
    if F.budget:  # the same budget for every cell; --steps is then a step cap (train.max_steps)
        cfg = config_lib.with_overrides(cfg, {"train.budget": F.budget, **({"train.max_steps": F.steps} if F.steps else {})})
    config_lib.validate(cfg)
    config_lib.set_xla_flags(cfg)  # before the backend starts: the cells' train.deterministic
    seeds = F.seeds or list(cfg.train.seeds)
    switches = [grid.parse_switch(f"{grid.LAYER_SCALING_KEY}={','.join(F.layer_scaling)}")] if F.layer_scaling else []
    switches += [grid.parse_switch(s) for s in F.switch]
    if F.lrs:
        switches.append(grid.parse_switch(f"optim.lr={','.join(F.lrs)}"))
    cells = grid.cells(F.regimes, seeds, switches)
    for c in cells:  # fail on a bad regime before the first cell trains
        grid.cell_config(cfg, c, Path(F.out), F.steps)
    status = grid.run_grid(cfg, cells, F.out, F.steps, log=lambda s: print(s, file=sys.stderr))
    for cell, s in status:
        print(f"{cell.name:<28} {s}")
    if len(status) == len(cells) and all(s != "interrupted" for _, s in status):
        print(wrote(report.build([Path(F.out) / "cells"], Path(F.out) / "report", target_loss=F.target_loss)))


def wrote(md: Path) -> str:
    """Where the report went: both documents and the plots, by absolute path."""
    d = md.resolve().parent
    return (f"report: wrote {d / md.name} and {d / md.with_suffix('.html').name} "
            f"(with {len(list(d.glob('*.png')))} plots) in {d}")


if __name__ == "__main__":
    cli.run(main, define_flags)
