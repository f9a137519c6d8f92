"""Token rows read from an object store by byte ranges: a cache larger than the host's disk.

``RemoteRows(url, dtype, shape)`` stands for the ``(N, seq_len + 1)`` memmap of a token file that
stays in the bucket. ``take_rows(indices)`` reads a batch's rows in one concurrent request set
(fsspec's ``cat_ranges``: each row one ranged GET, all in flight together), which is how the
shuffled training loader reads; ``rows[i]`` reads row ``i`` through a read-ahead buffer of
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
ROW_FILES = ("train.bin", "validation.bin")  # what is left in the store when streaming
MARK = ".remote-url"  # in a streamed cache directory: the URL its rows are read from


class RemoteRows:
    def __init__(self, url: str, dtype, shape: tuple[int, int]):
        self.url, self.dtype, self.shape = url, np.dtype(dtype), tuple(shape)
        self.fs, self.path = fsspec.core.url_to_fs(url)
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
        """Rows `indices` as one (len(indices), row) array: one ranged read each, concurrently."""
        idx = [int(i) for i in indices]
        if not idx:
            return np.zeros((0, self.shape[1]), self.dtype)
        starts = [i * self.row_bytes for i in idx]
        data = self.fs.cat_ranges([self.path] * len(idx), starts, [s + self.row_bytes for s in starts])
        return np.frombuffer(b"".join(data), self.dtype).reshape(len(idx), self.shape[1])
