"""Fast engines for Hugging Face BPE tokenizers: fastokens to encode, tiktoken as the bench's baseline.

``engine(tokenizer_json)`` is fastokens' Rust tokenizer built from the tokenizer's own
tokenizer.json (nothing is downloaded), or None when fastokens cannot read it (then ``tokenizers``
encodes). It gives the ids of ``tokenizers`` -- the same pre-tokenizer regex, BPE merges applied in
merges order, added tokens matched in the text -- several times faster per core (a test checks
identical ids on real text; ``HFTokenizer`` also spot-checks every build against ``tokenizers``).
``encode_flat(engine, texts)`` returns every text's ids as one array and where each text starts.

``encoding(tokenizer_json)`` is tiktoken's Encoding of a GPT-2-scheme tokenizer -- a BPE model over
the byte-level alphabet, the ByteLevel pre-tokenizer with GPT-2's split regex and no prefix space,
no normaliser, special tokens only as added tokens -- or None for any other: the like-for-like
tiktoken that ``jaxlm.data.bench`` measures the cache build against. tiktoken merges the adjacent
pair whose merged token has the lowest rank; the BPE of ``tokenizers`` applies merges in merges.txt
order. The two agree when each merge makes a new token and the merged tokens' ids increase with the
merge order -- as in GPT-2's files and in every tokenizer ``tokenizer_train.train_byte_bpe`` makes --
which :func:`encoding` checks.
"""

from __future__ import annotations

import json
from typing import Sequence

import fastokens
import numpy as np
import tiktoken

# GPT-2's pre-tokenizer regex (tiktoken's gpt2 and the ByteLevel pre-tokenizer of tokenizers)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in characters -> the bytes they stand for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_gpt2_scheme(obj: dict) -> bool:
    model, pre = obj.get("model") or {}, obj.get("pre_tokenizer") or {}
    return (model.get("type") == "BPE" and not model.get("dropout") and not model.get("byte_fallback")
            and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")
            and obj.get("normalizer") is None and pre.get("type") == "ByteLevel"
            and not pre.get("add_prefix_space") and pre.get("use_regex", True))


def encoding(tokenizer_json: str | dict) -> tiktoken.Encoding | None:
    """tiktoken's Encoding for a GPT-2-scheme tokenizer.json (its text, or parsed), or None if
    tiktoken would differ."""
    obj = json.loads(tokenizer_json) if isinstance(tokenizer_json, str) else tokenizer_json
    if not _is_gpt2_scheme(obj):
        return None
    added = {t["content"]: int(t["id"]) for t in obj.get("added_tokens", [])}
    if any(not t.get("special") or t.get("single_word") or t.get("lstrip") or t.get("rstrip")
           for t in obj.get("added_tokens", [])):
        return None
    dec = byte_decoder()  # stand-ins -> latin-1 bytes; any other character -> one latin-1 cannot encode
    to_bytes = str.maketrans({**{chr(c): "\uffff" for c in range(256)}, **{c: chr(b) for c, b in dec.items()}})
    try:
        ranks = {tok.translate(to_bytes).encode("latin-1"): int(i) for tok, i in obj["model"]["vocab"].items()
                 if tok not in added}
    except UnicodeEncodeError:  # a token outside the byte-level alphabet
        return None
    if len(ranks) != len(obj["model"]["vocab"]) - len(set(added) & set(obj["model"]["vocab"])):
        return None
    if any(bytes([b]) not in ranks for b in range(256)):
        return None
    vocab = obj["model"]["vocab"]
    last = -1
    for m in obj["model"].get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        i = vocab.get(a + b)
        if i is None or i <= last:  # merged tokens' ids must follow the merge order
            return None
        last = i
    return tiktoken.Encoding(name="jaxlm-byte-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens=added)


def engine(tokenizer_json: str) -> fastokens.Tokenizer | None:
    """fastokens' tokenizer for a tokenizer.json (its text), or None where fastokens cannot read it."""
    try:
        return fastokens.Tokenizer.from_json_str(tokenizer_json)
    except Exception:  # an unsupported model or component: ValueError, or whatever the binding raises
        return None


def encode_flat(tok: fastokens.Tokenizer, texts: Sequence[str], one_core: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(ids, offsets): the texts' ids concatenated (uint32, no EOS) and len(texts)+1 offsets, text i's
    ids being ``ids[offsets[i]:offsets[i+1]]``; in parallel over the cores (fastokens' thread pool)
    unless `one_core`. Added tokens written in a text (``<|endoftext|>``) encode as themselves."""
    if not one_core or len(texts) <= 1:
        ids, offsets = tok.encode_batch_flat(list(texts))
        return np.frombuffer(ids, np.uint32), np.frombuffer(offsets, np.uint64)
    parts = [np.frombuffer(tok.encode_batch_flat([t])[0], np.uint32) for t in texts]  # one text per call: one core
    offsets = np.zeros(len(parts) + 1, np.uint64)
    np.cumsum([p.size for p in parts], out=offsets[1:])
    return np.concatenate(parts), offsets
