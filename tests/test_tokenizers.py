"""Hugging Face tokenizers beside SentencePiece: byte-level BPE trained with `tokenizers`, `hf:DIR` loading
(tokenizer.json, or GPT-2's vocab.json + merges.txt), parity with transformers, the cache, a run and its
export, and bad inputs. All data is made here."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFCore
from tokenizers import models, pre_tokenizers, trainers

from jaxlm import config, data
from jaxlm import export as export_lib
from jaxlm import run as run_lib
from jaxlm.data import cache as cache_lib
from jaxlm.data import tokenizer as tok_lib
from jaxlm.data import tokenizer_export, tokenizer_train
from jaxlm.errors import DataError

from conftest import ROOT, write_word_corpus

transformers = pytest.importorskip("transformers")

MIXED = ("ASCII text, then accents: héllo wörld çà Ørsted; emoji 🙂👍🏽🏳️‍🌈; CJK 日本語の文章 中文 한국어;\n"
         "whitespace  runs   \t\t\n\n\n   and\u00a0nbsp\r\n; <|endoftext|>inside text<|endoftext|> end  \n\n  ")
DOCS = [MIXED * 3, "def f(x):\n    return x  +  1\n\n\tprint('héllo ✓')\n" * 20, "plain text, more text. " * 60,
        "日本語のテキストと中文的文本。" * 20]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A byte-level BPE trained here, saved as an HF directory."""
    tok = tokenizer_train.train_byte_bpe(DOCS, vocab_size=400)
    d = tmp_path_factory.mktemp("bpe") / "tok"
    spec = tok.save(d)
    return tok, d, spec


def _cfg(source, **over):
    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py")
    over = {"data.source": source, "data.vocab_size": 300, "data.val_fraction": 0.1, "train.seq_len": 32,
            "train.batch_size": 8, **over}
    for k, v in over.items():
        config.set_by_path(cfg, k, v)
    return cfg


def _quiet(s):
    pass


# --- byte-level BPE: parity with transformers, lossless, deterministic ------------------------------

def test_byte_bpe_encodes_as_gpt2_tokenizer_fast_and_is_lossless(trained):
    tok, d, spec = trained
    assert spec == f"hf:{d}" and tok.kind == "hf"
    assert {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in d.iterdir()}
    loaded = tok_lib.load(spec)
    assert (loaded.sha256, loaded.eos_id, loaded.vocab_size) == (tok.sha256, tok.eos_id, tok.vocab_size)
    assert loaded.eos_id == 0 and loaded.dtype() == np.uint16 and 300 < loaded.vocab_size <= 400
    texts = [MIXED, "", " leading space", "trailing\n", "🙂", "<|endoftext|>", "a<|endoftext|>b", DOCS[1]]
    ours = loaded.encode(texts)
    assert ours == loaded.encode(texts, num_threads=1)  # the batch in parallel = one at a time
    for cls in (transformers.GPT2TokenizerFast, transformers.AutoTokenizer):
        ref = cls.from_pretrained(d)
        assert ref.eos_token == "<|endoftext|>" and ref.eos_token_id == loaded.eos_id
        assert [ref(t)["input_ids"] for t in texts] == ours, cls.__name__
        assert ref.decode(ours[0]) == MIXED
    assert ours[6] == loaded.encode(["a"])[0] + [loaded.eos_id] + loaded.encode(["b"])[0]  # as transformers does
    for t in texts:
        assert loaded.decode(loaded.encode([t])[0]) == t
    # deterministic: the same documents give the same tokenizer
    assert tokenizer_train.train_byte_bpe(DOCS, vocab_size=400).sha256 == tok.sha256


def test_vocab_and_merges_alone_load_as_tokenizer_json_does(trained, tmp_path):
    tok, d, _ = trained
    gpt2_style = tmp_path / "gpt2"
    gpt2_style.mkdir()
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(d / f, gpt2_style / f)
    loaded = tok_lib.load(f"hf:{gpt2_style}")
    assert (loaded.eos_id, loaded.vocab_size) == (tok.eos_id, tok.vocab_size)
    texts = [MIXED, DOCS[1], "x<|endoftext|>y"]
    assert loaded.encode(texts) == tok.encode(texts)
    assert transformers.GPT2TokenizerFast.from_pretrained(gpt2_style)(MIXED)["input_ids"] == tok.encode([MIXED])[0]
    assert loaded.decode(loaded.encode([MIXED])[0]) == MIXED


