"""The tokenized cache: tokenize a corpus once into packed sequences of ``seq_len + 1`` tokens.

Layout under ``data.cache_dir`` (default ``WORKDIR/data``)::

    tokenizers/<key>/tokenizer.model     a trained tokenizer, keyed by (source, vocab settings[, kind])
                                         (tokenizer.model for SentencePiece, hf/ for a byte-level BPE)
    tokens/<key>/manifest.json           documents, tokens, sequences per split; how it was made
    tokens/<key>/tokenizer.model         the tokenizer the tokens were made with (or hf/: tokenizer.json, ...)
    tokens/<key>/{train,validation}.bin  uint16/uint32 rows of seq_len+1 tokens (random access)

A token directory's key hashes (source fingerprint, tokenizer sha256, seq_len, format version).
Documents are concatenated in corpus order, each followed by EOS, and cut into rows; the tail
shorter than a row is dropped (counted in the manifest). Rows are a flat binary that
``np.memmap`` opens in place: random access like array_record, with no per-record decoding.

Everything is written to a temporary sibling directory and renamed into place at the end, so an
interrupted build never leaves a directory a later run would use (a directory without its
manifest is never read).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from tqdm import tqdm

from jaxlm.data import sources as sources_lib
from jaxlm.data import tokenizer as tok_lib
from jaxlm.errors import DataError

FORMAT_VERSION = 1
_BATCH_DOCS = 512


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _publish(tmp: Path, final: Path) -> Path:
    """Atomically moves a finished temp directory into place (another builder may have won)."""
    try:
        os.rename(tmp, final)
    except OSError:
        if (final / "manifest.json").exists() or tok_lib.stored(final):
            shutil.rmtree(tmp, ignore_errors=True)  # same content, built concurrently
        else:
            raise
    return final


def _tmp_dir(parent: Path, name: str) -> Path:
    """A fresh temporary directory under `parent`, named after its owner (host and process id), after
    removing any earlier one whose owner on this host is gone (a build killed with SIGKILL)."""
    parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for old in parent.glob(f".tmp-*-{host}-*"):
        pid = old.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = parent / f".tmp-{name}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@dataclasses.dataclass
class TokenCache:
    """A finished token directory; ``split(name)`` is an (N, seq_len+1) read-only memmap."""

    path: Path
    manifest: dict

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

    def split(self, name: str) -> np.ndarray:
        info = self.manifest["splits"][name]
        if info["sequences"] == 0:
            return np.zeros((0, self.seq_len + 1), np.dtype(self.manifest["dtype"]))
        return np.memmap(self.path / f"{name}.bin", dtype=np.dtype(self.manifest["dtype"]), mode="r",
                         shape=(info["sequences"], self.seq_len + 1))

    @classmethod
    def open(cls, path: Path) -> "TokenCache":
        cache = cls(Path(path), json.loads((Path(path) / "manifest.json").read_text()))
        tok_lib.check_dtype(cache.manifest["vocab_size"], cache.manifest["dtype"], f"token cache {path}")
        return cache


def tokenizer_for(data_cfg, source: sources_lib.Source, cache_root: Path, log=print) -> tok_lib.AnyTokenizer:
    """The configured tokenizer: ``data.tokenizer`` if set, else one of ``data.tokenizer_kind`` trained once
    and cached."""
    if data_cfg.tokenizer:
        return tok_lib.load(data_cfg.tokenizer)
    kind = data_cfg.get("tokenizer_kind", tok_lib.DEFAULT_KIND)
    if kind not in tok_lib.TRAINERS:
        raise DataError(f"data.tokenizer_kind={kind!r}: allowed: {', '.join(tok_lib.TRAINERS)}")
    fields = {"v": FORMAT_VERSION, "source": source.fingerprint(), "vocab": data_cfg.vocab_size,
              "max_docs": data_cfg.tokenizer_max_docs, "max_chars": data_cfg.tokenizer_max_chars,
              "val_fraction": data_cfg.val_fraction}
    if kind != tok_lib.DEFAULT_KIND:  # the default stays out of the key: caches built before it keep theirs
        fields["kind"] = kind
    key = _key(fields)
    final = cache_root / "tokenizers" / key
    if spec := tok_lib.stored(final):
        return tok_lib.load(spec)
    what = "SentencePiece BPE" if kind == "sentencepiece" else "byte-level BPE"
    log(f"training a {data_cfg.vocab_size}-piece {what} tokenizer on {source.spec} "
        f"(up to {data_cfg.tokenizer_max_docs} documents)")
    t0 = time.time()
    tok = tok_lib.TRAINERS[kind](source.documents("train"), data_cfg.vocab_size,
                                 max_docs=data_cfg.tokenizer_max_docs, max_chars=data_cfg.tokenizer_max_chars)
    tmp = _tmp_dir(final.parent, key)
    try:
        tok_lib.store(tok, tmp)
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    spec = tok_lib.stored(final)
    log(f"tokenizer trained in {time.time() - t0:.1f}s -> {tok_lib.spec_path(spec)}")
    return tok_lib.load(spec)


def _write_split(docs, tok: tok_lib.Tokenizer, seq_len: int, out: Path, desc: str) -> dict:
    row = seq_len + 1
    dtype = tok.dtype()
    pending = np.zeros(0, dtype)
    n_docs = n_tokens = n_rows = 0
    counts = np.zeros(tok.vocab_size, np.int64)
    bar = tqdm(desc=desc, unit=" docs", file=sys.stderr, mininterval=1.0, disable=None)
    with open(out, "wb") as f:
        batch: list[str] = []

        def flush():
            nonlocal pending, n_docs, n_tokens, n_rows
            if not batch:
                return
            ids = tok.encode(batch)
            flat = np.concatenate([np.asarray(d + [tok.eos_id], dtype) for d in ids])
            counts[:] += np.bincount(flat, minlength=tok.vocab_size)
            n_docs += len(batch)
            n_tokens += flat.size
            pending = np.concatenate([pending, flat])
            full = pending.size // row
            if full:
                f.write(pending[: full * row].tobytes())
                n_rows += full
                pending = pending[full * row:]
            bar.update(len(batch))
            bar.set_postfix(tokens=f"{n_tokens:,}")
            batch.clear()

        for doc in docs:
            batch.append(doc)
            if len(batch) >= _BATCH_DOCS:
                flush()
        flush()
    bar.close()
    p = counts[counts > 0] / max(counts.sum(), 1)
    return {"documents": n_docs, "tokens": n_tokens, "sequences": n_rows,
            "dropped_tail_tokens": int(pending.size), "vocab_used": int((counts > 0).sum()),
            # the loss (nats/token) of the best context-free model: training must go well below it
            "unigram_entropy": round(float(-(p * np.log(p)).sum()), 6)}


def build(data_cfg, seq_len: int, cache_root: str | Path, log=print) -> TokenCache:
    """The token cache for this data config and seq_len: found if built before, else built now."""
    cache_root = Path(cache_root)
    source = sources_lib.open_source(data_cfg)
    tok = tokenizer_for(data_cfg, source, cache_root, log)
    tok_lib.check_dtype(tok.vocab_size, tok.dtype(), f"data.tokenizer={data_cfg.tokenizer or '<trained>'!r}")
    fingerprint = {"v": FORMAT_VERSION, "source": source.fingerprint(), "tokenizer": tok.sha256,
                   "seq_len": seq_len, "val_fraction": data_cfg.val_fraction, "max_docs": data_cfg.max_docs,
                   "has_validation": source.has_validation}
    key = _key(fingerprint)
    final = cache_root / "tokens" / key
    if (final / "manifest.json").exists():
        return TokenCache.open(final)

    log(f"tokenizing {source.spec} into {final} (seq_len {seq_len})")
    tmp = _tmp_dir(final.parent, key)
    try:  # whatever stops the build (an error, SIGINT, SIGTERM) removes its temporary directory
        return _build_into(tmp, final, source, tok, data_cfg, seq_len, fingerprint, key, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_into(tmp: Path, final: Path, source, tok, data_cfg, seq_len: int, fingerprint: dict, key: str,
                log) -> TokenCache:
    t0 = time.time()
    splits, counters = {}, sources_lib.Counters()
    for split in sources_lib.SPLITS:
        source.counters = sources_lib.Counters()
        splits[split] = _write_split(source.documents(split), tok, seq_len, tmp / f"{split}.bin", split)
        # What reading noticed, counted once per document read: without a native validation split
        # each pass reads the whole corpus, so the train pass has seen everything.
        if split == "train" or source.has_validation:
            for f in ("empty_documents", "replaced_bytes_documents", "missing_field"):
                setattr(counters, f, getattr(counters, f) + getattr(source.counters, f))
    counters = {k: v for k, v in dataclasses.asdict(counters).items() if k != "documents"}
    if splits["train"]["documents"] == 0:
        raise DataError(f"data.source={data_cfg.source!r}: the corpus is empty or all whitespace")
    if splits["train"]["sequences"] == 0:
        raise DataError(
            f"data.source={data_cfg.source!r}: {splits['train']['tokens']} training tokens make no sequence of "
            f"train.seq_len+1={seq_len + 1} tokens; use a larger corpus or a shorter train.seq_len"
        )
    tok_lib.store(tok, tmp)
    manifest = {
        "format_version": FORMAT_VERSION, "key": key, "fingerprint": fingerprint, "source": source.spec,
        "seq_len": seq_len, "dtype": np.dtype(tok.dtype()).name, "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id, "tokenizer_sha256": tok.sha256, "splits": splits, "counters": counters,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    _publish(tmp, final)
    s = splits["train"]
    if counters["replaced_bytes_documents"]:
        log(f"warning: {counters['replaced_bytes_documents']:,} documents had bytes that are not UTF-8; they were "
            "replaced by U+FFFD (the counts are in the cache's manifest.json)")
    log(f"cached {s['documents']:,} documents, {s['tokens']:,} tokens, {s['sequences']:,} training sequences "
        f"(+{splits['validation']['sequences']:,} validation) in {time.time() - t0:.1f}s")
    return TokenCache.open(final)
