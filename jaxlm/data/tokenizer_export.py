"""Tokenizers beside an exported model: written so that ``transformers.AutoTokenizer`` gives jaxlm's
ids, and found again by jaxlm's tools (``jaxlm.export`` writes them; ``jaxlm.eval --hf`` and
``jaxlm.probe --hf`` read them).

    tokenizer_export.save_for_hf(tok, out_dir)      # tokenizer.json (+ tokenizer.model for SentencePiece)
    spec = tokenizer_export.for_model_dir(out_dir)  # what tokenizer.load takes
    hf_tok = tokenizer_export.sentencepiece_to_hf(sp_model_bytes)

A byte-level BPE is already in Hugging Face's format. A SentencePiece model is converted to a
``tokenizers`` pipeline with the same ids on every text (:func:`sentencepiece_to_hf`); as in
transformers, its special tokens (``</s>``, ``<unk>``) written inside a text encode as themselves,
where SentencePiece spells them out.
"""

from __future__ import annotations

import os
from pathlib import Path

import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import decoders, models, normalizers

from jaxlm.data import chars
from jaxlm.data.tokenizer import HF_PREFIX, AnyTokenizer, HFTokenizer
from jaxlm.errors import DataError

# SentencePiece's piece types (sentencepiece_model.proto)
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED = 1, 2, 3, 4
_SP_SPACE = "\u2581"  # SentencePiece's visible space


def sentencepiece_to_hf(model_bytes: bytes) -> "HFTokenizer":
    """A SentencePiece BPE model (as :func:`train` makes them) as a ``tokenizers`` pipeline that gives
    the same ids on every text, so ``transformers.AutoTokenizer`` on an export tokenizes as jaxlm does.

    SentencePiece's BPE encoder merges, anywhere in the text, the adjacent pair whose concatenation is
    the piece of highest score (leftmost first); a ``tokenizers`` BPE applies the merge of lowest rank.
    So the merges are every split (a, b) of every piece into two pieces, ranked by the merged piece's
    score (its id: pieces are stored by score). The rest: spaces become U+2581 (the normalizer; no
    pre-tokenizer, as SentencePiece splits nothing at encoding), characters outside the vocabulary fall
    back to ``<0xXX>`` byte pieces, and the decoder undoes both. Models with a normalisation rule, a
    dummy prefix or another model type are refused: they would need more than this."""
    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(model_bytes)
    ns, ts = m.normalizer_spec, m.trainer_spec
    unsupported = [why for why, bad in (
        (f"model type {ts.model_type} (BPE is {ts.BPE})", ts.model_type != ts.BPE),
        (f"normalization rule {ns.name!r}", ns.name != "identity" or bool(ns.precompiled_charsmap)),
        ("a dummy prefix", ns.add_dummy_prefix), ("extra whitespace removal", ns.remove_extra_whitespaces),
        ("whitespace as a suffix", ts.treat_whitespace_as_suffix), ("no byte fallback", not ts.byte_fallback)) if bad]
    if unsupported:
        raise DataError(f"this SentencePiece model has {', '.join(unsupported)}; only jaxlm's own kind (BPE, identity "
                        "normalisation, byte fallback, no dummy prefix) converts exactly to a Hugging Face tokenizer")
    vocab = {p.piece: i for i, p in enumerate(m.pieces)}
    mergeable = {p.piece for p in m.pieces if p.type in (_SP_NORMAL, _SP_USER_DEFINED)}
    merges = sorted((i, vocab[s[:k]], vocab[s[k:]]) for i, p in enumerate(m.pieces) if p.type == _SP_NORMAL
                    for s in [p.piece] for k in range(1, len(s)) if s[:k] in mergeable and s[k:] in mergeable)
    pieces = [p.piece for p in m.pieces]
    unk = pieces[m.trainer_spec.unk_id]
    tk = tokenizers.Tokenizer(models.BPE(vocab, [(pieces[a], pieces[b]) for _, a, b in merges], unk_token=unk,
                                         byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Replace(" ", _SP_SPACE)
    tk.decoder = decoders.Sequence([decoders.Replace(_SP_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    special = [p.piece for p in m.pieces if p.type in (_SP_UNKNOWN, _SP_CONTROL)]
    tk.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in special])
    eos = pieces[m.trainer_spec.eos_id]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "unk_token": unk,
              "clean_up_tokenization_spaces": False, "model_max_length": 2**30}
    return HFTokenizer(tk, eos_token=eos, config=config, special_tokens_map={"eos_token": eos, "unk_token": unk})


def save_for_hf(tok: AnyTokenizer, directory: str | os.PathLike) -> None:
    """Writes `tok` beside an exported model: the Hugging Face files (tokenizer.json, ...), which
    ``transformers.AutoTokenizer`` reproduces exactly, and for SentencePiece also ``tokenizer.model``,
    for a character vocabulary ``tokenizer.chars.json`` (the run's own file, which jaxlm prefers when it
    loads the directory: :func:`for_model_dir`)."""
    tok.save(directory)
    if tok.kind == "sentencepiece":
        sentencepiece_to_hf(tok.proto).save(directory)
    elif tok.kind == "char":
        chars.to_hf(tok).save(directory)


def for_model_dir(directory: str | os.PathLike) -> str:
    """The spec of the tokenizer saved in a model directory (an export, or a Hugging Face model):
    its ``tokenizer.model`` or ``tokenizer.chars.json`` if it has one, else its Hugging Face files."""
    d = Path(directory)
    if (d / "tokenizer.model").is_file():
        return str(d / "tokenizer.model")
    if (d / chars.FILE).is_file():
        return chars.PREFIX + str(d / chars.FILE)
    if (d / "tokenizer.json").is_file() or (d / "vocab.json").is_file():
        return HF_PREFIX + str(d)
    raise DataError(f"{d}: no tokenizer (tokenizer.model, tokenizer.json, or vocab.json + merges.txt); give the "
                    "model's tokenizer with --tokenizer=hf:DIR or --tokenizer=PATH.model")
