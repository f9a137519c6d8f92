"""Input-pipeline throughput (a benchmark, not a test): cache build and loader tokens/s.

    python -m jaxlm.data.bench [--source=stdlib] [--vocab_size=8192] [--seq_len=1024] [--workers=1,2]
                               [--batch=32] [--batches=2000]

The cache build (read the corpus, tokenize, write rows; the tokenizer already trained) is timed for
each data.workers count, and the best rate projects the build of a 9B-token corpus (OpenWebText).
GPT-2 small on one H100 consumes roughly 0.5M tokens/s; the loader must be far faster.
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import numpy as np
from absl import flags

from jaxlm import cli, config, data
from jaxlm.sharding import batch_sharding, make_mesh


def define_flags():
    flags.DEFINE_string("source", "stdlib", "A data.source spec.")
    flags.DEFINE_integer("vocab_size", 8192, "Tokenizer vocabulary size.")
    flags.DEFINE_integer("seq_len", 1024, "Tokens per sequence.")
    flags.DEFINE_integer("batch", 32, "Sequences per batch.")
    flags.DEFINE_integer("batches", 2000, "Batches timed.")
    flags.DEFINE_list("workers", ["1", "2"], "data.workers counts whose cache builds are timed.")


PROJECTED_TOKENS = 9e9  # OpenWebText's size in GPT-2 tokens


def main(argv):
    args = cli.FLAGS
    cfg = config.load("configs/tiny.py", {
        "data.source": args.source, "data.vocab_size": args.vocab_size, "model.n_positions": args.seq_len,
        "train.seq_len": args.seq_len, "train.batch_size": args.batch})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache = data.prepare(cfg, tmp, log=lambda s: None)
        total = time.perf_counter() - t0
        tokens = sum(s["tokens"] for s in cache.manifest["splits"].values())
        print(f"corpus {args.source}: {cache.manifest['splits']['train']['documents']:,} training documents, "
              f"{tokens:,} tokens; first build incl. tokenizer training {total:.1f}s")
        cfg.data.tokenizer = str(cache.tokenizer_path)
        best = 0.0
        for workers in [int(w) for w in args.workers]:
            cfg.data.workers = workers
            cfg.data.cache_dir = f"{tmp}/workers{workers}"
            t0 = time.perf_counter()
            built = data.prepare(cfg, tmp, log=lambda s: None)
            dt = time.perf_counter() - t0
            assert built.manifest == cache.manifest
            best = max(best, tokens / dt)
            how = f"{workers} worker processes" if workers > 1 else "in-process, SentencePiece threads on all cores"
            print(f"cache build, data.workers={workers} ({how}; {os.cpu_count()} cores): {tokens / dt:,.0f} tokens/s "
                  f"({dt:.1f}s)")
        print(f"projected build of a {PROJECTED_TOKENS / 1e9:.0f}B-token corpus at {best:,.0f} tokens/s: "
              f"{PROJECTED_TOKENS / best / 3600:.1f} h")

        loader = data.train_loader(cache, cfg)
        next(loader)
        per = args.batch * (args.seq_len + 1)
        t0 = time.perf_counter()
        for _ in range(args.batches):
            b = next(loader)
        dt = time.perf_counter() - t0
        print(f"loader (host numpy, batch {args.batch} x {args.seq_len + 1}): {args.batches * per / dt:,.0f} tokens/s")

        sharding = batch_sharding(make_mesh(cfg.mesh))
        it = data.device_prefetch(loader, sharding)
        next(it)
        t0 = time.perf_counter()
        for _ in range(args.batches):
            b = next(it)
        jax.block_until_ready(b)
        dt = time.perf_counter() - t0
        print(f"loader -> global jax.Array on {jax.devices()[0].platform}: {args.batches * per / dt:,.0f} tokens/s")
    assert np.asarray(b).shape == (args.batch, args.seq_len + 1)


if __name__ == "__main__":
    cli.run(main, define_flags)
