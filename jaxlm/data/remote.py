"""Token rows read from an object store by byte ranges: a cache larger than the host's disk.

``RemoteRows(url, dtype, shape)`` stands for the ``(N, seq_len + 1)`` memmap of a token file that
stays in the bucket. ``take_rows(indices)`` reads a batch's rows in one concurrent request set
(fsspec's ``cat_ranges``: the rows sorted, those within ``MERGE_GAP`` bytes of each other merged into
one ranged GET, all in flight together), which is how the shuffled training loader reads;
``rows[i]`` reads row ``i`` through a read-ahead buffer of
``BLOCK`` bytes (the next blocks are fetched while the current one is read), which is how the
in-order validation pass reads. Nothing is written to the local disk.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading

import fsspec
import numpy as np

BLOCK = 8 << 20  # read-ahead unit for in-order reads
AHEAD = 2  # blocks fetched ahead of the one being read
# Rows of a batch closer than this are read as one range: on an object store a request's fixed cost
# (latency, and the client's per-request work) outweighs reading up to this many bytes more.
MERGE_GAP = 256 << 10
ROW_FILES = ("train.bin", "validation.bin")  # what is left in the store when streaming
MARK = ".remote-url"  # in a streamed cache directory: the URL its rows are read from


class RemoteRows:
    def __init__(self, url: str, dtype, shape: tuple[int, int]):
        self.url, self.dtype, self.shape = url, np.dtype(dtype), tuple(shape)
        self.fs, self.path = fsspec.core.url_to_fs(url)
        _keep_bucket_layout(self.fs, self.path)
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        self._blocks: collections.OrderedDict[int, concurrent.futures.Future] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(AHEAD + 1)

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self):  # (to other processes) connections and threads are made there
        return {"url": self.url, "dtype": self.dtype.str, "shape": self.shape}

    def __setstate__(self, state):
        self.__init__(state["url"], state["dtype"], state["shape"])

    def _read(self, start: int, end: int) -> bytes:
        return self.fs.cat_file(self.path, start=start, end=end)

    def _block(self, b: int) -> bytes:
        size = self.shape[0] * self.row_bytes
        with self._lock:
            for k in range(b, b + AHEAD + 1):  # this block and the next ones, in flight
                if k * BLOCK < size and k not in self._blocks:
                    self._blocks[k] = self._pool.submit(self._read, k * BLOCK, min((k + 1) * BLOCK, size))
            while len(self._blocks) > 2 * (AHEAD + 1):
                self._blocks.popitem(last=False)
            fut = self._blocks[b]
        return fut.result()

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take_rows(np.arange(*i.indices(len(self))))
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(i)
        start, end = i * self.row_bytes, (i + 1) * self.row_bytes
        out = b"".join(self._block(b)[max(start - b * BLOCK, 0): end - b * BLOCK]
                       for b in range(start // BLOCK, (end - 1) // BLOCK + 1))
        return np.frombuffer(out, self.dtype)

    def take_rows(self, indices) -> np.ndarray:
        """Rows `indices` as one (len(indices), row) array. The rows are sorted and those less than
        MERGE_GAP bytes apart read as one range (a longer read costs less than one more request), all
        ranges concurrently (fsspec's ``cat_ranges``); then put back in the order asked for."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if not idx.size:
            return np.zeros((0, self.shape[1]), self.dtype)
        rows, where = np.unique(idx, return_inverse=True)
        gap_rows = max(MERGE_GAP // self.row_bytes, 0)
        # a new range starts where the next wanted row is more than gap_rows rows past the last one
        cut = np.flatnonzero(np.diff(rows) > gap_rows + 1) + 1
        firsts = rows[np.r_[0, cut]]
        lasts = rows[np.r_[cut - 1, rows.size - 1]]
        data = self.fs.cat_ranges([self.path] * firsts.size, (firsts * self.row_bytes).tolist(),
                                  ((lasts + 1) * self.row_bytes).tolist(), on_error="raise")
        out = np.empty((rows.size, self.shape[1]), self.dtype)
        start = 0
        for first, last, blob in zip(firsts, lasts, data):
            span = np.frombuffer(blob, self.dtype).reshape(-1, self.shape[1])
            end = np.searchsorted(rows, last, side="right")
            out[start:end] = span[rows[start:end] - first]
            start = end
        return out[where]


def _keep_bucket_layout(fs, path: str) -> None:
    """gcsfs's extended file system (the default since 2026) looks the bucket's layout up through the
    storage-control API before every read, and keeps no answer it could not get (credentials without
    that permission, an emulator): then each ranged read costs one more failed lookup (on the local
    emulator 5 of its 6 ms). The first lookup's answer is kept, so reads take the path gcsfs itself
    falls back to; other file systems and other gcsfs versions are left as they are."""
    layouts, lookup = getattr(fs, "_storage_layout_cache", None), getattr(fs, "_sync_lookup_bucket_type", None)
    if not isinstance(layouts, dict) or lookup is None:
        return
    bucket = path.split("/", 1)[0]
    if bucket not in layouts:
        try:
            layouts[bucket] = lookup(bucket)
        except Exception:  # the lookup is an optimisation of gcsfs's; reads work without it
            return
