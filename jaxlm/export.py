"""Export a checkpoint as a Hugging Face GPT-2 directory (config.json + model.safetensors).

    python -m jaxlm.export --workdir=DIR [--step=N] --to-hf=OUT

The tokenizer (SentencePiece ``tokenizer.model``) is copied beside the weights; transformers'
``GPT2LMHeadModel.from_pretrained(OUT)`` loads the model.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from absl import app, flags

from jaxlm.errors import CheckpointError

_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_OUT = flags.DEFINE_string("to_hf", None, "Output directory for the Hugging Face model.")


def export(workdir, out, step: int | None = None) -> Path:
    from jaxlm import checkpoint, hf

    cfg, trainer, state, meta, step = checkpoint.load_run(workdir, step)
    out = hf.save_pretrained(out, trainer.model_cfg, trainer.policy, state.params,
                             eos_token_id=int(meta["data"]["eos_id"]))
    tok = Path(meta["data"]["tokenizer"])
    if tok.exists():
        shutil.copy(tok, out / "tokenizer.model")
    return out


def main(argv):
    del argv
    if not _WORKDIR.value or not _OUT.value:
        raise app.UsageError("--workdir and --to_hf are required")
    try:
        out = export(_WORKDIR.value, _OUT.value, _STEP.value)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    flags.DEFINE_alias("to-hf", "to_hf")
    app.run(main)
