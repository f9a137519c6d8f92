"""Export a checkpoint as a Hugging Face GPT-2 directory (config.json + model.safetensors): library and CLI.

    python -m jaxlm.export --workdir=DIR [--step=N] --to-hf=OUT

The tokenizer (SentencePiece ``tokenizer.model``) is copied beside the weights; transformers'
``GPT2LMHeadModel.from_pretrained(OUT)`` loads the model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from absl import flags

from jaxlm import cli, hf
from jaxlm import run as run_lib


def export(workdir, out, step: int | None = None) -> Path:
    """Writes checkpoint `step` (default: the newest) of run `workdir` as an HF GPT-2 directory `out`."""
    cfg, trainer, state, meta, step = run_lib.load_run(workdir, step)
    out = hf.save_pretrained(out, trainer.model_cfg, trainer.policy, state.params,
                             eos_token_id=int(meta["data"]["eos_id"]))
    tok = Path(meta["data"]["tokenizer"])
    if tok.exists():
        shutil.copy(tok, out / "tokenizer.model")
    return out


def define_flags():
    flags.DEFINE_string("workdir", None, "The run directory.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_string("to_hf", None, "Output directory for the Hugging Face model.")
    flags.DEFINE_alias("to-hf", "to_hf")


def main(argv):
    F = cli.FLAGS
    cli.require(workdir=F.workdir, to_hf=F.to_hf)
    print(f"wrote {export(F.workdir, F.to_hf, F.step)}")


if __name__ == "__main__":
    cli.run(main, define_flags)
