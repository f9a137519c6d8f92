"""CLI: python -m jaxlm.eval --workdir=DIR [--step=N | --all_steps] [--data=SPEC] [--context=N] [--stride=N]

See ``jaxlm/evaluate.py`` for what is computed.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from jaxlm.errors import CheckpointError, ConfigError, DataError

_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_ALL = flags.DEFINE_bool("all_steps", False, "Evaluate every saved checkpoint; write eval.csv and eval.png.")
_DATA = flags.DEFINE_string("data", None, "A data.source spec (default: the run's validation split).")
_CONTEXT = flags.DEFINE_integer("context", 0, "Window length in tokens (default: train.seq_len).")
_STRIDE = flags.DEFINE_integer("stride", 0, "Window stride (default: context/2; Mistral: 512).")
_MAX_DOCS = flags.DEFINE_integer("max_docs", 0, "Evaluate on at most this many documents (0 = all).")


def main(argv):
    del argv
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    from jaxlm import evaluate

    try:
        rows = evaluate.evaluate_run(_WORKDIR.value, step=_STEP.value, all_steps=_ALL.value, data_spec=_DATA.value,
                                     context=_CONTEXT.value, stride=_STRIDE.value, max_docs=_MAX_DOCS.value,
                                     log=lambda s: print(s, file=sys.stderr))
    except (CheckpointError, ConfigError, DataError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(rows[-1] if not _ALL.value else rows))


if __name__ == "__main__":
    flags.DEFINE_alias("all-steps", "all_steps")
    app.run(main)
