"""Restore errors: damage sets a checkpoint aside, anything else (permission, memory, a transient
object-store error) keeps it and stops with one error; eval's params-only restore."""

import errno

import jax
import numpy as np
import pytest

from jaxlm import checkpoint, saved_run, train
from jaxlm.errors import CheckpointError

from conftest import train_tiny_run

pytestmark = pytest.mark.slow  # trains a tiny run in-process


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("restore"))  # checkpoints at steps 0, 1, 2


def _checkpointer(run_dir):
    cfg, trainer, _, meta, _ = saved_run.load_run(run_dir, params_only=True)
    return checkpoint.Checkpointer(run_dir, cfg, abstract_state=train.abstract_state(trainer), meta=meta), meta


class HttpError(Exception):  # as gcsfs raises them: a status code attribute
    def __init__(self, code):
        super().__init__(f"{code} from the object store")
        self.code = code


NOT_DAMAGE = [PermissionError(errno.EACCES, "Permission denied"), MemoryError("could not allocate"),
              TimeoutError("read timed out"), ValueError("TensorStore: UNAVAILABLE: connection reset"),
              RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2.0GiB"), HttpError(503)]


@pytest.mark.parametrize("error", NOT_DAMAGE, ids=lambda e: type(e).__name__)
def test_a_failed_read_that_is_not_damage_keeps_the_checkpoint(run_dir, monkeypatch, error):
    ckpt, meta = _checkpointer(run_dir)
    try:
        def failing(step):
            raise RuntimeError("restore failed") from error
        monkeypatch.setattr(ckpt, "restore", failing)
        with pytest.raises(CheckpointError, match="not damage, so it is kept") as e:
            ckpt.restore_latest(current_config=meta["config"])
        assert "\n" not in str(e.value) and str(run_dir / "checkpoints" / "2") in str(e.value)
        assert checkpoint.saved_steps(run_dir) == [0, 1, 2] and not list((run_dir / "checkpoints").glob("*.corrupt-*"))
    finally:
        ckpt.close()


def test_damage_is_still_set_aside(tmp_path, run_dir, monkeypatch):
    import shutil

    work = tmp_path / "copy"
    shutil.copytree(run_dir, work)
    ckpt, meta = _checkpointer(work)
    real = ckpt.restore
    monkeypatch.setattr(ckpt, "restore", lambda step: (_ for _ in ()).throw(
        ValueError("Error reading: truncated file")) if step == 2 else real(step))
    try:
        with pytest.warns(UserWarning, match="cannot be restored"):
            _, _, _, step = ckpt.restore_latest(current_config=meta["config"])
        assert step == 1 and len(list((work / "checkpoints").glob("2.corrupt-*"))) == 1
    finally:
        ckpt.close()


def test_params_only_restore_reads_the_same_parameters(run_dir):
    _, trainer, full, _, step = saved_run.load_run(run_dir)
    _, _, only, _, step2 = saved_run.load_run(run_dir, params_only=True)
    assert step == step2 == 2 and only.opt_state is None
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(only.params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    p1 = saved_run.load_params(run_dir, 1, trainer)
    _, _, s1, _, _ = saved_run.load_run(run_dir, 1)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(p1), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(CheckpointError, match="choose another --step"):
        saved_run.load_params(run_dir, 7, trainer)
