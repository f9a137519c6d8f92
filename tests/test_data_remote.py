"""RemoteRows.take_rows: a batch's rows read as sorted, merged byte ranges give exactly the rows asked
for, in the order asked for, with one request per group of nearby rows (fsspec's in-memory store)."""

import fsspec
import numpy as np
import pytest

from jaxlm.data import remote

N, ROW = 3000, 9


@pytest.fixture
def stored(monkeypatch):
    fs = fsspec.filesystem("memory")
    rows = np.random.default_rng(0).integers(0, 60000, (N, ROW)).astype(np.uint16)
    fs.pipe("/take/train.bin", rows.tobytes())
    far = remote.RemoteRows("memory:///take/train.bin", "uint16", rows.shape)
    requests = []
    real = far.fs.cat_ranges

    def counted(paths, starts, ends, **kw):
        requests.append(len(starts))
        return real(paths, starts, ends, **kw)

    monkeypatch.setattr(far.fs, "cat_ranges", counted)
    yield rows, far, requests
    fs.rm("/take", recursive=True)


@pytest.mark.parametrize("gap_rows", [0, 3, 10_000])
def test_take_rows_gives_the_rows_asked_for_in_their_order(stored, monkeypatch, gap_rows):
    rows, far, _ = stored
    monkeypatch.setattr(remote, "MERGE_GAP", gap_rows * ROW * 2)
    rng = np.random.default_rng(gap_rows)
    for n in (1, 7, 32, 500, N):
        idx = rng.integers(0, N, n)  # repeats included
        np.testing.assert_array_equal(far.take_rows(idx), rows[idx])
    np.testing.assert_array_equal(far.take_rows(np.arange(N)[::-1]), rows[::-1])
    assert far.take_rows([]).shape == (0, ROW)


def test_nearby_rows_share_one_request(stored, monkeypatch):
    rows, far, requests = stored
    monkeypatch.setattr(remote, "MERGE_GAP", 2 * ROW * 2)  # at most 2 unwanted rows between two: one range
    idx = [100, 7, 102, 5, 2000, 104, 9, 2003, 2007]
    np.testing.assert_array_equal(far.take_rows(idx), rows[idx])
    assert requests == [4]  # {5, 7, 9}, {100, 102, 104}, {2000, 2003}, {2007}: 3 rows between 2003 and it


class _LayoutFS:
    """Stands for gcsfs's extended file system: a layout cache that keeps nothing by itself."""

    def __init__(self, answer):
        self._storage_layout_cache, self.calls, self.answer = {}, [], answer

    def _sync_lookup_bucket_type(self, bucket):
        self.calls.append(bucket)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_the_bucket_layout_is_looked_up_once_per_bucket():
    fs = _LayoutFS("UNKNOWN")
    for path in ("bkt/tokens/train.bin", "bkt/tokens/validation.bin", "other/x.bin"):
        remote._keep_bucket_layout(fs, path)
    assert fs.calls == ["bkt", "other"] and fs._storage_layout_cache == {"bkt": "UNKNOWN", "other": "UNKNOWN"}
    failing = _LayoutFS(RuntimeError("no storage-control API here"))
    remote._keep_bucket_layout(failing, "bkt/t.bin")  # reads go on without it
    assert failing._storage_layout_cache == {}
    remote._keep_bucket_layout(fsspec.filesystem("memory"), "bkt/t.bin")  # not gcsfs: nothing to do
