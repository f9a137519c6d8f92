"""Export a checkpoint as a Hugging Face GPT-2 directory (config.json + model.safetensors): library and CLI.

    python -m jaxlm.export --workdir=DIR [--step=N] --to-hf=OUT

The run's tokenizer is written beside the weights as Hugging Face tokenizer files (tokenizer.json,
tokenizer_config.json, special_tokens_map.json; vocab.json + merges.txt for a byte-level BPE), and a
SentencePiece run's ``tokenizer.model`` too, so that transformers' ``GPT2LMHeadModel.from_pretrained(OUT)``
loads the model and ``AutoTokenizer.from_pretrained(OUT)`` a tokenizer that gives jaxlm's ids
(``jaxlm.data.tokenizer_export``); ``jaxlm.eval --hf=OUT`` and ``jaxlm.probe --hf=OUT`` find it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from absl import flags

from jaxlm import cli, data, hf, paths, saved_run
from jaxlm.data import integrity, tokenizer_export
from jaxlm.data import tokenizer as tok_lib
from jaxlm.errors import CheckpointError


def export(workdir, out, step: int | None = None) -> Path:
    """Writes checkpoint `step` (default: the newest) of run `workdir` as an HF GPT-2 directory `out`."""
    cfg, trainer, state, meta, step = saved_run.load_run(workdir, step)
    _tokenizer(workdir, meta)  # (before anything is written)
    url = out if paths.is_remote(out) else None
    if url is not None:  # HF writes local files: a local directory, uploaded with its commit object last
        paths.check_url(url, "--to_hf")
        out = paths.mirror(url) / "export"
        shutil.rmtree(out, ignore_errors=True)
    out = hf.save_pretrained(out, trainer.model_cfg, trainer.policy, state.params,
                             eos_token_id=int(meta["data"]["eos_id"]))
    tokenizer_export.save_for_hf(tok_lib.load(_tokenizer(workdir, meta)), out)
    if url is not None:
        paths.publish(out, url)
        return paths.path(url)
    return out


def _tokenizer(workdir, meta) -> str:
    """The run's tokenizer spec, checked: its file must exist and match its token cache's manifest (an
    export never goes without the tokenizer that gives the model's ids)."""
    spec = saved_run.tokenizer_spec(meta, workdir)
    cache = Path(meta["data"]["cache"])
    rebuild = (f"rebuild the run's token cache (python -m jaxlm.data --config=<the run's config> --workdir={workdir}, "
               "or rerun its training command) and export again")
    if not tok_lib.spec_path(spec).exists():
        raise CheckpointError(f"the run's tokenizer {tok_lib.spec_path(spec)} is gone (its token cache was deleted?, "
                              f"and the run's own copy in {saved_run.KEPT}/); an export needs it: {rebuild}")
    if spec != meta["data"]["tokenizer"]:  # the run's own copy (the cache's is gone): it must be the one trained with
        if tok_lib.load(spec).sha256 != meta["data"]["tokenizer_sha256"]:
            raise CheckpointError(f"{tok_lib.spec_path(spec)}: not the tokenizer the run trained with (its sha256 "
                                  f"differs from run.json's); {rebuild}")
        return spec
    if (cache / "manifest.json").exists():
        try:
            data.TokenCache.open(cache)
        except integrity.Damage as e:
            raise CheckpointError(f"{e}: {rebuild}") from None
    return spec


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
