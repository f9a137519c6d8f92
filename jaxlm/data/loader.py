"""The input loader on grain: a global shuffle, per-host shards, batches, prefetch, exact resume.

Global row order: ``MapDataset.source(rows).shuffle(data_seed).repeat()`` -- a full permutation of
the rows, a new one per epoch (grain folds the epoch into the seed). Global batch ``k`` is rows
``[k*B, (k+1)*B)`` of that order; host ``h`` of ``P`` reads only its contiguous block
``[k*B + h*B/P, k*B + (h+1)*B/P)`` of it from the memory-mapped cache. The hosts' blocks are
disjoint, and ``jax.make_array_from_process_local_data`` puts them back in exactly the order one
process would have read, so a multi-host run sees the same global batches as a single host.

The state is grain's ``{"next_index": k}`` (batches consumed) plus the epoch, for humans;
restoring it makes the next batch the one an uninterrupted run would have seen, because every
batch is a pure function of (seed, k). Validation iterates the rows in order, once, no shuffle.
A mixture gives its own global order (``order``: its schedule over its components' rows;
``jaxlm.data.mixture``), cut into batches and host blocks the same way.
"""

from __future__ import annotations

import collections
from typing import Iterator

import grain
import jax
import numpy as np

from jaxlm.errors import DataError

REMOTE_BATCHES_IN_FLIGHT = 8  # batches read concurrently from an object store (remote.RemoteRows.take_rows)


class Loader:
    """Iterator over host-local int32 batches of shape (global_batch / process_count, seq_len + 1)."""

    def __init__(
        self,
        rows: np.ndarray,
        *,
        global_batch: int,
        seed: int = 0,
        shuffle: bool = True,
        repeat: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
        prefetch: int = 2,
        threads: int = 2,
        split: str = "train",
        order: grain.MapDataset | None = None,
    ):
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch % self.process_count:
            raise DataError(f"train.batch_size={global_batch} is not divisible by the "
                            f"{self.process_count} processes; each host loads an equal share")
        if len(rows) < global_batch:
            raise DataError(
                f"the {split} split has {len(rows)} sequences, fewer than one batch of {global_batch}; "
                "use a larger corpus (data.source), a smaller train.batch_size or a shorter train.seq_len"
            )
        self.rows, self.global_batch, self.seed = rows, global_batch, seed
        self.host_batch = global_batch // self.process_count
        # Rows in an object store (remote.RemoteRows) are ordered as indices, then read a batch at a
        # time with concurrent ranged reads: the same permutation (grain's shuffle depends on the
        # length and the seed only), so the same batches as from a local copy.
        by_index = order is None and hasattr(rows, "take_rows")
        if order is not None:  # the global row order given (a mixture's schedule)
            ds = order
        else:
            ds = grain.MapDataset.source(range(len(rows)) if by_index else rows)
            if shuffle:
                ds = ds.shuffle(seed=seed)
            if repeat:
                ds = ds.repeat()
        ds = grain.MapDataset.source(_HostBlock(ds, self.process_index, self.host_batch, global_batch))
        batch_fn = (lambda idx: rows.take_rows(idx).astype(np.int32)) if by_index else _stack_int32
        ds = ds.batch(self.host_batch, drop_remainder=True, batch_fn=batch_fn)
        self.dataset = ds
        if by_index:  # batches from the store: many in flight, to hide each request's latency
            threads, prefetch = max(threads, REMOTE_BATCHES_IN_FLIGHT), max(prefetch, REMOTE_BATCHES_IN_FLIGHT)
        self._iter = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(prefetch, 1))
        ).__iter__()

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        return next(self._iter)

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, k: int) -> np.ndarray:
        """Batch k directly (random access), without moving the iterator."""
        return self.dataset[k]

    def close(self) -> None:
        """Stops the read-ahead threads (before the store they read from goes away, say)."""
        if hasattr(self._iter, "close"):
            self._iter.close()

    def get_state(self) -> dict:
        k = self._iter.get_state()["next_index"]
        return {"next_index": int(k), "epoch": int(k * self.global_batch // len(self.rows))}

    def set_state(self, state: dict) -> None:
        self._iter.set_state({"next_index": int(state["next_index"])})


class _HostBlock:
    """Random access to this host's rows: its block of every global batch of `ordered`."""

    def __init__(self, ordered, host: int, host_batch: int, global_batch: int):
        self.ordered, self.host, self.hb, self.gb = ordered, host, host_batch, global_batch

    def __len__(self) -> int:
        return len(self.ordered) // self.gb * self.hb

    def __getitem__(self, i: int):
        k, j = divmod(i, self.hb)
        return self.ordered[k * self.gb + self.host * self.hb + j]


def _stack_int32(rows) -> np.ndarray:
    return np.stack(rows).astype(np.int32)


def to_global(batch: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """This host's rows -> one globally sharded jax.Array of the whole batch."""
    return jax.make_array_from_process_local_data(sharding, batch)


def device_prefetch(batches: Iterator[np.ndarray], sharding: jax.sharding.Sharding, size: int = 2):
    """Keeps `size` global batches in flight to the devices (transfers are asynchronous)."""
    queue: collections.deque = collections.deque()
    for b in batches:
        queue.append(to_global(b, sharding))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
