"""The fast BPE engines give the ids of HF tokenizers: fastokens (jaxlm's engine) always, tiktoken (the
bench's baseline) on GPT-2-scheme tokenizers."""

import sysconfig
from pathlib import Path

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from jaxlm.data import fastbpe, tokenizer, tokenizer_train

from conftest import SHARED_DATA


def _real_texts() -> list[str]:
    """Prose, wiki markup and code: what the identity of ids is checked on."""
    texts = [p.read_text(errors="replace") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:12]]
    for name in ("tinyshakespeare.txt", "wikitext-2/valid.txt"):
        if (SHARED_DATA / name).exists():
            texts += [t for t in (SHARED_DATA / name).read_text()[:150_000].split("\n\n") if t.strip()]
    return texts + ["ends here<|endoftext|>and goes on", "  spaces\t\ttabs\n\n\nünïcödé 😀 1234567"]


@pytest.fixture(scope="module")
def texts():
    return _real_texts()


def test_the_engines_give_the_ids_of_tokenizers_on_real_text(texts, tmp_path):
    tok = tokenizer_train.train_byte_bpe(iter(texts[::2]), 1500)
    want = [tok.tk.encode(t, add_special_tokens=False).ids for t in texts]
    ids, offsets = fastbpe.encode_flat(fastbpe.engine(tok.json), texts)
    assert [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == want
    one = fastbpe.encode_flat(fastbpe.engine(tok.json), texts, one_core=True)
    assert (one[0] == ids).all() and (one[1] == offsets).all()
    assert tok.encode(texts) == want and tok.encode(texts, num_threads=1) == want and tok._engine
    flat = tok.encode_flat(texts)
    assert flat.tolist() == [i for w in want for i in (*w, tok.eos_id)] and flat.dtype == tok.dtype()
    assert want[-2].count(tok.eos_id) == 1  # <|endoftext|> in a text is the EOS, as in transformers
    tt = fastbpe.encoding(tok.json)  # the bench's baseline encodes the same text the same way
    assert tt is not None and [tt.encode(t, allowed_special="all") for t in texts] == want
    # GPT-2's own file layout (vocab.json + merges.txt, no tokenizer.json) takes the same engines
    d = tmp_path / "gpt2"
    tok.save(d)
    (d / "tokenizer.json").unlink()
    files = tokenizer.load(f"hf:{d}")
    assert fastbpe.encoding(files.json) is not None and files.encode(texts[:50]) == want[:50] and files._engine


def test_merges_apply_in_merges_order_and_an_engine_that_differs_is_dropped(texts):
    # merges he, ll, hel, hell: tokenizers gives "hell" -> he ll (no merge joins them); tiktoken, which
    # merges by the rank of the merged token, gives hell
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tokenizer.EOS_TOKEN: 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    for t in ("he", "ll", "hel", "hell"):
        vocab[t] = len(vocab)
    tk = tokenizer.byte_level(tokenizers.Tokenizer(models.BPE(vocab, [("h", "e"), ("l", "l"), ("he", "l"),
                                                                       ("hel", "l")])))
    tk.add_special_tokens([tokenizers.AddedToken(tokenizer.EOS_TOKEN, special=True, normalized=False)])
    tok = tokenizer.HFTokenizer(tk)
    assert fastbpe.encoding(tok.json).encode("hell") == [vocab["hell"]]  # tiktoken's difference is real
    assert tok.encode(["hell"]) == [[vocab["he"], vocab["ll"]]] and tok._engine  # fastokens has none
    # an engine whose ids differ (another tokenizer's) is caught by the spot check and dropped for good
    other = tokenizer_train.train_byte_bpe(iter(texts[1::2]), 1200)
    tok._engine = fastbpe.engine(other.json)
    want = [tk.encode(t, add_special_tokens=False).ids for t in texts[:5]]
    assert tok.encode(texts[:5]) == want and tok._engine is False
    assert tok.encode(texts[:5]) == want


def test_other_schemes_take_fastokens_but_not_the_tiktoken_baseline(texts):
    vocab = {"a": 0, "b": 1, tokenizer.EOS_TOKEN: 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    tk = tokenizers.Tokenizer(models.BPE(vocab, [], byte_fallback=True))
    tk.add_special_tokens([tokenizers.AddedToken(tokenizer.EOS_TOKEN, special=True, normalized=False)])
    assert fastbpe.encoding(tk.to_str()) is None
    ids, offsets = fastbpe.encode_flat(fastbpe.engine(tk.to_str()), texts[:20])
    assert [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == \
        [tk.encode(t, add_special_tokens=False).ids for t in texts[:20]]
    assert fastbpe.engine('{"model": {"type": "Unigram", "vocab": []}}') is None  # tokenizers encodes those
