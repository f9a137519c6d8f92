"""CLI for precision-ablation studies.

Run a grid (then write its report into OUT/report):

    python -m jaxlm.ablate --config=configs/stress_fp16.py --regimes=fp32,bf16,fp16,fp16_upcast \
        --layer-scaling=off,on --seeds=21,49,81 --steps=N --out=DIR [--config.*=...]

Build a report from run directories, also from several machines:

    python -m jaxlm.ablate report DIR [DIR ...] --out=REPORT
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from jaxlm import config as config_lib
from jaxlm.errors import CheckpointError, ConfigError, DataError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base config of every cell.")
_REGIMES = flags.DEFINE_list("regimes", ["fp32", "bf16", "fp16", "fp16_upcast"], "Precision regimes.")
_LAYER_SCALING = flags.DEFINE_list("layer_scaling", ["off", "on"], "scale_attn_by_inverse_layer_idx values.")
_SEEDS = flags.DEFINE_list("seeds", None, "Seeds (default: the config's train.seeds).")
_STEPS = flags.DEFINE_integer("steps", None, "Override train.steps of every cell.")
_OUT = flags.DEFINE_string("out", None, "Grid directory (run) or report directory (report).")


def main(argv):
    from jaxlm.ablate import grid, report

    args = argv[1:]
    if args and args[0] == "report":
        if len(args) < 2 or not _OUT.value:
            raise app.UsageError("usage: python -m jaxlm.ablate report DIR [DIR ...] --out=REPORT")
        try:
            path = report.build(args[1:], _OUT.value)
        except FileNotFoundError as e:
            sys.exit(f"error: {e}")
        print(f"wrote {path} and {path.with_suffix('.html')}")
        return
    if args:
        raise app.UsageError(f"unexpected arguments {args}; did you mean 'report'?")
    if _CONFIG.value is None or not _OUT.value:
        raise app.UsageError("--config and --out are required")
    cfg = _CONFIG.value
    config_lib.set_xla_flags(cfg)  # before the backend starts: the cells' train.deterministic
    try:
        config_lib.validate(cfg)
        seeds = _SEEDS.value or list(cfg.train.seeds)
        cells = grid.cells(_REGIMES.value, grid.parse_switch(_LAYER_SCALING.value), seeds)
        for c in cells:  # fail on a bad regime before the first cell trains
            grid.cell_config(cfg, c, __import__("pathlib").Path(_OUT.value), _STEPS.value)
        status = grid.run_grid(cfg, cells, _OUT.value, _STEPS.value, log=lambda s: print(s, file=sys.stderr))
    except (ConfigError, DataError, CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    for cell, s in status:
        print(f"{cell.name:<28} {s}")
    if len(status) == len(cells) and all(s != "interrupted" for _, s in status):
        path = report.build([_OUT.value + "/cells"], _OUT.value + "/report")
        print(f"report: {path}")


if __name__ == "__main__":
    flags.DEFINE_alias("layer-scaling", "layer_scaling")
    app.run(main)
