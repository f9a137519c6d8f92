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
    F = flags.FLAGS
    if not F.workdir or not F.to_hf:
        raise app.UsageError("--workdir and --to-hf are required")
    try:
        out = export(F.workdir, F.to_hf, F.step)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":  # flags only when run as a program: the module is a library too
    flags.DEFINE_string("workdir", None, "The run directory.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_string("to_hf", None, "Output directory for the Hugging Face model.")
    flags.DEFINE_alias("to-hf", "to_hf")
    app.run(main)
