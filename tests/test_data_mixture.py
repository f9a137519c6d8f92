"""Weighted mixtures: proportions, exact resume, caches shared across weights, one error line."""

import numpy as np
import pytest
from test_data_sources import cfg_for, docs_of, write_jsonl, write_parquet

from jaxlm import data
from jaxlm.data import mixture
from jaxlm.errors import DataError

from conftest import write_word_corpus


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
    got = mixture.Schedule([0.7, 0.3], cfg.data.seed).counts(n)
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
    np.testing.assert_array_equal(seen, mixture.Schedule([0.7, 0.3], cfg.data.seed).counts(1024))
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