# --- the cache and a run -------------------------------------------------------------------------

def test_cache_trains_byte_bpe_under_its_own_key_and_keeps_the_default_key(tmp_path):
    corpus = write_word_corpus(tmp_path / "corpus", 20, words_per_doc=150)
    root = tmp_path / "cache"
    sp = data.prepare(_cfg(f"files:{corpus}/*.txt", **{"data.cache_dir": str(root)}), None, log=_quiet)
    bb = data.prepare(_cfg(f"files:{corpus}/*.txt", **{"data.tokenizer_kind": "byte_bpe", "data.cache_dir": str(root)}),
                      None, log=_quiet)
    assert sp.tokenizer_spec == str(sp.path / "tokenizer.model") == str(sp.tokenizer_path)
    assert bb.tokenizer_spec == f"hf:{bb.path / 'hf'}" and bb.tokenizer_path == bb.path / "hf"
    assert sp.tokenizer().kind == "sentencepiece" and bb.tokenizer().kind == "hf"
    assert bb.manifest["tokenizer_sha256"] == bb.tokenizer().sha256
    # the default kind stays out of the key: a cache built before tokenizer_kind existed is found
    cfg = _cfg(f"files:{corpus}/*.txt", **{"data.cache_dir": str(root)}).data
    source = data.sources.open_source(cfg)
    old_key = cache_lib._key({"v": cache_lib.FORMAT_VERSION, "source": source.fingerprint(), "vocab": cfg.vocab_size,
                              "max_docs": cfg.tokenizer_max_docs, "max_chars": cfg.tokenizer_max_chars,
                              "val_fraction": cfg.val_fraction})
    trained = {p.name: p for p in (root / "tokenizers").iterdir() if not p.name.startswith(".")}
    assert len(trained) == 2 and (trained[old_key] / "tokenizer.model").is_file()
    assert [k for k, p in trained.items() if (p / "hf" / "tokenizer.json").is_file()] == [k for k in trained if k != old_key]
    # rows decode back to the corpus text through either tokenizer
    first = (corpus / "doc000.txt").read_text()
    for c in (sp, bb):
        tok = c.tokenizer()
        row = np.concatenate([c.split("train")[i] for i in range(len(c.split("train")))])
        assert tok.decode(row[: len(tok.encode([first])[0])]) == first


@pytest.mark.slow  # 5-15 s: the fast lane stays short
def test_tiny_byte_bpe_run_exports_a_tokenizer_transformers_loads(tmp_path):
    corpus = write_word_corpus(tmp_path / "corpus", 24, words_per_doc=200)
    cfg = _cfg(f"files:{corpus}/*.txt", **{
        "data.tokenizer_kind": "byte_bpe", "data.val_fraction": 0.2, "train.steps": 2, "train.eval_every": 0,
        "log.wandb_mode": "disabled", "log.stats_every": 0, "checkpoint.stages": ((1, 10),)})
    run_lib.run(cfg, tmp_path / "run", log=_quiet)
    spec = json.loads((tmp_path / "run" / "run.json").read_text())["data"]["tokenizer"]
    assert spec.startswith("hf:")
    ours = tok_lib.load(spec)
    out = export_lib.export(tmp_path / "run", tmp_path / "hf")
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.model").exists()
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    texts = [MIXED, (corpus / "doc003.txt").read_text()]
    assert [theirs(t)["input_ids"] for t in texts] == ours.encode(texts)
    assert theirs.eos_token_id == ours.eos_id == json.loads((out / "config.json").read_text())["eos_token_id"]


# --- vocabularies over 65536 ---------------------------------------------------------------------

