"""The token cache build: the same bytes for any worker count, resumable at shard granularity after a
kill, one builder per cache (a live one is waited for), one build on a multi-process run."""

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import pytest
from jax.experimental import multihost_utils

from jaxlm import config, data
from jaxlm.data import cache as cache_lib
from jaxlm.data import cache_lock, cache_shards
from jaxlm.errors import DataError

from conftest import ROOT, write_word_corpus

SHARD_DOCS = 7  # small shards, so a 120-document corpus makes ~18 of them


def _overrides(corpus, root, workers=1):
    return {"data.source": f"files:{corpus}/*.txt", "data.vocab_size": 300, "data.val_fraction": 0.1,
            "data.cache_dir": str(root), "data.workers": workers, "train.seq_len": 32, "train.batch_size": 8}


def _cfg(corpus, root, workers=1):
    return config.load(ROOT / "jaxlm" / "configs" / "tiny.py", _overrides(corpus, root, workers))


def _files(p: Path):
    return {f.name: f.read_bytes() for f in sorted(p.iterdir())}


def _shards(log: list[str]) -> tuple[int, int]:
    """(tokenized, reused) shards, from the build's last line."""
    m = re.search(r"(\d+) shards tokenized(?:, (\d+) reused)?", "\n".join(log))
    assert m, log
    return int(m.group(1)), int(m.group(2) or 0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("buildcorpus"), 120, words_per_doc=0)


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(cache_shards, "SHARD_DOCS", SHARD_DOCS)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted in-process build: its directory, and how many shards it tokenized."""
    root = tmp_path_factory.mktemp("buildref")
    log: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache_shards, "SHARD_DOCS", SHARD_DOCS)
        cache = data.prepare(_cfg(corpus, root), root, log=log.append)
    tokenized, reused = _shards(log)
    assert reused == 0 and tokenized > 12
    return cache, tokenized


@pytest.mark.slow  # starts worker processes
def test_one_and_two_workers_write_the_same_bytes(corpus, reference, tmp_path, small_shards):
    ref, _ = reference
    for workers in (0, 2):
        log: list[str] = []
        cache = data.prepare(_cfg(corpus, tmp_path / str(workers), workers), tmp_path, log=log.append)
        assert any(f"{workers} worker processes" in s for s in log) == (workers == 2), log
        assert cache.path.name == ref.path.name  # the same key: caches built before are still found
        assert cache.manifest == ref.manifest
        assert _files(cache.path) == _files(ref.path)


def test_an_interrupted_build_resumes_from_its_finished_shards(corpus, reference, tmp_path, small_shards,
                                                               monkeypatch):
    ref, total = reference
    cfg = _cfg(corpus, tmp_path)
    real, read = cache_shards._read_shard, []

    def interrupted_after_5(path, dtype):
        if len(read) == 5:
            raise KeyboardInterrupt  # ^C, or SIGTERM's exception, half-way through the train split
        read.append(path)
        return real(path, dtype)

    monkeypatch.setattr(cache_shards, "_read_shard", interrupted_after_5)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(cfg, tmp_path, log=lambda s: None)
    assert not list(tmp_path.glob("tokens/*/manifest.json"))
    (work,) = tmp_path.glob("tokens/.build-*")
    assert len(list(work.glob("shards/train/*.bin"))) >= 5
    monkeypatch.setattr(cache_shards, "_read_shard", real)
    log: list[str] = []
    cache = data.prepare(cfg, tmp_path, log=log.append)
    tokenized, reused = _shards(log)
    assert reused >= 5 and tokenized + reused == total
    assert _files(cache.path) == _files(ref.path)
    assert not work.exists()  # published: the shards are gone


KILL_AFTER_SHARDS = """
import json, os, signal, sys
from jaxlm import config, data
from jaxlm.data import cache_shards as cache
cache.SHARD_DOCS = int(sys.argv[2])
real, read = cache._read_shard, []
def dying(path, dtype):  # the parent, having assembled N shards' rows, is killed without warning
    if len(read) == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    read.append(path)
    return real(path, dtype)
