"""metrics.jsonl never blocks a resume (jaxlm/metrics_file.py): lines that are not JSON records with an
integer step are skipped with one warning that counts them, the file is rewritten clean; a missing file
is started again with a warning that the history before the checkpoint is gone. Every reader of the
file (the resume, reports, budget replays) goes through the one read_metrics."""

import json
import shutil
from pathlib import Path

import pytest
from test_gcs import BUCKET, gcs  # noqa: F401 (the GCS emulator fixture)

from jaxlm import config, metrics_file, paths, telemetry
from jaxlm import run as run_lib
from jaxlm.ablate import grid

from conftest import ROOT, write_word_corpus

GOOD = [{"step": s, telemetry.LOSS: 1.0 / s} for s in (1, 2, 3, 4)]
BAD = {  # each kind of line that is not a record, as bytes
    "invalid_utf8": b'{"step": 2, "note": "caf\xe9"}',
    "step_not_an_integer": b'{"step": "x"}',
    "not_an_object": b"[1, 2]",
    "step_a_bool": b'{"step": true}',
    "no_step": b'{"train/loss": 1.0}',
    "torn": b'{"step": 5, "tr',
}


def _write(path: Path, bad: list[bytes]) -> None:
    lines = [json.dumps(r).encode() for r in GOOD]
    for i, b in enumerate(bad):  # between the records
        lines.insert(1 + 2 * i, b)
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_read_metrics_skips_and_counts_every_line_that_is_not_a_record(tmp_path):
    f = tmp_path / "metrics.jsonl"
    _write(f, list(BAD.values()))
    records, bad = telemetry.read_metrics(f)
    assert records == GOOD and bad == len(BAD)


def test_resume_rewrites_the_file_clean_with_one_warning(tmp_path):
    f = tmp_path / "metrics.jsonl"
    _write(f, list(BAD.values()))
    warnings = metrics_file.resume(f, f, 3)
    assert len(warnings) == 1 and warnings[0].startswith("warning:") and f"skipped {len(BAD)} line(s)" in warnings[0]
    assert telemetry.read_metrics(f) == (GOOD[:3], 0)
    assert metrics_file.resume(f, f, 3) == []  # clean now


def test_a_missing_file_on_resume_warns_that_the_history_is_gone(tmp_path):
    f = tmp_path / "metrics.jsonl"
    (warning,) = metrics_file.resume(f, f, 9)
    assert warning.startswith("warning:") and "missing" in warning and "history before step 9 is gone" in warning
    assert metrics_file.resume(f, f, 0) == []  # a new run: nothing to say


def test_on_gs_the_local_copy_is_rewritten_clean(gcs, tmp_path):  # noqa: F811
    url = paths.path(f"gs://{BUCKET}/metrics-unit/metrics.jsonl")
    local = tmp_path / "mirror" / "metrics.jsonl"
    _write(tmp_path / "src", [BAD["invalid_utf8"], BAD["step_not_an_integer"]])
    url.write_bytes((tmp_path / "src").read_bytes())
    (warning,) = metrics_file.resume(url, local, 4)
    assert "skipped 2 line(s)" in warning and telemetry.read_metrics(local) == (GOOD, 0)
    url.unlink()
    (warning,) = metrics_file.resume(url, local, 4)
    assert "history before step 4 is gone" in warning and local.read_bytes() == b""


def test_reports_and_replays_read_past_bad_lines(tmp_path):
    f = tmp_path / "metrics.jsonl"
    recs = [{"step": 2, telemetry.LOSS: 2.0, telemetry.STEP_FRACTIONS: [0.25, 0.5]},
            {"step": 4, telemetry.LOSS: "nan", telemetry.STEP_FRACTIONS: [0.75, 1.0]}]
    f.write_bytes(b"\n".join([json.dumps(recs[0]).encode(), BAD["invalid_utf8"], BAD["not_an_object"],
                              json.dumps(recs[1]).encode(), BAD["step_not_an_integer"]]) + b"\n")
    (tmp_path / "done.json").write_text(json.dumps({"step": 4}))
    assert run_lib.replay_fractions(tmp_path) == [0.25, 0.5, 0.75, 1.0]
    assert grid.outcome(tmp_path) == "diverged (non-finite training loss at step 4)"


# --- resumes ----------------------------------------------------------------------------------------

def _cfg(corpus, cache, **over):
    o = {"data.source": f"files:{corpus}/*.txt", "data.vocab_size": 300, "data.cache_dir": str(cache),
         "data.val_fraction": 0.0, "train.steps": 12, "train.batch_size": 8, "train.seq_len": 32,
         "model.n_positions": 32, "optim.schedule": "constant", "optim.warmup_steps": 2, "log.every": 1,
         "log.stats_every": 0, "log.wandb_mode": "disabled", "log.tensorboard": False, "train.eval_every": 0,
         "checkpoint.stages": ((3, 1000),), "checkpoint.latest_every_minutes": 0.0}
    o.update(over)
    return config.load(ROOT / "jaxlm" / "configs" / "tiny.py", o)


def _losses(workdir) -> dict[int, list[float]]:
    records, bad = telemetry.read_metrics(Path(workdir) / "metrics.jsonl")
    assert bad == 0
    return {r["step"]: r[telemetry.STEP_LOSSES] for r in records if telemetry.STEP_LOSSES in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 12-step run, and the same run stopped after step 9 (its checkpoint)."""
    root = tmp_path_factory.mktemp("metricsresume")
    corpus = write_word_corpus(root / "corpus", 30)
    run_lib.run(_cfg(corpus, root / "cache"), root / "ref", log=lambda s: None)
    run_lib.run(_cfg(corpus, root / "cache", **{"train.steps": 9}), root / "nine", log=lambda s: None)
    assert sorted(_losses(root / "ref")) == list(range(1, 13)) and sorted(_losses(root / "nine")) == list(range(1, 10))
    return root, corpus


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["invalid_utf8", "step_not_an_integer", "not_an_object", "deleted"])
def test_a_damaged_or_deleted_metrics_file_never_blocks_a_resume(runs, damage, tmp_path, capsys):
    root, corpus = runs
    work = tmp_path / "w"
    shutil.copytree(root / "nine", work)
    f = work / "metrics.jsonl"
    if damage == "deleted":
        f.unlink()
    else:
        lines = f.read_bytes().splitlines()
        f.write_bytes(b"\n".join(lines[:4] + [BAD[damage]] + lines[4:]) + b"\n")
    said = []
    capsys.readouterr()
    result = run_lib.run(_cfg(corpus, root / "cache", **{"checkpoint.allow_config_change": True}), work,
                         log=said.append)
    err = capsys.readouterr().err
    assert result.step == 12 and not result.stopped
    assert any("resumed from the checkpoint at step 9" in s for s in said), said
    warnings = [x for x in err.splitlines() if x.startswith("warning:") and "metrics.jsonl" in x]
    assert len(warnings) == 1, err[-3000:]
    reference, got = _losses(root / "ref"), _losses(work)
    if damage == "deleted":
        assert "history before step 9 is gone" in warnings[0]
        assert got == {s: reference[s] for s in (10, 11, 12)}
    else:
        assert "skipped 1 line(s)" in warnings[0]
        assert got == reference  # every step once, bit for bit; the bad line gone
