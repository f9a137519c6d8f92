"""Input-pipeline throughput (a benchmark, not a test): tokenization and loader tokens/s.

    python -m jaxlm.data.bench [--source=stdlib] [--vocab_size=8192] [--seq_len=1024] [--batch=32] [--batches=2000]

GPT-2 small on one H100 consumes roughly 0.5M tokens/s; the loader must be far faster.
"""

from __future__ import annotations

import tempfile
import time

import jax
import numpy as np
from absl import flags

from jaxlm import cli, config, data
from jaxlm.data import sources
from jaxlm.sharding import batch_sharding, make_mesh


def define_flags():
    flags.DEFINE_string("source", "stdlib", "A data.source spec.")
    flags.DEFINE_integer("vocab_size", 8192, "Tokenizer vocabulary size.")
    flags.DEFINE_integer("seq_len", 1024, "Tokens per sequence.")
    flags.DEFINE_integer("batch", 32, "Sequences per batch.")
    flags.DEFINE_integer("batches", 2000, "Batches timed.")


def main(argv):
    args = cli.FLAGS
    cfg = config.load("configs/tiny.py", {
        "data.source": args.source, "data.vocab_size": args.vocab_size, "model.n_positions": args.seq_len,
        "train.seq_len": args.seq_len, "train.batch_size": args.batch})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache = data.prepare(cfg, tmp, log=lambda s: None)
        total = time.perf_counter() - t0
        tok = cache.tokenizer()
        docs = list(sources.open_source(cfg.data).documents("train"))
        t0 = time.perf_counter()
        n = sum(len(x) for x in tok.encode(docs))
        enc = time.perf_counter() - t0
        print(f"corpus {args.source}: {len(docs):,} documents, {n:,} tokens")
        print(f"tokenize (SentencePiece, {jax.local_device_count()} devices, all cores): {n / enc:,.0f} tokens/s")
        print(f"whole cache build incl. tokenizer training: {total:.1f}s")

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
