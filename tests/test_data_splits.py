"""The validation split of a corpus without one of its own: documents held out by hash where there are
enough of them, else the corpus's tail (``jaxlm.data.splits``); a named validation source
(``data.val_source``); and the warning that says what to change where evaluation cannot run."""

import json
import types

import numpy as np
import pytest

from jaxlm import config, data, telemetry
from jaxlm import run as run_lib
from jaxlm.data import cache as cache_lib
from jaxlm.data import sources, splits
from jaxlm.errors import ConfigError, DataError

from conftest import ROOT, write_word_corpus
from helpers.corpora import cfg_for, docs_of


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("corpus"), 40, words_per_doc=0)


@pytest.fixture(scope="module")
def one_file(tmp_path_factory, corpus):
    """The corpus's documents as one file: one document for data.val_fraction to split."""
    path = tmp_path_factory.mktemp("one") / "all.txt"
    path.write_text("".join(docs_of(corpus)))
    return path


def _prepare(cfg, tmp_path, logs=None):
    cfg.data.cache_dir = str(tmp_path / "cache")
    return data.prepare(cfg, tmp_path / "w", log=(logs.append if logs is not None else lambda s: None))


def test_cut_takes_the_nearest_document_boundary_only_near_the_fraction():
    assert splits.cut([50, 40, 10], 0.1) == (2, 0)  # a boundary at 90%: whole documents
    assert splits.cut([50, 25, 25], 0.1) == (2, 15)  # the boundary would hold out 25% (> 2 x 10%): inside
    assert splits.cut([1000], 0.02) == (0, 980)  # one document: inside it
    assert splits.cut([90, 6], 0.1) == (1, 0)  # 6% held out: within a factor of two
    assert splits.cut([1], 0.5) == (1, 0)  # nothing to split: all of it trains


def test_a_one_file_corpus_holds_out_the_tail_of_its_text(one_file):
    cfg = cfg_for(f"files:{one_file}", **{"data.val_fraction": 0.05})
    src = sources.open_source(cfg.data)
    train, val = list(src.documents("train")), list(src.documents("validation"))
    text = one_file.read_text()
    assert len(train) == len(val) == 1 and train[0] + val[0] == text
    assert abs(len(val[0]) / len(text) - 0.05) < 1e-3
    assert src.split_record() == {"rule": "tail", "fraction": 0.05, "unit": "characters", "documents": 1,
                                  "at_boundary": False}


