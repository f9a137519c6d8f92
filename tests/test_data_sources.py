"""Parquet, Hugging Face datasets and token-shard sources: the same documents / tokens as the
equivalent JSONL or raw ids, cached once, and one error line for each bad input."""

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxlm import data
from jaxlm.data import shards, sources, tokenizer, tokenizer_train
from jaxlm.errors import DataError

from conftest import ROOT, write_word_corpus
from helpers.corpora import cfg_for, docs_of, token_stream, write_datasets_dir, write_jsonl, write_llmc, write_parquet


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("corpus"), 40, words_per_doc=0)


@pytest.fixture(scope="module")
def gpt2_style(tmp_path_factory, corpus):
    """A GPT-2-format byte-level BPE (vocab.json + merges.txt), trained here on the corpus."""
    tok = tokenizer_train.train_byte_bpe(iter(docs_of(corpus)), 300)
    return tok.save(tmp_path_factory.mktemp("gpt2tok"))


# --- each source reads what the equivalent JSONL reads -----------------------------------------

def test_parquet_and_datasets_dirs_yield_the_jsonl_documents_in_order(corpus, tmp_path):
    docs = docs_of(corpus)
    want = {s: list(sources.open_source(cfg_for(write_jsonl(tmp_path / "j", docs)).data).documents(s))
            for s in sources.SPLITS}
    assert want["validation"] and want["train"]
    for spec in (write_parquet(tmp_path / "pq", docs), write_datasets_dir(tmp_path / "ds", docs)):
        src = sources.open_source(cfg_for(spec).data)
        assert {s: list(src.documents(s)) for s in sources.SPLITS} == want, spec

    # a DatasetDict with its own validation split uses it; Arrow cache files as the hub cache names them
    src = sources.open_source(cfg_for(write_datasets_dir(tmp_path / "dd", docs[:30], docs[30:])).data)
    assert src.has_validation and list(src.documents("validation")) == docs[30:]
    assert list(src.documents("train")) == docs[:30]
    hub = tmp_path / "hub" / "corpus" / "default" / "0.0.0" / "abc123"
    hub.mkdir(parents=True)
    for name, part in (("train", docs[:30]), ("validation", docs[30:])):
        with pa.ipc.new_stream(hub / f"corpus-{name}.arrow", pa.schema([("text", pa.string())])) as w:
            w.write_table(pa.table({"text": part}))
    src = sources.open_source(cfg_for(f"hf:{tmp_path / 'hub'}").data)
    assert list(src.documents("train")) == docs[:30] and list(src.documents("validation")) == docs[30:]


def test_parquet_cache_equals_the_jsonl_cache_and_is_built_once(corpus, tmp_path):
    docs = docs_of(corpus)
    logs = []
    j = data.prepare(cfg_for(write_jsonl(tmp_path / "j", docs)), tmp_path / "a", log=lambda s: None)
    spec = write_parquet(tmp_path / "pq", docs)
    p = data.prepare(cfg_for(spec), tmp_path / "b", log=logs.append)
    for split in sources.SPLITS:
        np.testing.assert_array_equal(np.asarray(p.split(split)), np.asarray(j.split(split)))
    again = data.prepare(cfg_for(spec), tmp_path / "b", log=logs.append)
    assert again.path == p.path and sum("tokenizing" in m for m in logs) == 1


