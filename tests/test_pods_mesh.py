"""Resume on another mesh: FSDP=4 -> DP=2 x TP=2, and 1 process -> 2 processes -> 1 process. The state is
resharded on restore and checked bit for bit against the fingerprints saved with it (optimizer state,
loss scale, step, RNG); the loader resumes at the same batch; later losses stay within 1e-6 (relative)
of the uninterrupted run (only the order of the sums changes). A changed global batch or sequence
length is refused in one error line."""

import json
from pathlib import Path

import pytest

from conftest import write_word_corpus
from helpers import pods

pytestmark = pytest.mark.slow  # jaxlm.main subprocesses on 4 simulated devices

STEPS = 12
MESH_FSDP = ["--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=1"]
MESH_DP_TP = ["--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.tensor=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("meshcorpus"), 30)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("meshcache")


def _train(tmp, workdir, corpus, cache, n_proc, extra=(), fault=None, tag="run", ok=True):
    job = pods.Job(pods.tiny_args(workdir, corpus, cache, STEPS, extra), n_proc, 4, tmp / f"logs-{tag}", fault=fault)
    codes = job.wait(600)
    if ok:
        assert codes == [0] * n_proc, (tag, codes, job.out(0)[-3000:])
    return job


def _records(workdir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (Path(workdir) / "metrics.jsonl").read_text().splitlines())
            if "train/step_losses" in r}


def _data_state(workdir, step):
    import orbax.checkpoint as ocp

    from jaxlm import checkpoint

    reader = checkpoint._reader(workdir)
    try:
        return reader.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    finally:
        reader.manager.close()


def _assert_same_curve(got, want, first_changed):
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
    for s in range(1, first_changed):
        assert got[s]["train/step_losses"] == want[s]["train/step_losses"], s
    for s in range(first_changed, STEPS + 1):
        a, b = got[s]["train/step_losses"][-1], want[s]["train/step_losses"][-1]
        assert abs(a - b) <= 1e-6 * abs(b), (s, a, b)
        assert got[s]["perf/tokens_per_s"] > 0 and got[s]["train/loss_scale"] == want[s]["train/loss_scale"], s


def test_fsdp4_to_dp2_tp2_resumes_on_the_same_curve(corpus, cache, tmp_path):
    ref, work = tmp_path / "ref", tmp_path / "w"
    _train(tmp_path, ref, corpus, cache, 1, MESH_FSDP, tag="ref")
    _train(tmp_path, work, corpus, cache, 1, MESH_FSDP, fault="step=5:0:SIGTERM", tag="first")
    job = _train(tmp_path, work, corpus, cache, 1, MESH_DP_TP, tag="second")
    out = job.out(0)
    assert "resumed from the checkpoint at step 5" in out and "the mesh changed: saved on {'data': 1, 'fsdp': 4" in out
    assert "now {'data': 2, 'fsdp': 1, 'tensor': 2} over 1" in out, out[-2000:]
    _assert_same_curve(_records(work), _records(ref), 6)
    assert _data_state(work, STEPS) == _data_state(ref, STEPS)  # the data position, exactly

    job = _train(tmp_path, work, corpus, cache, 1, [*MESH_DP_TP, "--config.train.batch_size=16",
                                                    "--config.train.seq_len=16"], tag="refused", ok=False)
    errors = [x for x in job.out(0).splitlines() if x.startswith("error:")]
    assert job.procs[0].returncode == 1 and len(errors) == 1, job.out(0)[-2000:]
    assert "train.batch_size: 8 -> 16" in errors[0] and "train.seq_len: 32 -> 16" in errors[0], errors
    assert "allow_config_change" in errors[0]


def test_one_process_to_two_and_back_resumes_on_the_same_curve(corpus, cache, tmp_path):
    ref, work = tmp_path / "ref", tmp_path / "w"
    _train(tmp_path, ref, corpus, cache, 1, tag="ref")
    _train(tmp_path, work, corpus, cache, 1, fault="step=4:0:SIGTERM", tag="one")
    job = _train(tmp_path, work, corpus, cache, 2, fault="step=7:1:SIGTERM", tag="two")
    assert "the mesh changed: saved on {'data': 4, 'fsdp': 1, 'tensor': 1} over 1 process(es), now {'data': 4, " \
           "'fsdp': 1, 'tensor': 1} over 2" in job.out(0), job.out(0)[-2000:]
    stop = int(job.out(0).split("checkpoint for step ")[1].split()[0])
    job = _train(tmp_path, work, corpus, cache, 1, tag="back")
    assert f"resumed from the checkpoint at step {stop}" in job.out(0) and "over 2 process(es), now" in job.out(0)
    _assert_same_curve(_records(work), _records(ref), 5)
    assert _data_state(work, STEPS) == _data_state(ref, STEPS)
