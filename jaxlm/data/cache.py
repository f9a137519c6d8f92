"""The tokenized cache: tokenize a corpus once into packed sequences of ``seq_len + 1`` tokens.

Layout under ``data.cache_dir`` (default: the machine's cache, ``jaxlm.paths.machine_cache()``)::

    tokenizers/<key>/tokenizer.model     a trained tokenizer, keyed by (source, vocab settings[, kind])
                                         (tokenizer.model for SentencePiece, hf/ for a byte-level BPE)
    tokens/<key>/manifest.json           documents, tokens, sequences per split; how it was made
    tokens/<key>/tokenizer.model         the tokenizer the tokens were made with (or hf/: tokenizer.json, ...)
    tokens/<key>/{train,validation}.bin  uint16/uint32 rows of seq_len+1 tokens (random access)

A token directory's key hashes (source fingerprint, tokenizer sha256, seq_len, format version; and
``val_split: tail`` where the validation split is the corpus's tail, ``jaxlm.data.splits``).
Documents are concatenated in corpus order, each followed by EOS (none between them with
``data.eos=False``, as Mistral's), and cut into rows; the tail
shorter than a row is dropped (counted in the manifest). Rows are a flat binary that
``np.memmap`` opens in place: random access like array_record, with no per-record decoding.

The build reads the documents in corpus order in this process and cuts them into shards of
``SHARD_DOCS`` documents; ``data.workers`` processes tokenize the shards (0 or 1: this process,
the tokenizer's threads over all cores), each into a token file named after its index and a digest
of its documents. This process then concatenates the shards' tokens in order and writes the rows,
so the rows are the same bytes whatever the worker count. The work happens in a directory stable
per key, ``tokens/.build-<key>/``, held by an ``fcntl`` lock (released by the kernel when its owner
dies, even by SIGKILL): a second live builder of the same cache waits for the first and uses its
result; a build run again after a kill reuses the finished shards. The rows, the tokenizer and the
manifest (written last) go to ``.build-<key>/out``, renamed to ``tokens/<key>`` when complete, so
an interrupted build never leaves a directory a later run would use (a directory without its
manifest is never read). A cache root on an object store is built in a local mirror and uploaded
with a commit object written last (``jaxlm.data.prepare``).

The shards and their tokenizing workers live in ``cache_shards``, the build directory's lock and the
atomic publishing of directories in ``cache_lock``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from jaxlm import files, paths
from jaxlm.data import cache_lock, cache_shards, integrity, remote, splits, tokenizer_train
from jaxlm.data import sources as sources_lib
from jaxlm.data import tokenizer as tok_lib
from jaxlm.errors import DataError

FORMAT_VERSION = 1
# A builder finding another live builder of the same cache waits this long for it, then fails.
WAIT_S = 24 * 3600.0


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclasses.dataclass
class TokenCache:
    """A finished token directory; ``split(name)`` is an (N, seq_len+1) read-only memmap."""

    path: Path
    manifest: dict
    lazy: bool = False  # rows verified a chunk at a time as they are read (a cache over integrity.OPEN_BOUND)

    @property
    def seq_len(self) -> int:
        return self.manifest["seq_len"]

    @property
    def tokenizer_spec(self) -> str:
        """What ``tokenizer.load`` takes: the ``tokenizer.model`` path, or ``hf:<path>/hf``."""
        return tok_lib.stored(self.path) or str(self.path / "tokenizer.model")

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer's file (SentencePiece) or directory (Hugging Face)."""
        return tok_lib.spec_path(self.tokenizer_spec)

    def tokenizer(self) -> tok_lib.AnyTokenizer:
        return tok_lib.load(self.tokenizer_spec)

    def split(self, name: str) -> np.ndarray | remote.RemoteRows:
        """The rows of a split: memory-mapped, or read by byte ranges from the store (a streamed cache)."""
        info = self.manifest["splits"][name]
        if info["sequences"] == 0:
            return np.zeros((0, self.seq_len + 1), np.dtype(self.manifest["dtype"]))
        mark = self.path / remote.MARK
        if mark.exists() and not (self.path / f"{name}.bin").exists():
            return remote.RemoteRows(f"{mark.read_text().rstrip('/')}/{name}.bin", self.manifest["dtype"],
                                     (info["sequences"], self.seq_len + 1))
        rows = np.memmap(self.path / f"{name}.bin", dtype=np.dtype(self.manifest["dtype"]), mode="r",
                         shape=(info["sequences"], self.seq_len + 1))
        if self.lazy:
            return integrity.VerifiedRows(rows, self.path / f"{name}.bin", self.manifest["files"][f"{name}.bin"],
                                          self.manifest["vocab_size"], on_damage=self._damaged)
        return rows

    def _damaged(self, damage: integrity.Damage) -> None:
        """A chunk found damaged as it was read (a large cache): set aside, so the next run rebuilds it."""
        aside = set_aside(self.path, damage, log=lambda s: None)
        raise DataError(f"{damage}; the cache was set aside as {aside.name}: run the same command again to rebuild "
                        "it (a run resumes from its last checkpoint)") from None

    @classmethod
    def open(cls, path: Path, verify: bool = True) -> "TokenCache":
        """The cache at `path`, verified against its manifest (``jaxlm.data.integrity``): file sizes and
        the tokenizer at once, the rows at once or (a large cache) as they are read. Raises
        ``integrity.Damage`` for a damaged file."""
        cache = cls(Path(path), json.loads((Path(path) / "manifest.json").read_text()))
        tok_lib.check_dtype(cache.manifest["vocab_size"], cache.manifest["dtype"], f"token cache {path}")
        if verify and cache.manifest.get("files"):
            cache._verify()
        return cache

    def _verify(self) -> None:
        streamed = (self.path / remote.MARK).exists()  # rows in an object store: only the local files here
        local = {n: r for n, r in self.manifest["files"].items()
                 if not (streamed and n in integrity.ROW_FILES and not (self.path / n).exists())}
        integrity.check_sizes(self.path, local)
        rows = {n: r for n, r in local.items() if n in integrity.ROW_FILES}
        self.lazy = sum(r["size"] for r in rows.values()) > integrity.OPEN_BOUND
        for name, r in local.items():
            if name not in rows:  # the tokenizer's files
                integrity.check_file(self.path / name, r)
            elif not self.lazy:
                integrity.check_file(self.path / name, r, self.manifest["vocab_size"], self.manifest["dtype"])


