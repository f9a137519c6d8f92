"""Build the tokenizer and token cache ahead of training, and print corpus statistics; or show what
each step of a run trained on (``jaxlm.data.viewer``).

    python -m jaxlm.data --config=configs/tiny.py [--config.data.source=...]
    python -m jaxlm.data [--config=...] --workdir=RUN --batches=FIRST:LAST --out=FILE.npy
    python -m jaxlm.data [--config=...] --workdir=RUN --find=TEXT [--batches=FIRST:LAST]
    python -m jaxlm.data --cache | --prune [--config=... for its data.cache_dir]

``jaxlm.main`` with the same config finds them in the machine's cache (``$JAXLM_CACHE``, else
``$XDG_CACHE_HOME/jaxlm``, else ``~/.cache/jaxlm``) or the same data.cache_dir. ``--cache`` lists what
the cache holds, its size and the run directories using each entry; ``--prune`` deletes what no existing
run directory uses (``jaxlm.data.cache_index``).

``--batches`` writes the int32 rows steps FIRST..LAST train on (from 1, as in metrics.jsonl) to a .npy
file of shape (LAST - FIRST + 1, train.batch_size, train.seq_len + 1), from the loader alone (no
checkpoint). ``--find`` prints ``step S row R`` for every row that contains TEXT's token ids. Both read
the run's own config (RUN/run.json) when --config is not given; --config.X overrides need --config.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import flags

from jaxlm import cli, data, paths
from jaxlm import config as config_lib
from jaxlm.data import cache_index, viewer
from jaxlm.errors import ConfigError


def define_flags():
    cli.define_config("config", "A config file, e.g. configs/tiny.py.")
    flags.DEFINE_string("workdir", None, "With --batches or --find: the run directory (its run.json is the config "
                        "when --config is not given). When building: the run the cache is for (--prune keeps it while "
                        "that directory exists).")
    flags.DEFINE_bool("cache", False, "List what the cache (the machine's, or --config's data.cache_dir) holds: "
                      "each entry's size and the run directories using it.")
    flags.DEFINE_bool("prune", False, "Delete the cache entries no existing run directory uses (and damaged caches "
                      "set aside); builds in progress are left.")
    flags.DEFINE_string("batches", None, "FIRST:LAST: the steps (from 1, as in metrics.jsonl) whose training rows "
                        "to write to --out (or, with --find, to search).")
    flags.DEFINE_string("out", None, "With --batches: the .npy file the rows go to, int32 of shape "
                        "(LAST-FIRST+1, train.batch_size, train.seq_len+1), index i the global batch of step FIRST+i.")
    flags.DEFINE_string("find", None, "Print the steps (and rows within the batch) whose rows contain TEXT's token ids "
                        "(or those of ' '+TEXT, as BPE tokenizes a word differently after a space). Searches the "
                        "--batches range, else the first epoch (each epoch is shuffled anew). A text crossing a row "
                        "boundary is not found.")


def stats(cache: data.TokenCache) -> str:
    m = cache.manifest
    lines = [f"cache      {cache.path}", f"source     {m['source']}",
             f"tokenizer  {cache.tokenizer_path} (vocab {m['vocab_size']}, sha256 {m['tokenizer_sha256'][:12]})"]
    for split, s in m["splits"].items():
        per_doc = s["tokens"] / max(s["documents"], 1)
        lines.append(
            f"{split:<10} {s['documents']:>10,} documents {s['tokens']:>14,} tokens {per_doc:>9,.0f} tokens/doc "
            f"{s['sequences']:>10,} sequences of {m['seq_len'] + 1}  vocab coverage "
            f"{s['vocab_used'] / m['vocab_size']:.1%}"
        )
    c = m["counters"]
    if c["replaced_bytes_documents"] or c["missing_field"] or c["empty_documents"]:
        lines.append(f"noticed    {c['replaced_bytes_documents']} documents with non-UTF-8 bytes (replaced), "
                     f"{c['missing_field']} records without the text field (skipped), "
                     f"{c['empty_documents']} empty documents (skipped)")
    return "\n".join(lines)


def view_range(batches: str | None, out: str | None, find: str | None) -> tuple[int, int] | None:
    """The --batches range (None without one), once the flags are known to go together."""
    span = viewer.parse_range(batches) if batches is not None else None
    if find is not None and out:
        raise ConfigError("--out goes with --batches alone: --find prints the steps it finds (drop --out)")
    if out and span is None:
        raise ConfigError("--out needs --batches=FIRST:LAST, the steps whose rows to write")
    if span is not None and find is None and not out:
        raise ConfigError("--batches needs --out=FILE.npy, where the rows go (or --find=TEXT, to search them)")
    return span


def write_batches(cfg, workdir, span: tuple[int, int], out: str) -> None:
    first, last = span
    arr = viewer.batches(cfg, workdir, first, last, log=_err, out=out)
    n, b, t = arr.shape
    later = (f"; the run trains {cfg.train.steps} steps, the later ones are what a longer run would read"
             if last > cfg.train.steps and str(cfg.train.budget).strip().lower() in ("", "none") else "")
    _err(f"wrote {out}: int32 {arr.shape}, steps {first} to {last} ({n} steps x {b} rows x {t} tokens){later}")


def find_text(cfg, workdir, text: str, span: tuple[int, int] | None) -> None:
    hits = viewer.find(cfg, workdir, text, *(span or (None, None)), log=_err)
    where = f"steps {span[0]} to {span[1]}" if span else "the first epoch"
    for step, row in hits:
        print(f"step {step} row {row}")
    steps = len({s for s, _ in hits})
    _err(f"{text!r}: in {len(hits)} rows of {steps} steps of {where}" if hits else
         f"{text!r}: in no row of {where}")


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv):
    F = cli.FLAGS
    if not os.environ.get("JAX_PLATFORMS"):  # nothing here runs on a device: leave an accelerator's memory to training
        jax.config.update("jax_platforms", "cpu")
    if F.cache or F.prune:
        root = data.cache_root(F.config) if F.config is not None else paths.machine_cache()
        if paths.is_remote(root):
            raise ConfigError(f"--cache and --prune read a local cache; data.cache_dir={root} is in an object store")
        if F.prune:
            gone = cache_index.prune(root, log=_err)
            _err(f"pruned {len(gone)} entries from {root}")
        print(cache_index.describe(root))
        return
    span = view_range(F.batches, F.out, F.find)
    if span is not None or F.find is not None:
        cli.require(workdir=F.workdir)
        cfg = viewer.run_config(F.workdir, F.config, log=_err)
        if F.find is not None:
            find_text(cfg, F.workdir, F.find, span)
        else:
            write_batches(cfg, F.workdir, span, F.out)
        return
    cli.require(config=F.config)
    config_lib.validate(F.config)
    config_lib.check_corpus(F.config)
    cache = data.prepare(F.config, F.workdir, log=_err)
    print(stats(cache))


if __name__ == "__main__":
    cli.run(main, define_flags)