def _big_vocab_dir(d: Path, size: int = 70_000) -> Path:
    """A byte-level BPE of `size` ids whose merges make 'hello' a token past uint16 (filler in between)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    merged = ["he", "ll", "llo", "hello"]
    for i in range(size - len(vocab) - len(merged)):
        vocab[f"<filler{i}>"] = len(vocab)
    for m in merged:
        vocab[m] = len(vocab)
    tk = tok_lib.byte_level(HFCore(models.BPE(vocab=vocab, merges=[("h", "e"), ("l", "l"), ("ll", "o"),
                                                                     ("he", "llo")])))
    d.mkdir(parents=True)
    tk.save(str(d / "tokenizer.json"))
    return d


def test_a_vocabulary_over_65536_gets_uint32_rows_and_uint16_is_refused(tmp_path, monkeypatch):
    big = _big_vocab_dir(tmp_path / "big")
    tok = tok_lib.load(f"hf:{big}")
    assert tok.vocab_size == 70_000 and tok.dtype() == np.uint32
    assert tok.encode(["hello"])[0] == [69_999]
    assert tok_lib.dtype_for(65_536) == np.uint16 and tok_lib.dtype_for(65_537) == np.uint32
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"d{i}.txt").write_text("hello " * 100 + "hello")
    cfg = _cfg(f"files:{corpus}/*.txt", **{"data.tokenizer": f"hf:{big}", "data.val_fraction": 0.0})
    cache = data.prepare(cfg, tmp_path / "c", log=_quiet)
    rows = cache.split("train")
    assert cache.manifest["dtype"] == "uint32" and rows.dtype == np.uint32 and rows.max() == 69_999
    assert cache.tokenizer().decode(rows[0]).startswith("hello hello")
    # a manifest that says uint16 for these tokens is refused, naming the cache
    manifest = json.loads((cache.path / "manifest.json").read_text())
    (cache.path / "manifest.json").write_text(json.dumps({**manifest, "dtype": "uint16"}))
    with pytest.raises(DataError, match=r"token cache .*: uint16 cannot hold token ids up to 69999"):
        cache_lib.TokenCache.open(cache.path)
    # and a tokenizer whose rows would be uint16 is refused before anything is written
    monkeypatch.setattr(tok_lib.HFTokenizer, "dtype", lambda self: np.uint16)
    with pytest.raises(DataError, match=r"uint16 cannot hold token ids up to 69999 \(vocabulary of 70000\)"):
        data.prepare(cfg, tmp_path / "d", log=_quiet)
    assert not list((tmp_path / "d").glob("data/tokens/*/manifest.json"))


# --- bad inputs ---------------------------------------------------------------------------------------

def _other_model(d: Path, model) -> Path:
    d.mkdir(parents=True)
    tk = HFCore(model)
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(d / "tokenizer.json"))
    return d


def test_bad_tokenizers_fail_with_one_clear_error(tmp_path, trained):
    _, good, _ = trained
    only_vocab, only_merges, empty = tmp_path / "v", tmp_path / "m", tmp_path / "e"
    for d in (only_vocab, only_merges, empty):
        d.mkdir()
    shutil.copy(good / "vocab.json", only_vocab)
    shutil.copy(good / "merges.txt", only_merges)
    unigram = HFCore(models.Unigram())
    unigram.train_from_iterator(DOCS, trainers.UnigramTrainer(vocab_size=100, show_progress=False))
    (tmp_path / "uni").mkdir()
    unigram.save(str(tmp_path / "uni" / "tokenizer.json"))
    no_eos = tmp_path / "noeos"
    no_eos.mkdir()
    core = json.loads((good / "tokenizer.json").read_text())
    core["added_tokens"] = []
    core["model"]["vocab"] = {k if k != "<|endoftext|>" else "<other>": v for k, v in core["model"]["vocab"].items()}
    (no_eos / "tokenizer.json").write_text(json.dumps(core))
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "tokenizer.json").write_text("{not json")
    cases = [
        (f"hf:{tmp_path / 'nowhere'}", r"hf:.*nowhere'?: no such directory"),
        (f"hf:{only_vocab}", r"no tokenizer.json, and no merges.txt; .*vocab.json \+ merges.txt"),
        (f"hf:{only_merges}", r"no tokenizer.json, and no vocab.json;"),
        (f"hf:{empty}", r"no tokenizer.json, and no vocab.json or merges.txt"),
        (f"hf:{_other_model(tmp_path / 'wp', models.WordPiece({'[UNK]': 0, 'a': 1}, unk_token='[UNK]'))}",
         r"tokenizer.json has a WordPiece model; jaxlm takes BPE"),
        (f"hf:{tmp_path / 'uni'}", r"tokenizer.json has a Unigram model"),
        (f"hf:{_other_model(tmp_path / 'ws', models.BPE({'a': 0}, []))}", r"neither byte-level .* nor byte fallback"),
        (f"hf:{no_eos}", r"EOS token '<\|endoftext\|>' is not in the vocabulary"),
        (f"hf:{tmp_path / 'garbled'}", r"tokenizer.json is not valid JSON"),
        (str(good), r"is a directory; write hf:"),
        (str(tmp_path / "nope.model"), r"nope.model'?: no such file"),
    ]
    for spec, pattern in cases:
        with pytest.raises(DataError, match=pattern) as e:
            tok_lib.load(spec)
        assert spec in str(e.value)  # the message names the spec as written


def test_bad_kind_and_vocab_size_for_training(tmp_path):
    corpus = write_word_corpus(tmp_path / "corpus", 4, words_per_doc=50)
    with pytest.raises(DataError, match=r"data.tokenizer_kind='wordpiece': allowed: sentencepiece, byte_bpe"):
        data.prepare(_cfg(f"files:{corpus}/*.txt", **{"data.tokenizer_kind": "wordpiece"}), tmp_path / "a", log=_quiet)
    with pytest.raises(DataError, match=r"data.vocab_size=200 is too small for a byte-level BPE: at least 257"):
        data.prepare(_cfg(f"files:{corpus}/*.txt", **{"data.tokenizer_kind": "byte_bpe", "data.vocab_size": 200}),
                     tmp_path / "b", log=_quiet)


# --- SentencePiece runs exported for transformers -------------------------------------------------

def _stdlib_texts(n: int, skip_files: int = 0) -> list[str]:
    """`n` pieces of Python source (700 characters each, a few per file), from the stdlib's files in order."""
    import sysconfig

    out = []
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[skip_files:]:
        src = f.read_text(encoding="utf-8", errors="replace")
        out += [src[i:i + 700] for i in range(0, min(len(src), 7000), 700)]
        if len(out) >= n:
            return out[:n]
    return out