def local_tokenizer_spec(spec: str) -> str:
    """`spec` itself for a local tokenizer; for one on an object store (``hf:gs://...`` or
    ``gs://.../x.model``), its files copied into the local mirror of that URL, and their spec."""
    hf = str(spec).startswith(tok_lib.HF_PREFIX)
    path = str(spec)[len(tok_lib.HF_PREFIX):] if hf else str(spec)
    if not paths.is_remote(path):
        return spec
    local = paths.mirror(path)
    try:
        if hf:
            for name in tok_lib.HF_FILES:
                url = paths.path(path) / name
                if url.exists():
                    local.mkdir(parents=True, exist_ok=True)
                    files.atomic_write(local / name, url.read_bytes())
            return tok_lib.HF_PREFIX + str(local)
        target = local / paths.path(path).name
        files.atomic_write(target, paths.path(path).read_bytes())
        return str(target)
    except FileNotFoundError:
        raise DataError(f"data.tokenizer={spec!r}: not found in the object store") from None


def tokenizer_for(data_cfg, source: sources_lib.Source, cache_root: Path, log=print,
                  fetch=None, train: bool = True) -> tok_lib.AnyTokenizer | None:
    """The configured tokenizer: ``data.tokenizer`` if set, else one of ``data.tokenizer_kind`` trained once
    and cached (None instead of training one when `train` is False)."""
    if data_cfg.tokenizer:
        return tok_lib.load(local_tokenizer_spec(data_cfg.tokenizer))
    if (own := source.own_tokenizer()) is not None:  # the corpus's own (nanoGPT's meta.pkl)
        return own
    kind = data_cfg.get("tokenizer_kind", tokenizer_train.DEFAULT_KIND)
    if kind == "none":
        raise DataError("data.tokenizer is not set and data.tokenizer_kind='none' trains none: set "
                        "--config.data.tokenizer=hf:DIR (GPT-2's vocab.json and merges.txt, or a tokenizer.json)")
    if kind not in tokenizer_train.TRAINERS:
        raise DataError(f"data.tokenizer_kind={kind!r}: allowed: {', '.join(tokenizer_train.TRAINERS)}, none")
    fields = {"v": FORMAT_VERSION, "source": source.fingerprint(), "vocab": data_cfg.vocab_size,
              "max_docs": data_cfg.tokenizer_max_docs, "max_chars": data_cfg.tokenizer_max_chars,
              "val_fraction": data_cfg.val_fraction}
    if kind != tokenizer_train.DEFAULT_KIND:  # the default stays out of the key: caches built before it keep theirs
        fields["kind"] = kind
    final = splits.directory(cache_root / "tokenizers", fields, source, tok_lib.stored, fetch, _key)[1]
    key = final.name
    if spec := tok_lib.stored(final):
        return _load_trained(spec, final)
    if not train:
        return None
    what = "SentencePiece BPE" if kind == "sentencepiece" else "byte-level BPE"
    log(f"training a {data_cfg.vocab_size}-piece {what} tokenizer on {source.spec} "
        f"(up to {data_cfg.tokenizer_max_docs} documents)")
    t0 = time.time()
    tok = tokenizer_train.TRAINERS[kind](source.documents("train"), data_cfg.vocab_size,
                                         max_docs=data_cfg.tokenizer_max_docs, max_chars=data_cfg.tokenizer_max_chars)
    tmp = cache_lock.tmp_dir(final.parent, key)
    try:
        tok_lib.store(tok, tmp)
        cache_lock.publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    spec = tok_lib.stored(final)
    log(f"tokenizer trained in {time.time() - t0:.1f}s -> {tok_lib.spec_path(spec)}")
    return _load_trained(spec, final)


