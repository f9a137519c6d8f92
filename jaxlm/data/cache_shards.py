"""The token cache's shards: documents cut into groups of ``SHARD_DOCS`` in corpus order, each
tokenized (in worker processes or in this one) into a token file kept until the cache is published.

A shard's file is named after its index and a digest of its documents, and written atomically, so
a file that exists is complete and belongs to these documents: a build run again after a kill
reads the finished shards back instead of tokenizing them again.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from jaxlm.data import tokenizer as tok_lib

# Documents per shard: the unit of parallel tokenization and of resume after a kill. The rows do
# not depend on it (shards are concatenated in order before rows are cut).
SHARD_DOCS = 2048

_worker_tok: tok_lib.Tokenizer | None = None
_worker_eos = True


def _init_worker(tok: tok_lib.Tokenizer, parent: int, eos: bool = True) -> None:
    global _worker_tok, _worker_eos
    _worker_tok, _worker_eos = tok, eos
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C reaches the whole group: the parent stops the pool
    # One core per worker (the processes are the parallelism): fastokens otherwise splits one long text
    # over its thread pool (measured: 1.4-1.8 cores busy on texts of 100K characters and more).
    os.environ.update(FASTOKENS_BPE_THREADS="1", RAYON_NUM_THREADS="1")
    # A parent killed with SIGKILL never closes the task queue (each worker holds its write end too),
    # so a worker would wait for tasks forever: it exits when it finds itself orphaned. The parent's pid
    # comes from the parent: a worker still starting when it died would see its new parent here.
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _tokenize_shard(docs: list[str], path: Path, tok: tok_lib.Tokenizer | None = None,
                    threads: int | None = 1, eos: bool | None = None) -> int:
    """Tokenizes one shard into `path` (its documents' tokens, each followed by EOS unless data.eos is
    off), atomically. In a worker process on one thread (the processes are the parallelism); in this
    process on all cores."""
    tok = tok or _worker_tok
    dtype = tok.dtype()
    flat = tok.encode_flat(docs, num_threads=threads, eos=_worker_eos if eos is None else eos).astype(dtype, copy=False)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(flat.tobytes())
            f.flush()
            os.fsync(f.fileno())  # a shard that exists is complete, also after a crash
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return int(flat.size)


def _read_shard(path: Path, dtype) -> np.ndarray:
    return np.fromfile(path, dtype=dtype)


def _digest(docs: list[str]) -> str:
    h = hashlib.blake2b(digest_size=10)
    for d in docs:
        b = d.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _groups(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    group: list[str] = []
    for d in docs:
        group.append(d)
        if len(group) >= size:
            yield group
            group = []
    if group:
        yield group


class _InProcess:
    """The executor for data.workers <= 1: tokenizes at submission, with the tokenizer's threads (all cores)."""

    def __init__(self, tok, eos: bool):
        self.tok, self.eos = tok, eos

    def submit(self, fn, docs, path):
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_result(fn(docs, path, self.tok, None, self.eos))
        return fut

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def executor(workers: int, tok, eos: bool = True):
    """Tokenizes shards (``submit(_tokenize_shard, docs, path)``), each document followed by EOS if `eos`."""
    if workers <= 1:
        return _InProcess(tok, eos)
    # spawn, not fork: the parent is usually a multithreaded JAX process
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
        initargs=(tok, os.getpid(), eos))


@dataclasses.dataclass
class ShardCounts:
    tokenized: int = 0
    reused: int = 0


def tokenized_shards(docs: Iterable[str], tok, pool, shard_dir: Path, in_flight: int,
                      counts: ShardCounts) -> Iterator[tuple[int, np.ndarray]]:
    """(documents, tokens) of each shard of `docs` in corpus order; a shard finished by an earlier,
    interrupted build (same index, same documents) is read back instead of tokenized again."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    queue: collections.deque = collections.deque()
    dtype = tok.dtype()
    for i, group in enumerate(_groups(docs, SHARD_DOCS)):
        path = shard_dir / f"{i:07d}-{_digest(group)}.bin"
        if path.exists():
            counts.reused += 1
            fut: concurrent.futures.Future = concurrent.futures.Future()
            fut.set_result(None)
        else:
            counts.tokenized += 1
            fut = pool.submit(_tokenize_shard, group, path)
        queue.append((len(group), path, fut))
        while len(queue) > in_flight:
            n, p, f = queue.popleft()
            f.result()
            yield n, _read_shard(p, dtype)
    while queue:
        n, p, f = queue.popleft()
        f.result()
        yield n, _read_shard(p, dtype)


def tokenize_share(docs: Iterable[str], pool, shard_dir: Path, host: int, hosts: int, in_flight: int,
                   counts: ShardCounts) -> None:
    """Tokenizes the shards of `docs` whose index is `host` modulo `hosts` into `shard_dir` (the
    files ``tokenized_shards`` reads back), skipping those already there."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    queue: collections.deque = collections.deque()
    for i, group in enumerate(_groups(docs, SHARD_DOCS)):
        if i % hosts != host:
            continue
        path = shard_dir / f"{i:07d}-{_digest(group)}.bin"
        if path.exists():
            counts.reused += 1
            continue
        counts.tokenized += 1
        queue.append(pool.submit(_tokenize_shard, group, path))
        while len(queue) > in_flight:
            queue.popleft().result()
    while queue:
        queue.popleft().result()
