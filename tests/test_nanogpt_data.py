"""nanoGPT's prepared data as nanoGPT users have it: ``tokens:DIR`` reads train.bin as the training split
and val.bin as the validation split; meta.pkl's character vocabulary is the run's tokenizer (lossless,
a character outside it an error), read without running code; and a run on it trains, evaluates,
generates and exports characters."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from jaxlm import data, telemetry
from jaxlm.data import chars, integrity, sources, tokenizer, tokenizer_export, tokenizer_train
from jaxlm.errors import DataError

from conftest import ROOT, SHARED_DATA, write_word_corpus
from helpers.corpora import cfg_for, docs_of, token_stream

SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"


def prepare_char(d, text: str):
    """nanoGPT's data/shakespeare_char/prepare.py on `text`: the sorted characters, stoi/itos, the first
    90% as uint16 train.bin, the rest as val.bin, and meta.pkl. Returns (characters, train text, val text)."""
    d.mkdir(parents=True, exist_ok=True)
    vocab = sorted(set(text))
    stoi = {c: i for i, c in enumerate(vocab)}
    itos = {i: c for i, c in enumerate(vocab)}
    n = len(text)
    train, val = text[:int(n * 0.9)], text[int(n * 0.9):]
    np.array([stoi[c] for c in train], dtype=np.uint16).tofile(d / "train.bin")
    np.array([stoi[c] for c in val], dtype=np.uint16).tofile(d / "val.bin")
    with open(d / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(vocab), "itos": itos, "stoi": stoi}, f)
    return vocab, train, val


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    corpus = write_word_corpus(tmp_path_factory.mktemp("words"), 12, words_per_doc=0)
    return "".join(docs_of(corpus))


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_meta_pkl_is_a_lossless_char_tokenizer_and_a_foreign_character_fails(tmp_path, text):
    vocab, _, _ = prepare_char(tmp_path, text)
    tok = tokenizer.load(f"char:{tmp_path / 'meta.pkl'}")
    assert tok.vocab_size == len(vocab) + 1 and tok.eos_id == len(vocab)  # EOS: one id past the characters
    ids = tok.encode([text[:500]])[0]
    assert ids == [vocab.index(c) for c in text[:500]] and tok.decode(ids) == text[:500]
    assert tok.decode(ids + [tok.eos_id]) == text[:500]
    with pytest.raises(DataError) as e:
        tok.encode(["ab€cd"])
    assert "'€' (U+20AC, at character 2 of a text) is not in the" in _one_line(e)
    # jaxlm's copy (a cache's, an export's) is the same tokenizer
    again = tokenizer.load(tok.save(tmp_path / "copy"))
    assert again.sha256 == tok.sha256 and again.encode([text[:100]]) == tok.encode([text[:100]])


class _Calls:
    def __reduce__(self):
        return (os.getcwd, ())  # what a hostile pickle does: call a function while loading


@pytest.mark.parametrize("meta, says", [
    ({"vocab_size": 2, "itos": {0: "a", 1: "b"}, "hook": _Calls()}, "refers to posix.getcwd"),
    ({"vocab_size": 50304}, "no character vocabulary (itos/stoi) in it"),
    ({"itos": {0: "a", 2: "b"}}, "itos's ids are not 0..1"),
    ({"itos": {0: "a", 1: "b"}, "stoi": {"a": 1, "b": 0}}, "stoi and itos disagree"),
    ({"itos": {0: "ab"}}, "a non-empty list of single characters"),
])
def test_meta_pkl_is_read_without_running_code_and_checked(tmp_path, meta, says):
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps(meta))
    with pytest.raises(DataError) as e:
        tokenizer.load(f"char:{path}")
    assert says in _one_line(e)


def test_a_char_directory_trains_on_train_bin_and_validates_on_val_bin(tmp_path, text):
    _, train, val = prepare_char(tmp_path / "sc", text)
    cfg = cfg_for(f"tokens:{tmp_path / 'sc'}", **{"data.cache_dir": str(tmp_path / "cache")})
    cache = data.prepare(cfg, tmp_path / "w", log=lambda s: None)
    row = cfg.train.seq_len + 1
    for split, name in (("train", "train.bin"), ("validation", "val.bin")):
        ids = np.fromfile(tmp_path / "sc" / name, np.uint16)
        rows = np.asarray(cache.split(split)).ravel()
        assert rows.size == len(ids) // row * row
        np.testing.assert_array_equal(rows, ids[:rows.size])
    assert cache.tokenizer_spec.startswith("char:") and "tokenizer.chars.json" in cache.manifest["files"]
    # the text jaxlm.eval reads as the run's validation split is val.bin's
    assert list(sources.open_source(cfg.data).documents("validation")) == [val]
    # the cache's tokenizer file is verified like its rows
    path = cache.path / "tokenizer.chars.json"
    path.write_text(path.read_text().replace('"a"', '"A"', 1))
    with pytest.raises(integrity.Damage, match="tokenizer.chars.json"):
        data.TokenCache.open(cache.path)


def test_nanogpt_directories_and_globs_fail_with_one_line(tmp_path, text):
    prepare_char(tmp_path / "sc", text)
    with pytest.raises(DataError) as e:  # a glob that would train on val.bin too
        sources.open_source(cfg_for(f"tokens:{tmp_path / 'sc'}/*.bin").data)
    assert "matches both train.bin and val.bin" in _one_line(e) and f"tokens:{tmp_path / 'sc'}" in str(e.value)
    with pytest.raises(DataError) as e:  # meta.pkl names the vocabulary: no second tokenizer
        sources.open_source(cfg_for(f"tokens:{tmp_path / 'sc'}", **{"data.tokenizer": "hf:x"}).data)
    assert "leave data.tokenizer unset" in _one_line(e)
    (tmp_path / "sc" / "meta.pkl").unlink()  # now a directory of ids without their tokenizer (GPT-2 BPE's)
    with pytest.raises(DataError) as e:
        sources.open_source(cfg_for(f"tokens:{tmp_path / 'sc'}").data)
    assert "token ids need data.tokenizer" in _one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        sources.open_source(cfg_for(f"tokens:{tmp_path / 'empty'}").data)
    assert "has no train.bin" in _one_line(e)


def test_a_bpe_directory_without_meta_pkl_uses_the_given_tokenizer(tmp_path, text):
    tok = tokenizer_train.train_byte_bpe(iter([text]), 300)
    spec = tok.save(tmp_path / "gpt2tok")
    d = tmp_path / "bpe"
    d.mkdir()
    ids = token_stream(tok, [text[:len(text) * 9 // 10], text[len(text) * 9 // 10:]])  # documents end at EOS
    cut = int(np.flatnonzero(ids == tok.eos_id)[0]) + 1
    ids[:cut].tofile(d / "train.bin")
    ids[cut:].tofile(d / "val.bin")
    cfg = cfg_for(f"tokens:{d}", **{"data.tokenizer": spec, "data.cache_dir": str(tmp_path / "cache")})
    cache = data.prepare(cfg, tmp_path / "w", log=lambda s: None)
    val = np.asarray(cache.split("validation")).ravel()
    np.testing.assert_array_equal(val, ids[cut:cut + val.size])
    assert cache.manifest["splits"]["validation"]["documents"] == 1 and cache.tokenizer_spec.startswith("hf:")


def test_the_export_of_a_char_vocabulary_gives_the_same_ids_in_transformers(tmp_path, text):
    from transformers import AutoTokenizer

    prepare_char(tmp_path / "sc", text)
    tok = tokenizer.load(f"char:{tmp_path / 'sc' / 'meta.pkl'}")
    tokenizer_export.save_for_hf(tok, tmp_path / "out")
    assert tokenizer_export.for_model_dir(tmp_path / "out") == f"char:{tmp_path / 'out' / chars.FILE}"
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    sample = text[:300]
    ids = hf(sample)["input_ids"]
    assert ids == tok.encode([sample])[0] and hf.decode(ids) == sample
    assert hf.eos_token_id == tok.eos_id


def _cli(args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", WANDB_MODE="disabled")
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.mark.slow  # trains a tiny model, then runs generate and eval's --help as a user would
@pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"shared corpus absent: {SHAKESPEARE} (tests use it when present)")
def test_shakespeare_char_trains_evaluates_generates_and_exports_characters(tmp_path):
    from transformers import AutoTokenizer

    from jaxlm import eval as eval_lib
    from jaxlm import export as export_lib

    vocab, _, val = prepare_char(tmp_path / "shakespeare_char", SHAKESPEARE.read_text()[:100_000])
    run = tmp_path / "run"
    res = _cli(["jaxlm.main", "--config=jaxlm/configs/tiny.py", f"--workdir={run}",
                f"--config.data.source=tokens:{tmp_path / 'shakespeare_char'}", "--config.train.steps=4",
                "--config.train.eval_every=2", "--config.train.eval_batches=1", "--config.train.batch_size=4",
                "--config.train.seq_len=64", "--config.log.wandb_mode=disabled", "--config.log.stats_every=0",
                "--config.checkpoint.stages=((4, 4),)"])
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if telemetry.EVAL_LOSS in r] == [2, 4]
    # the validation curve is val.bin's tokens: the cache's validation rows are its ids, in order
    meta = json.loads((run / "run.json").read_text())["data"]
    assert meta["tokenizer"].startswith("char:") and meta["vocab_size"] == len(vocab) + 1
    rows = np.asarray(data.TokenCache.open(meta["cache"]).split("validation")).ravel()
    np.testing.assert_array_equal(rows, np.fromfile(tmp_path / "shakespeare_char" / "val.bin", np.uint16)[:rows.size])

    said = []  # eval: the run's validation split is val.bin's text
    (result,) = eval_lib.evaluate_run(run, log=said.append)
    assert np.isfinite(result["loss"]) and any(f"{len(val.encode()):,} bytes" in s for s in said), said
    gen = _cli(["jaxlm.generate", f"--workdir={run}", "--prompt=ROMEO:", "--max_new_tokens=40", "--seed=1"])
    assert gen.returncode == 0, gen.stderr[-3000:]
    out = gen.stdout.rstrip("\n")
    assert out.startswith("ROMEO:") and len(out) >= len("ROMEO:") + 30 and set(out) <= set(vocab), out
    bad = _cli(["jaxlm.generate", f"--workdir={run}", "--prompt=ROMÉO", "--max_new_tokens=4"])
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode != 0 and len(errors) == 1 and "'É'" in errors[0], bad.stderr[-2000:]
    out_dir = export_lib.export(run, tmp_path / "hf")  # export: the model and its characters for transformers
    hf = AutoTokenizer.from_pretrained(str(out_dir))
    assert hf.decode(hf(val[:200])["input_ids"]) == val[:200]
    assert tokenizer.load(tokenizer_export.for_model_dir(out_dir)).sha256 == tokenizer.load(meta["tokenizer"]).sha256
    helped = _cli(["jaxlm.eval", "--help"])
    assert "tokens:DIR (nanoGPT's train.bin + val.bin" in " ".join(helped.stdout.split())