def _load_trained(spec: str, directory: Path) -> tok_lib.AnyTokenizer:
    """A tokenizer jaxlm trained and cached; an error names its directory (the user set no data.tokenizer)."""
    try:
        return tok_lib.load(spec)
    except DataError as e:
        reason = str(e).split("': ", 1)[-1]
        raise DataError(f"the tokenizer trained for this corpus, {directory}, cannot be loaded ({reason}); delete "
                        "that directory to train it again") from None


def _write_split(shards: Iterable[tuple[int, np.ndarray]], tok: tok_lib.Tokenizer, seq_len: int, out: Path,
                 desc: str) -> dict:
    """Writes the rows of one split from its tokenized shards, (documents, tokens with EOS), in corpus order."""
    row = seq_len + 1
    dtype = tok.dtype()
    pending = np.zeros(0, dtype)
    n_docs = n_tokens = n_rows = 0
    counts = np.zeros(tok.vocab_size, np.int64)
    bar = tqdm(desc=desc, unit=" docs", file=sys.stderr, mininterval=1.0, disable=None)
    with open(out, "wb") as f:
        for docs, flat in shards:
            counts += np.bincount(flat, minlength=tok.vocab_size)
            n_docs += docs
            n_tokens += flat.size
            pending = np.concatenate([pending, flat])
            full = pending.size // row
            if full:
                f.write(pending[: full * row].tobytes())
                n_rows += full
                pending = pending[full * row:]
            bar.update(docs)
            bar.set_postfix(tokens=f"{n_tokens:,}")
    bar.close()
    p = counts[counts > 0] / max(counts.sum(), 1)
    return {"documents": n_docs, "tokens": n_tokens, "sequences": n_rows,
            "dropped_tail_tokens": int(pending.size), "vocab_used": int((counts > 0).sum()),
            # the loss (nats/token) of the best context-free model: training must go well below it
            "unigram_entropy": round(float(-(p * np.log(p)).sum()), 6)}


def complete_directories(cache_root: Path) -> list[Path]:
    """The finished tokenizer and token directories under `cache_root` (not the builds in progress)."""
    out = []
    for sub, done in (("tokenizers", tok_lib.stored), ("tokens", lambda d: (d / "manifest.json").exists())):
        parent = Path(cache_root) / sub
        if parent.is_dir():
            out += [d for d in sorted(parent.iterdir()) if d.is_dir() and not d.name.startswith(".") and done(d)]
    return out


