"""tiktoken as the engine of GPT-2-scheme byte-level BPEs: the ids of HF tokenizers, always."""

import sysconfig
from pathlib import Path

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from jaxlm.data import fastbpe, tokenizer

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


def test_tiktoken_gives_the_ids_of_tokenizers_on_real_text(texts, tmp_path):
    tok = tokenizer.train_byte_bpe(iter(texts[::2]), 1500)
    engine = fastbpe.encoding(tok.json)
    assert engine is not None
    want = [tok.tk.encode(t, add_special_tokens=False).ids for t in texts]
    assert [engine.encode(t, allowed_special="all") for t in texts] == want
    assert tok.encode(texts) == want and tok.encode(texts, num_threads=1) == want and tok._engine
    assert want[-2].count(tok.eos_id) == 1  # <|endoftext|> in a text is the EOS, as in transformers
    # GPT-2's own file layout (vocab.json + merges.txt, no tokenizer.json) takes the same engine
    d = tmp_path / "gpt2"
    tok.save(d)
    (d / "tokenizer.json").unlink()
    files = tokenizer.load(f"hf:{d}")
    assert fastbpe.encoding(files.json) is not None and files.encode(texts[:50]) == want[:50]


def test_a_tokenizer_tiktoken_would_encode_differently_keeps_tokenizers(texts):
    # merges he, ll, hel, hell: tokenizers gives "hell" -> he ll (no merge joins them); tiktoken, which
    # merges by the rank of the merged token, would give hell
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tokenizer.EOS_TOKEN: 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    for t in ("he", "ll", "hel", "hell"):
        vocab[t] = len(vocab)
    tk = tokenizer._byte_level(tokenizers.Tokenizer(models.BPE(vocab, [("h", "e"), ("l", "l"), ("he", "l"),
                                                                        ("hel", "l")])))
    tk.add_special_tokens([tokenizers.AddedToken(tokenizer.EOS_TOKEN, special=True, normalized=False)])
    tok = tokenizer.HFTokenizer(tk)
    assert fastbpe.encoding(tok.json).encode("hell") == [vocab["hell"]]  # the difference is real
    assert tok.encode(["hell"]) == [[vocab["he"], vocab["ll"]]] and tok._engine is False
    assert tok.encode(texts[:5]) == [tk.encode(t, add_special_tokens=False).ids for t in texts[:5]]


def test_other_schemes_are_left_to_tokenizers():
    tk = tokenizers.Tokenizer(models.BPE({"a": 0, "b": 1, tokenizer.EOS_TOKEN: 2}, [], byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert fastbpe.encoding(tk.to_str()) is None
