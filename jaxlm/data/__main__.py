"""Build the tokenizer and token cache ahead of training, and print corpus statistics.

    python -m jaxlm.data --config=configs/tiny.py [--workdir=DIR] [--config.data.source=...]

``jaxlm.main`` with the same config and workdir (or the same data.cache_dir) finds them.
"""

from __future__ import annotations

import sys

from absl import flags

from jaxlm import cli, data
from jaxlm import config as config_lib


def define_flags():
    cli.define_config("config", "A config file, e.g. configs/tiny.py.")
    flags.DEFINE_string("workdir", "runs/data", "Where the cache goes (unless data.cache_dir is set).")


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


def main(argv):
    F = cli.FLAGS
    cli.require(config=F.config)
    config_lib.validate(F.config)
    cache = data.prepare(F.config, F.workdir, log=lambda s: print(s, file=sys.stderr))
    print(stats(cache))


if __name__ == "__main__":
    cli.run(main, define_flags)