def _target(data_cfg, seq_len: int, cache_root: Path, log, fetch, train: bool = True):
    """(source, tokenizer, fingerprint, key, final directory) of this config's token cache; the
    tokenizer is None where it would have to be trained and `train` is False."""
    source = sources_lib.open_source(data_cfg)
    tok = tokenizer_for(data_cfg, source, cache_root, log, fetch=fetch, train=train)
    if tok is None:
        return source, None, None, None, None
    where = f"data.tokenizer={data_cfg.tokenizer!r}" if data_cfg.tokenizer else f"the tokenizer trained here ({tok.path})"
    tok_lib.check_dtype(tok.vocab_size, tok.dtype(), where)
    fingerprint = {"v": FORMAT_VERSION, "source": source.fingerprint(), "tokenizer": tok.sha256,
                   "seq_len": seq_len, "val_fraction": data_cfg.val_fraction, "max_docs": data_cfg.max_docs,
                   "has_validation": source.has_validation}
    if not data_cfg.get("eos", True):  # (only when off: the caches built before the switch keep their keys)
        fingerprint["eos"] = False
    if hasattr(source, "use_tokenizer"):  # tokens: reads its ids with it before the cache exists
        source.use_tokenizer(tok)
    fingerprint, final = splits.directory(cache_root / "tokens", fingerprint, source, splits.hashed_cache, fetch, _key)
    return source, tok, fingerprint, final.name, final


def _workers(data_cfg) -> int:
    workers = int(data_cfg.get("workers", 1))
    if workers < 0:
        raise DataError(f"data.workers={workers}: must be 0 or 1 (tokenize in this process) or more (processes)")
    return workers


def build(data_cfg, seq_len: int, cache_root: str | Path, log=print, fetch=None) -> TokenCache:
    """The token cache for this data config and seq_len: found if built before, else built now.
    `fetch(directory)`, if given, may fill a tokenizer or token directory before it is looked for
    (from an object store: ``jaxlm.data.prepare``)."""
    cache_root = Path(cache_root)
    source, tok, fingerprint, key, final = _target(data_cfg, seq_len, cache_root, log, fetch)
    if (final / "manifest.json").exists():
        try:
            found = TokenCache.open(final)
            log(f"data: cache hit: {final} (nothing to build)")
            return found
        except integrity.Damage as e:
            set_aside(final, e, log, remote_root=fetch is not None)
    workers = _workers(data_cfg)
    work = final.parent / f".build-{key}"
    lock = cache_lock.hold(work, final, log, WAIT_S)
    if lock is None:
        return TokenCache.open(final)
    try:  # an error, SIGINT or SIGTERM leaves the finished shards for the next build (and the lock free)
        log(f"tokenizing {source.spec} into {final} (seq_len {seq_len}, "
            f"{f'{workers} worker processes' if workers > 1 else 'in this process'})")
        return _build_into(work, final, source, tok, data_cfg, seq_len, fingerprint, key, workers, log)
    finally:
        lock.release()