@pytest.mark.slow  # transformers' AutoTokenizer
def test_sentencepiece_export_tokenizes_in_transformers_as_in_jaxlm(tmp_path):
    # trained on some files, compared on others: merges the training text never needed are exercised too
    sp = tokenizer_train.train(_stdlib_texts(300) + DOCS, vocab_size=1024)
    tokenizer_export.save_for_hf(sp, tmp_path / "export")
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "export").iterdir()}
    assert tokenizer_export.for_model_dir(tmp_path / "export") == str(tmp_path / "export" / "tokenizer.model")
    texts = _stdlib_texts(990, skip_files=40) + [
        "def main(argv):", MIXED.replace("<|endoftext|>", ""), "", " ", "  x\n\n\t y  ", "🙂", "12345 678", "a" * 300,
        "日本語のテキスト", "\x00\x01 bytes"]
    assert len(texts) == 1000
    ours = sp.encode(texts)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert [theirs(t)["input_ids"] for t in texts] == ours
    assert theirs.eos_token_id == sp.eos_id == 1 and theirs.eos_token == "</s>"
    assert len(theirs) == sp.vocab_size == 1024
    assert theirs.decode(theirs("def main(argv):")["input_ids"]) == "def main(argv):"
    assert all(theirs.decode(ids) == t for ids, t in zip(ours, texts))
    # jaxlm reads the HF files alone (an export whose tokenizer.model was removed) to the same ids
    (tmp_path / "export" / "tokenizer.model").unlink()
    assert tok_lib.load(tokenizer_export.for_model_dir(tmp_path / "export")).encode(texts) == ours


def test_sentencepiece_models_jaxlm_cannot_convert_exactly_are_refused():
    from sentencepiece import sentencepiece_model_pb2

    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(tokenizer_train.train(_stdlib_texts(300), vocab_size=1024).proto)
    m.normalizer_spec.add_dummy_prefix = True
    with pytest.raises(DataError, match="has a dummy prefix; only jaxlm's own kind"):
        tokenizer_export.sentencepiece_to_hf(m.SerializeToString())