def test_token_shards_raw_and_llmc_are_the_raw_tokens(corpus, gpt2_style, tmp_path):
    tok = tokenizer.load(gpt2_style)
    docs = docs_of(corpus)
    ids = token_stream(tok, docs)
    d = tmp_path / "shards"
    d.mkdir()
    half = len(ids) // 2
    ids[:half].tofile(d / "train_000.bin")  # nanoGPT: raw uint16
    write_llmc(d / "train_001.bin", ids[half:])  # llm.c: header + uint16
    cfg = cfg_for(f"tokens:{d}/*.bin", **{"data.tokenizer": gpt2_style, "data.val_fraction": 0.0})
    cache = data.prepare(cfg, tmp_path / "w", log=lambda s: None)
    rows = np.asarray(cache.split("train"))
    row = cfg.train.seq_len + 1
    np.testing.assert_array_equal(rows.ravel(), ids[: len(ids) // row * row])
    assert cache.manifest["splits"]["train"]["documents"] == len(docs)
    assert cache.tokenizer().vocab_size == tok.vocab_size  # eval / generate / export decode with it

    # with a held-out fraction: documents (ending at EOS) split by hash, the same on every build
    cfg.data.val_fraction = 0.2
    a = data.prepare(cfg, tmp_path / "x", log=lambda s: None)
    b = data.prepare(cfg, tmp_path / "y", log=lambda s: None)
    s = a.manifest["splits"]
    assert s["train"]["documents"] + s["validation"]["documents"] == len(docs) and s["validation"]["documents"]
    assert s["train"]["tokens"] + s["validation"]["tokens"] == len(ids)
    np.testing.assert_array_equal(np.asarray(a.split("validation")), np.asarray(b.split("validation")))
    # as text (what jaxlm.eval reads): the corpus's documents, each in the split its ids put it in
    src = sources.open_source(cfg.data)
    val, train = list(src.documents("validation")), list(src.documents("train"))
    assert len(val) == s["validation"]["documents"] and sorted(val + train) == sorted(docs)


# --- bad inputs: one line each -------------------------------------------------------------------

def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_bad_inputs_fail_with_one_line_each(corpus, gpt2_style, tmp_path):
    docs = docs_of(corpus)
    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.table({"content": docs}), d / "x.parquet")
    with pytest.raises(DataError) as e:
        list(sources.open_source(cfg_for(f"parquet:{d}/*.parquet").data).documents("train"))
    assert "no column data.text_field='text'" in _one_line(e) and "content" in _one_line(e)

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": docs}), good)
    broken = tmp_path / "broken" / "x.parquet"
    broken.parent.mkdir()
    broken.write_bytes(good.read_bytes()[:-12] + b"\0" * 8 + b"PAR1")  # the footer's length and magic kept
    with pytest.raises(DataError) as e:
        list(sources.open_source(cfg_for(f"parquet:{broken}").data).documents("train"))
    assert "not a readable Parquet file" in _one_line(e) and str(broken) in _one_line(e)

    tok = tokenizer.load(gpt2_style)
    ids = token_stream(tok, docs[:5])
    bad_magic = write_llmc(tmp_path / "magic.bin", ids, magic=12345)
    with pytest.raises(DataError) as e:
        shards.read_shard(str(bad_magic))
    assert "not an llm.c token shard (magic 12345" in _one_line(e)
    truncated = write_llmc(tmp_path / "short.bin", ids, count=len(ids) + 100)
    with pytest.raises(DataError) as e:
        shards.read_shard(str(truncated))
    assert "truncated" in _one_line(e) and f"{len(ids) + 100:,} tokens" in _one_line(e)
    (tmp_path / "odd.bin").write_bytes(b"\0" * 7)  # a raw file cut mid-token
    with pytest.raises(DataError) as e:
        shards.read_shard(str(tmp_path / "odd.bin"))
    assert "not a whole number of uint16 tokens" in _one_line(e)

    big = tmp_path / "big" / "x.bin"
    big.parent.mkdir()
    np.array([1, 2, tok.vocab_size + 5, 3], np.uint16).tofile(big)
    cfg = cfg_for(f"tokens:{big}", **{"data.tokenizer": gpt2_style})
    with pytest.raises(DataError) as e:
        data.prepare(cfg, tmp_path / "w", log=lambda s: None)
    assert f"token id {tok.vocab_size + 5} at position 2" in _one_line(e) and "data.tokenizer" in _one_line(e)
    with pytest.raises(DataError) as e:
        sources.open_source(cfg_for(f"tokens:{big}").data)  # no data.tokenizer
    assert "need data.tokenizer" in _one_line(e)

    for spec in (f"parquet:{tmp_path}/none/*.parquet", f"tokens:{tmp_path}/none/*.bin", f"hf:{tmp_path}/none"):
        with pytest.raises(DataError) as e:
            sources.open_source(cfg_for(spec, **{"data.tokenizer": gpt2_style}).data)
        assert ("matched no files" in _one_line(e)) or ("no such directory" in _one_line(e)), spec


@pytest.mark.slow
def test_the_cli_prints_one_error_line_for_bad_data(corpus, gpt2_style, tmp_path):
    """The same errors as users see them: `python -m jaxlm.data` exits non-zero with one `error:` line."""
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")
    bad = tmp_path / "bad.bin"
    np.array([1, 2, 60000], np.uint16).tofile(bad)
    cases = [(f"parquet:{broken}", {}, "not a readable Parquet file"),
             (f"tokens:{bad}", {"data.tokenizer": gpt2_style}, "token id 60000 at position 2"),
             (f"mix:0*files:{corpus}/*.txt", {}, "weights sum to 0")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for source, over, words in cases:
        args = [sys.executable, "-m", "jaxlm.data", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                f"--config.data.source={source}"] + [f"--config.{k}={v}" for k, v in over.items()]
        res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        lines = [x for x in res.stderr.splitlines() if x.startswith("error:")]
        assert res.returncode != 0 and "Traceback" not in res.stderr and len(lines) == 1, res.stderr[-2000:]
        assert words in lines[0], lines[0]