def set_aside(directory: Path, damage: integrity.Damage, log, remote_root: bool = False) -> Path:
    """Moves a damaged token directory aside (``<key>.corrupt-<time>``) with one warning, so it is built
    again; where it cannot be moved (a read-only or remote cache), one DataError saying how to rebuild."""
    directory = Path(directory)
    how = (f"delete {directory} (and, for a cache in an object store, its copy there) and run again to rebuild "
           "it, or set data.cache_dir to a fresh directory")
    if remote_root:
        raise DataError(f"{damage}; the cache is in an object store: {how}") from None
    aside = directory.with_name(f"{directory.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        directory.rename(aside)
    except OSError as e:
        raise DataError(f"{damage}; it cannot be set aside ({e.strerror}): {how}") from None
    log(f"warning: {damage}; the cache was set aside as {aside.name} and is rebuilt")
    return aside


def build_share(data_cfg, seq_len: int, cache_root: str | Path, host: int, hosts: int, log=print,
                fetch=None) -> Path | None:
    """Tokenizes host `host`'s share of the cache's shards -- those whose index is `host` modulo
    `hosts`, in each split -- into the build directory, where ``build`` finds them finished: the
    multi-host build (``jaxlm.data.prepare``). Every host reads the whole corpus to cut it into the
    same shards. Returns the build's shard directory, or None when there is nothing to share: the
    cache exists, the source is pre-tokenized or the tokenizer is still to be trained (by ``build``)."""
    cache_root = Path(cache_root)
    source, tok, _, key, final = _target(data_cfg, seq_len, cache_root, log, fetch, train=False)
    if tok is None or source.pretokenized or (final / "manifest.json").exists():
        return None
    workers = _workers(data_cfg)
    shard_dir = final.parent / f".build-{key}" / "shards"
    counts = cache_shards.ShardCounts()
    t0, pool = time.time(), cache_shards.executor(workers, tok, data_cfg.get("eos", True))
    try:
        for split in sources_lib.SPLITS:
            cache_shards.tokenize_share(source.documents(split), pool, shard_dir / split, host, hosts,
                                        2 * workers + 1, counts)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    log(f"process {host} of {hosts}: tokenized {counts.tokenized} shards of its share of {source.spec} in "
        f"{time.time() - t0:.1f}s ({counts.reused} found finished)")
    return shard_dir


def _build_into(work: Path, final: Path, source, tok, data_cfg, seq_len: int, fingerprint: dict, key: str,
                workers: int, log) -> TokenCache:
    t0 = time.time()
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)  # rows are cheap to write again from the shards
    out.mkdir(parents=True)
    splits, counters, shard_counts = {}, sources_lib.Counters(), cache_shards.ShardCounts()
    pool = cache_shards.executor(workers, tok, data_cfg.get("eos", True))
    try:
        for split in sources_lib.SPLITS:
            source.counters = sources_lib.Counters()
            if source.pretokenized:  # token shards: ids checked and cut into rows, no tokenizing
                shards = source.token_chunks(split, tok.vocab_size, tok.eos_id, tok.dtype())
            else:
                shards = cache_shards.tokenized_shards(source.documents(split), tok, pool, work / "shards" / split,
                                           2 * workers + 1, shard_counts)
            splits[split] = _write_split(shards, tok, seq_len, out / f"{split}.bin", split)
            # What reading noticed, counted once per document read: without a native validation split
            # each pass reads the whole corpus, so the train pass has seen everything.
            if split == "train" or source.has_validation:
                for f in ("empty_documents", "replaced_bytes_documents", "missing_field"):
                    setattr(counters, f, getattr(counters, f) + getattr(source.counters, f))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    counters = {k: v for k, v in dataclasses.asdict(counters).items() if k != "documents"}
    if splits["train"]["documents"] == 0:
        raise DataError(f"data.source={data_cfg.source!r}: the corpus is empty or all whitespace")
    if splits["train"]["sequences"] == 0:
        raise DataError(
            f"data.source={data_cfg.source!r}: {splits['train']['tokens']} training tokens make no sequence of "
            f"train.seq_len+1={seq_len + 1} tokens; use a larger corpus or a shorter train.seq_len"
        )
    tok_lib.store(tok, out)
    manifest = {
        "format_version": FORMAT_VERSION, "key": key, "fingerprint": fingerprint, "source": source.spec,
        "seq_len": seq_len, "dtype": np.dtype(tok.dtype()).name, "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id, "tokenizer_sha256": tok.sha256, "splits": splits, "counters": counters,
        "files": integrity.records(out),  # sizes and chunk checksums: verified when opened (data/integrity.py)
    }
    if record := source.split_record():  # a tail split: what was held out (splits.describe)
        manifest["validation_split"] = record
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    cache_lock.publish(out, final)
    shutil.rmtree(work, ignore_errors=True)  # the lock file too: waiters find the manifest first
    s = splits["train"]
    if counters["replaced_bytes_documents"]:
        log(f"warning: {counters['replaced_bytes_documents']:,} documents had bytes that are not UTF-8; they were "
            "replaced by U+FFFD (the counts are in the cache's manifest.json)")
    tokens = s["tokens"] + splits["validation"]["tokens"]
    reused = f", {shard_counts.reused} reused from an interrupted build" if shard_counts.reused else ""
    dt = time.time() - t0
    log(f"cached {s['documents']:,} documents, {s['tokens']:,} tokens, {s['sequences']:,} training sequences "
        f"(+{splits['validation']['sequences']:,} validation) in {dt:.1f}s ({tokens / max(dt, 1e-9):,.0f} tokens/s; "
        f"{shard_counts.tokenized} shards tokenized{reused})")
    return TokenCache.open(final)