def test_a_few_documents_split_at_a_boundary_and_many_by_hash(corpus, tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    docs = ["first document. " * 30, "second document " * 30, "third, short. " * 8]  # 480, 480, 112 characters
    for i, d in enumerate(docs):
        (few / f"{i}.txt").write_text(d)
    assert not any(splits.held_out(d, 0.1) for d in docs)  # (the premise: the hash holds out none of them)
    src = sources.open_source(cfg_for(f"files:{few}/*.txt").data)
    assert list(src.documents("validation")) == docs[2:] and list(src.documents("train")) == docs[:2]
    assert src.split_record()["at_boundary"] is True
    # forty documents at 0.1: the hash, exactly as before the tail split existed
    src = sources.open_source(cfg_for(f"files:{corpus}/*.txt").data)
    assert src.tail_cut() is None and src.split_record() is None
    assert list(src.documents("validation")) == [d for d in docs_of(corpus) if splits.held_out(d, 0.1)]


def test_the_tail_split_has_its_own_cache_key_and_a_multi_document_cache_keeps_its_key(corpus, one_file, tmp_path):
    many = _prepare(cfg_for(f"files:{corpus}/*.txt"), tmp_path / "a")
    assert "val_split" not in many.manifest["fingerprint"] and "validation_split" not in many.manifest
    assert many.path.name == cache_lib._key(many.manifest["fingerprint"])  # the key as it always was
    # a cache of the one file built before the tail split (its hashed key, no validation document) is not used
    cfg = cfg_for(f"files:{one_file}")
    hashed = dict(_prepare(cfg, tmp_path / "b").manifest["fingerprint"])
    assert hashed.pop("val_split") == "tail"
    old = tmp_path / "c" / "cache" / "tokens" / cache_lib._key(hashed)  # in a cache that has no tail split yet
    old.mkdir(parents=True)
    (old / "manifest.json").write_text(json.dumps({"splits": {"validation": {"documents": 0}}}))
    cache = _prepare(cfg, tmp_path / "c")
    assert cache.path != old and cache.path.name == cache_lib._key({**hashed, "val_split": "tail"})
    assert cache.manifest["splits"]["validation"]["sequences"] > 0
    assert splits.describe(cache.manifest).startswith("data: validation is the last 10% of the corpus's characters")


def test_token_shards_without_eos_hold_out_their_last_tokens(corpus, tmp_path):
    cfg = cfg_for(f"files:{corpus}/*.txt", **{"data.val_fraction": 0.0})
    tok = _prepare(cfg, tmp_path / "t").tokenizer()
    ids = np.asarray(tok.encode(["".join(docs_of(corpus))])[0], np.uint16)  # one document: no EOS in it
    ids.tofile(tmp_path / "all.bin")
    cfg = cfg_for(f"tokens:{tmp_path}/all.bin", **{"data.tokenizer": tok.path, "data.val_fraction": 0.1})
    cache = _prepare(cfg, tmp_path / "k")
    row = cfg.train.seq_len + 1
    cut = len(ids) - round(len(ids) * 0.1)
    val = np.asarray(cache.split("validation")).ravel()
    np.testing.assert_array_equal(val, ids[cut:cut + val.size])
    assert val.size == (len(ids) - cut) // row * row and cache.manifest["validation_split"]["unit"] == "tokens"


def test_val_source_is_the_validation_split_and_part_of_the_key(corpus, one_file, tmp_path):
    held = write_word_corpus(tmp_path / "held", 5, words_per_doc=0, seed=3)
    cfg = cfg_for(f"files:{corpus}/*.txt", **{"data.val_source": f"files:{held}/*.txt"})
    src = sources.open_source(cfg.data)
    assert list(src.documents("train")) == docs_of(corpus)  # every document trains
    assert list(src.documents("validation")) == docs_of(held)
    a = _prepare(cfg, tmp_path / "a")
    assert a.manifest["splits"]["validation"]["documents"] == 5 and a.manifest["splits"]["train"]["documents"] == 40
    cfg.data.val_source = ""
    assert _prepare(cfg, tmp_path / "a").path != a.path
    for bad, says in ((f"files:{corpus}/*.txt", "it is data.source"), ("nope:x", "not a source spec"),
                      ("files:", "not a source spec")):
        with pytest.raises(ConfigError, match=says) as e:
            config.load(ROOT / "jaxlm" / "configs" / "tiny.py",
                        {"data.source": f"files:{corpus}/*.txt", "data.val_source": bad})
        assert "\n" not in str(e.value) and "data.val_source" in str(e.value)
    with pytest.raises(DataError, match="data.val_source: .*matched no files"):
        sources.open_source(cfg_for(f"files:{corpus}/*.txt", **{"data.val_source": f"files:{tmp_path}/no/*"}).data)


def test_evaluation_off_names_the_cause_and_the_fix(corpus, tmp_path):
    cfg = cfg_for(f"files:{corpus}/*.txt", **{"data.val_fraction": 0.005})
    cache = _prepare(cfg, tmp_path)
    said = []
    trainer = types.SimpleNamespace(micro=cfg.train.batch_size, batch_sharding=None)
    assert cache.manifest["splits"]["validation"]["sequences"] < cfg.train.batch_size  # (the premise)
    assert run_lib._validation_batches(cache, cfg, trainer, said.append) is None
    (line,) = said
    assert line.startswith("warning: periodic evaluation is off: the validation split has")
    assert "data.val_fraction=0.005" in line and "raise data.val_fraction" in line and "data.val_source" in line
    assert "larger corpus" not in line


@pytest.mark.slow  # trains a tiny model
def test_a_one_file_corpus_gets_a_validation_curve(one_file, tmp_path):
    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {
        "data.source": f"files:{one_file}", "data.cache_dir": str(tmp_path / "cache"), "data.vocab_size": 300,
        "data.val_fraction": 0.1, "train.steps": 4, "train.eval_every": 2, "train.eval_batches": 1,
        "train.batch_size": 4, "train.seq_len": 64, "log.wandb_mode": "disabled", "log.stats_every": 0,
        "checkpoint.stages": ((4, 4),)})
    said = []
    run_lib.run(cfg, tmp_path / "run", log=said.append)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in records if telemetry.EVAL_LOSS in r]
    assert evals == [2, 4], evals
    assert any(s.startswith("data: validation is the last 10% of the corpus's characters") for s in said), said
    assert not any("periodic evaluation is off" in s for s in said)
