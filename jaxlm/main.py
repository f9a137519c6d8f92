"""Entry point: flags -> config -> (distributed init) -> run.

    python -m jaxlm.main --config=configs/tiny.py --workdir=runs/tiny [--config.train.steps=100]
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from jaxlm import config as config_lib  # noqa: F401  (puts the repo root on sys.path for configs/)
from jaxlm.errors import CheckpointError, ConfigError, DataError

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file, e.g. configs/gpt2_small.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: metrics, checkpoints, data cache.")


def main(argv):
    del argv
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required, e.g. "
                             "python -m jaxlm.main --config=configs/tiny.py --workdir=runs/tiny")
    from jaxlm import train

    try:
        result = train.run(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, DataError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    if result.stopped and not result.preempted:
        sys.exit(2)  # e.g. a non-finite loss outside fp16; a preempted run exits 0 and resumes


if __name__ == "__main__":
    app.run(main)
