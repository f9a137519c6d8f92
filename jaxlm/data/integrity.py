"""A token cache is verified like a checkpoint: its manifest records every file's size and a checksum
of each fixed-size chunk (xxHash's XXH3-128, at memory speed), written when the cache is built.

Checked when a cache is opened: every file's size at once, the tokenizer's files at once (small), and
the rows' chunks at once for a cache of up to ``OPEN_BOUND`` bytes; a larger one is verified a chunk at
a time before its rows are first read (``VerifiedRows``), so a 10B-token cache opens without reading it
all. Each chunk's token ids are checked against the vocabulary as it is verified. A cache built before
the manifest recorded its files is not verified (``records`` is None).

A damaged file raises :class:`Damage` (a DataError naming the file and the chunk): ``jaxlm.data.cache``
sets the directory aside and rebuilds it, or says how to.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import xxhash

from jaxlm.errors import DataError

CHUNK_BYTES = 16 << 20  # a multiple of every row dtype's size
OPEN_BOUND = 1 << 30  # caches up to this many bytes of rows are verified whole when opened (PERFORMANCE.md)
ROW_FILES = ("train.bin", "validation.bin")


class Damage(DataError):
    """A cache file that is not what its manifest recorded (`where`: the file, and the chunk if known)."""

    def __init__(self, message: str, where: Path):
        super().__init__(message)
        self.where = where


def _digest(data) -> str:
    return xxhash.xxh3_128(data).hexdigest()


def record(path: Path) -> dict:
    """{size, chunk_bytes, xxh3_128: [per-chunk hex digests]} of one file."""
    digests, size = [], 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digests.append(_digest(chunk))
            size += len(chunk)
    return {"size": size, "chunk_bytes": CHUNK_BYTES, "xxh3_128": digests}


def records(directory: Path) -> dict[str, dict]:
    """The records of a finished cache directory's files (rows, tokenizer), by path relative to it."""
    directory = Path(directory)
    out = {}
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "manifest.json"):
        out[f.relative_to(directory).as_posix()] = record(f)
    return out


def check_sizes(directory: Path, recorded: dict[str, dict]) -> None:
    """Every recorded file exists with its recorded size (a truncated or missing file)."""
    for name, r in recorded.items():
        path = Path(directory) / name
        size = path.stat().st_size if path.is_file() else None
        if size != r["size"]:
            found = "missing" if size is None else f"{size:,} bytes"
            raise Damage(f"token cache file {path}: {found}, the manifest recorded {r['size']:,} bytes", path)


def check_file(path: Path, r: dict, vocab_size: int | None = None, dtype=None, chunks=None) -> None:
    """The chunks of `path` (all, or the indices `chunks`) against its record; with `vocab_size`, every
    token id of them (read as `dtype`) below it."""
    n = len(r["xxh3_128"])
    with open(path, "rb") as f:
        for i in (range(n) if chunks is None else chunks):
            f.seek(i * r["chunk_bytes"])
            data = f.read(r["chunk_bytes"])
            if _digest(data) != r["xxh3_128"][i]:
                raise Damage(f"token cache file {path}: chunk {i} of {n} (bytes {i * r['chunk_bytes']:,}+) does not "
                             "match its checksum", path)
            if vocab_size is not None and data:
                top = int(np.frombuffer(data, dtype).max())
                if top >= vocab_size:
                    raise Damage(f"token cache file {path}: chunk {i} of {n} holds token id {top}, beyond the "
                                 f"vocabulary of {vocab_size}", path)


class VerifiedRows:
    """A split's memory-mapped rows whose chunks are verified before their rows are first read (a large
    cache); ``np.asarray`` verifies them all. Thread-safe: the loader reads from several threads."""

    def __init__(self, rows: np.memmap, path: Path, r: dict, vocab_size: int, on_damage=None):
        self.rows, self.path, self.record, self.vocab_size = rows, Path(path), r, vocab_size
        self.on_damage = on_damage  # called with the Damage (it may raise another error instead)
        self.shape, self.dtype = rows.shape, rows.dtype
        self._row_bytes = rows.shape[1] * rows.dtype.itemsize
        self._done: set[int] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.rows)

    def _verify_rows(self, first: int, last: int) -> None:
        cb = self.record["chunk_bytes"]
        todo = [c for c in range(first * self._row_bytes // cb, ((last + 1) * self._row_bytes - 1) // cb + 1)
                if c not in self._done]
        if todo:
            with self._lock:
                todo = [c for c in todo if c not in self._done]
                try:
                    check_file(self.path, self.record, self.vocab_size, self.dtype, todo)
                except Damage as e:
                    if self.on_damage is not None:
                        self.on_damage(e)
                    raise
                self._done.update(todo)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            i = int(index) % len(self.rows)
            self._verify_rows(i, i)
        elif isinstance(index, slice):
            idx = range(*index.indices(len(self.rows)))
            if len(idx):
                self._verify_rows(min(idx[0], idx[-1]), max(idx[0], idx[-1]))
        else:
            for i in np.unique(np.asarray(index) % len(self.rows)):
                self._verify_rows(int(i), int(i))
        return self.rows[index]

    def __array__(self, dtype=None, copy=None):
        self._verify_rows(0, len(self.rows) - 1)
        return np.asarray(self.rows, dtype=dtype)
