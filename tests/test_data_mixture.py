"""Weighted mixtures: proportions, exact resume, caches shared across weights, one error line."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxlm import data, telemetry
from jaxlm.data import mixture, tokenizer_train
from jaxlm.errors import DataError

from conftest import ROOT, write_word_corpus
from helpers.corpora import cfg_for, docs_of, token_stream, write_datasets_dir, write_jsonl, write_llmc, write_parquet


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own machine cache, WORKDIR/data of the tmp_path workdir it prepares in: these tests
    count what is built, and a cache shared with the session's other tests would be found instead."""
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "data"))


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two small corpora of different words: one as Parquet, one as JSONL."""
    root = tmp_path_factory.mktemp("mix")
    a = docs_of(write_word_corpus(root / "ca", 30, words_per_doc=0, seed=1))
    b = docs_of(write_word_corpus(root / "cb", 30, words_per_doc=0, seed=2))
    return root, write_parquet(root / "a", a), write_jsonl(root / "b", b)


def _mix(pa_spec, jl_spec, wa, wb):
    return f"mix:{wa}*{pa_spec},{wb}*{jl_spec}"


def _rows_by_component(cache):
    return {np.asarray(r).tobytes(): i for i, c in enumerate(cache.components) for r in c.split("train")}


def test_realised_proportions_are_within_3_standard_errors_over_10k_rows(two):
    root, pa_spec, jl_spec = two
    cfg = cfg_for(_mix(pa_spec, jl_spec, 0.7, 0.3))
    cache = data.prepare(cfg, root / "w", log=lambda s: None)
    n = 10_000
    got = mixture.Schedule([0.7, 0.3], data.data_seed(cfg)).counts(n)
    assert got.sum() == n
    se = np.sqrt(0.7 * 0.3 / n)
    assert abs(got[0] / n - 0.7) < 3 * se, got / n
    # the loader's rows are the schedule's: each row's component, over the first 1024 rows (grain's
    # per-row index shuffle is slow on a shared CPU, so the 10K rows are counted from the schedule)
    owner = _rows_by_component(cache)
    loader = data.train_loader(cache, cfg)
    seen = np.zeros(2)
    for k in range(1024 // cfg.train.batch_size):
        for row in loader.batch(k):
            seen[owner[row.astype(np.uint16).tobytes()]] += 1
    np.testing.assert_array_equal(seen, mixture.Schedule([0.7, 0.3], data.data_seed(cfg)).counts(1024))
    assert "realised proportions" in cache.describe(n) and f"{got[0] / n:.3f} (weight 0.700)" in cache.describe(n)
    # the schedule is random, not a fixed interleaving: the first blocks' shares differ
    s = mixture.Schedule([0.5, 0.5], 0)
    assert len({int(s.counts(b * mixture.BLOCK)[0] - s.counts((b - 1) * mixture.BLOCK)[0]) for b in range(1, 6)}) > 1


def test_a_resumed_loader_sees_the_rows_of_an_uninterrupted_one(two):
    root, pa_spec, jl_spec = two
    cfg = cfg_for(_mix(pa_spec, jl_spec, 0.6, 0.4))
    cache = data.prepare(cfg, root / "w", log=lambda s: None)
    straight = data.train_loader(cache, cfg)
    want = [next(straight) for _ in range(30)]
    first = data.train_loader(cache, cfg)
    for _ in range(11):
        next(first)
    state = first.get_state()
    del first  # "killed"
    again = data.train_loader(data.prepare(cfg, root / "w", log=lambda s: None), cfg)
    again.set_state(state)
    for k in range(11, 30):
        np.testing.assert_array_equal(next(again), want[k])


def test_a_weight_changes_the_schedule_and_no_cache(two):
    root, pa_spec, jl_spec = two
    logs = []
    a = data.prepare(cfg_for(_mix(pa_spec, jl_spec, 0.7, 0.3)), root / "k", log=logs.append)
    b = data.prepare(cfg_for(_mix(pa_spec, jl_spec, 0.2, 0.8)), root / "k", log=logs.append)
    assert [c.path for c in a.components] == [c.path for c in b.components]
    assert a.tokenizer_spec == b.tokenizer_spec
    assert sum("training a" in m for m in logs) == 1 and sum("tokenizing" in m for m in logs) == 2  # once each
    assert a.schedule_key != b.schedule_key
    single = data.prepare(cfg_for(pa_spec, **{"data.tokenizer": a.tokenizer_spec}), root / "k", log=logs.append)
    assert single.path == a.components[0].path  # the component's cache is the source's own
    val = a.split("validation")
    assert len(val) and set(map(bytes, val)) <= set(map(bytes, np.concatenate(
        [c.split("validation") for c in a.components])))
    assert sorted(data.component_eval_loaders(a, cfg_for(a.spec), batch_size=1)) == [0, 1]


@pytest.mark.parametrize("spec, words", [
    ("mix:0*jsonl:/a/*.jsonl,0*jsonl:/b/*.jsonl", "weights sum to 0"),
    ("mix:-1*jsonl:/a/*.jsonl,1*jsonl:/b/*.jsonl", "is not a number >= 0"),
    ("mix:jsonl:/a/*.jsonl", "is not WEIGHT*SOURCE"),
])
def test_bad_mixtures_fail_with_one_line(spec, words):
    with pytest.raises(DataError) as e:
        mixture.parse(spec)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_component_matching_no_files_is_named(two, tmp_path):
    root, pa_spec, _ = two
    with pytest.raises(DataError) as e:
        data.prepare(cfg_for(f"mix:1*{pa_spec},1*jsonl:{tmp_path}/none/*.jsonl"), tmp_path, log=lambda s: None)
    assert "matched no files" in str(e.value) and "none/*.jsonl" in str(e.value)


MIX_STEPS = 16


def _train_args(workdir, source, tokenizer):
    o = {"data.source": source, "data.tokenizer": tokenizer, "data.val_fraction": 0.1, "data.cache_dir":
         str(workdir.parent / "cache"), "train.steps": MIX_STEPS, "train.batch_size": 8, "train.seq_len": 32,
         "model.n_positions": 32, "optim.warmup_steps": 2, "log.every": 1, "log.stats_every": 0,
         "log.wandb_mode": "disabled", "train.eval_every": 8, "train.eval_batches": 2,
         "checkpoint.stages": "((4, 1000),)", "checkpoint.latest_every_minutes": 0.0}
    return [sys.executable, "-m", "jaxlm.main", "--config=configs/tiny.py", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in o.items()]


@pytest.mark.slow
def test_a_mixture_of_parquet_datasets_dir_and_token_shards_trains_and_resumes_bit_identically_after_kill_9(
        tmp_path):
    """One run over all three new sources: it trains, logs its proportions and per-component losses, and
    a run killed -9 mid-way and restarted gives the uninterrupted run's losses at every step."""
    docs = [docs_of(write_word_corpus(tmp_path / f"c{i}", 24, words_per_doc=0, seed=10 + i)) for i in range(3)]
    tok = tokenizer_train.train_byte_bpe(iter(docs[0] + docs[1] + docs[2]), 300)
    tok_spec = tok.save(tmp_path / "tok")
    (tmp_path / "shards").mkdir()
    ids = token_stream(tok, docs[2])
    ids[: len(ids) // 2].tofile(tmp_path / "shards" / "a.bin")
    write_llmc(tmp_path / "shards" / "b.bin", ids[len(ids) // 2:])
    source = (f"mix:0.5*{write_parquet(tmp_path / 'pq', docs[0])},0.3*{write_datasets_dir(tmp_path / 'ds', docs[1])},"
              f"0.2*tokens:{tmp_path}/shards/*.bin")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    ref = subprocess.run(_train_args(tmp_path / "ref", source, tok_spec), cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "realised proportions over the run's 128 rows" in ref.stdout
    want = _step_losses(tmp_path / "ref")
    assert sorted(want) == list(range(1, MIX_STEPS + 1))
    records, _ = telemetry.read_metrics(tmp_path / "ref" / "metrics.jsonl")
    evals = [r for r in records if telemetry.EVAL_LOSS in r]
    assert evals and all(np.isfinite(r[telemetry.EVAL_COMPONENT_LOSS.format(i)]) for r in evals for i in range(3))

    log = tmp_path / "killed.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(_train_args(tmp_path / "run", source, tok_spec), cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while f"step {MIX_STEPS // 2 + 2}/" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    again = subprocess.run(_train_args(tmp_path / "run", source, tok_spec), cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from the checkpoint" in again.stdout and "tokenizing" not in again.stdout + again.stderr
    assert _step_losses(tmp_path / "run") == want  # every step, exact floats


def _step_losses(workdir):
    records, _ = telemetry.read_metrics(workdir / "metrics.jsonl")
    return {r["step"]: r[telemetry.STEP_LOSSES][-1] for r in records if telemetry.STEP_LOSSES in r}


@pytest.mark.slow
def test_the_startup_line_of_a_budgeted_mixture_run_speaks_of_the_rows_it_knows(two, tmp_path):
    """A budget decides the run's length (no step cap): the proportions are over the first epoch's rows,
    said so, and not over train.steps' rows (which such a run does not use)."""
    from jaxlm import run as run_lib

    root, pa_spec, jl_spec = two
    cfg = cfg_for(_mix(pa_spec, jl_spec, 0.7, 0.3), **{
        "train.budget": "2s", "train.max_steps": 0, "train.steps": 7, "train.eval_every": 0, "log.every": 1,
        "log.wandb_mode": "disabled", "log.stats_every": 0, "data.cache_dir": str(root / "k")})
    logs = []
    run_lib.run(cfg, tmp_path / "run", log=logs.append)
    line = next(m for m in logs if "realised proportions" in m)
    cache = data.prepare(cfg, tmp_path / "run", log=lambda s: None)
    epoch = sum(len(c.split("train")) for c in cache.components)  # what an epoch count divides by
    assert f"over the first {epoch:,} rows (the budget decides the run's length)" in line, line
    assert f"{7 * 8} rows" not in line
