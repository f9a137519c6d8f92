"""Fast checks of the pods pieces: what counts as damage, the lost-peer message's checkpoint, the
step vote's one-step delay, the distributed timeouts' validation."""

import errno

import jax
import ml_collections
import pytest

from jaxlm import checkpoint, config, preemption, sharding
from jaxlm.errors import ConfigError

from conftest import ROOT


@pytest.mark.parametrize("error, why", [
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
    (MemoryError(), "out of memory"),
    (ValueError("DEADLINE_EXCEEDED: while reading gs://b/x"), "a transient object-store error"),
    (ValueError("Error reading: truncated file"), None),
    (ValueError("Expected 4096 bytes, found 12"), None),
])
def test_not_damage_names_the_cause_through_the_exception_chain(error, why):
    try:
        try:
            raise error
        except Exception as inner:
            raise RuntimeError("restore failed") from inner
    except RuntimeError as outer:
        assert checkpoint.not_damage(outer) == why


def test_resume_hint_names_the_newest_complete_checkpoint(tmp_path):
    d = tmp_path / "checkpoints"
    assert "start again" in checkpoint.resume_hint(d)
    for name in ("0", "3", "6.orbax-checkpoint-tmp-17", "2.corrupt-100"):
        (d / name).mkdir(parents=True)
    assert checkpoint.resume_hint(d) == f"resume from the checkpoint at step 3 in {d}"


def test_the_vote_is_read_one_step_late_and_ors_each_flag():
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), devices=jax.devices()[:1])
    v = preemption.StopVote(mesh)
    assert [v.cast(False, True), v.cast(True, False), v.cast(False, False)] == [
        (False, False), (False, True), (True, False)]


def test_the_lost_peer_bound_must_stay_below_the_backstop():
    with pytest.raises(ConfigError, match="lost_after_s=40.0 must be >= 0"):
        config.validate(config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {"distributed.lost_after_s": 40.0}))


def test_the_join_bound_must_be_positive():
    with pytest.raises(ConfigError, match="distributed.init_timeout_s=0: must be a number > 0"):
        config.validate(config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {"distributed.init_timeout_s": 0}))


def test_a_signal_before_the_run_starts_is_handed_to_it(monkeypatch):
    import os
    import signal

    monkeypatch.setitem(preemption._early, "received", None)
    monkeypatch.setitem(preemption._early, "original", {})
    before = signal.getsignal(signal.SIGTERM)
    try:
        preemption.record_early()
        os.kill(os.getpid(), signal.SIGTERM)  # would end this process without record_early
        assert preemption._early["received"] == "SIGTERM"
        with preemption.Signals() as s:
            assert s.received == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) is before  # the handler record_early replaced
    finally:
        signal.signal(signal.SIGTERM, before)