cache._read_shard = dying
o = json.loads(sys.argv[1])
data.prepare(config.load("configs/tiny.py", o), o["data.cache_dir"], log=print)
"""


@pytest.mark.slow  # a subprocess with worker processes
def test_kill_9_during_the_build_then_a_rerun_gives_the_same_rows(corpus, reference, tmp_path, small_shards):
    ref, total = reference
    o = _overrides(corpus, tmp_path, workers=2)
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_SHARDS, json.dumps(o), str(SHARD_DOCS), "6"], cwd=ROOT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not list(tmp_path.glob("tokens/*/manifest.json"))
    log: list[str] = []
    cache = data.prepare(_cfg(corpus, tmp_path, workers=1), tmp_path, log=log.append)  # the lock died with it
    tokenized, reused = _shards(log)
    assert reused >= 6 and tokenized + reused == total, log
    assert _files(cache.path) == _files(ref.path)


def _hold_lock(work: Path) -> int:
    work.mkdir(parents=True)
    fd = os.open(work / "lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # flock locks belong to the open file: this process's builds see it taken
    (work / "owner.json").write_text(json.dumps({"host": "otherhost", "pid": 4242, "since": "2026-11-23 10:00:00"}))
    return fd


def test_a_live_builder_is_waited_for(corpus, reference, tmp_path, monkeypatch):
    ref, _ = reference
    cfg = _cfg(corpus, tmp_path)
    cfg.data.tokenizer = str(ref.tokenizer_path)  # the same tokenizer: the same key
    fd = _hold_lock(tmp_path / "tokens" / f".build-{ref.path.name}")
    monkeypatch.setattr(cache_lib, "WAIT_S", 0.5)
    monkeypatch.setattr(cache_lock, "_POLL_S", 0.05)
    with pytest.raises(DataError, match=r"process 4242 on otherhost \(since 2026-11-23 10:00:00\) has been building"):
        data.prepare(cfg, tmp_path, log=lambda s: None)
    assert not (tmp_path / "tokens" / ref.path.name).exists()
    # the other builder finishes (here: dies, and the kernel frees its lock): the waiting one goes on
    monkeypatch.setattr(cache_lib, "WAIT_S", 60.0)
    threading.Timer(0.5, os.close, (fd,)).start()
    log: list[str] = []
    t0 = time.monotonic()
    cache = data.prepare(cfg, tmp_path, log=log.append)
    assert time.monotonic() - t0 >= 0.4 and "waiting for process 4242 on otherhost" in log[0], log
    assert _files(cache.path) == _files(ref.path)


def test_a_multi_process_run_builds_once_on_process_0(corpus, tmp_path, monkeypatch):
    cfg = _cfg(corpus, tmp_path)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    at_barrier = []

    def barrier(name):  # after the shares, process 0 finishes its build while process 1 waits here
        at_barrier.append((name, sorted(p.name for p in tmp_path.glob("*/*/manifest.json"))))
        if jax.process_index() == 1 and name == "jaxlm.data.prepare":
            data.build(cfg.data, cfg.train.seq_len, tmp_path, log=lambda s: None)

    monkeypatch.setattr(multihost_utils, "sync_global_devices", barrier)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    log: list[str] = []
    cache = data.prepare(cfg, tmp_path, log=log.append)
    # process 1 neither trained nor tokenized anything (a tokenizer still to train: no shares)
    assert at_barrier == [("jaxlm.data.prepare.shares", []), ("jaxlm.data.prepare", [])]
    assert not [m for m in log if m.startswith(("training", "tokenizing"))], log
    assert cache.path.is_dir() and cache.path.parent.name == "tokens"
    # process 0 builds before the second barrier (here the cache is found)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    assert data.prepare(cfg, tmp_path, log=log.append).path == cache.path and len(at_barrier) == 4
    assert [len(m) for _, m in at_barrier[2:]] == [1, 1]
