"""SentencePiece tokenizer: train one (BPE, byte fallback, fixed inputs) or load a given ``.model``.

Trained models are lossless on any text: no normalisation, whitespace kept as is, unknown
characters fall back to bytes, so ``decode(encode(text)) == text``. Document boundaries are
marked by ``eos_id``. Training is deterministic: the same documents (first ``max_docs``, at most
``max_chars`` characters, in corpus order), no input shuffling, a fixed thread count.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from jaxlm.errors import DataError

UNK_ID, EOS_ID = 0, 1
# SentencePiece's BPE training gives a different model for a different thread count (measured:
# 1, 2 and 4 threads, three models), so it is fixed here, never os.cpu_count(): the same corpus
# must give the same tokenizer on every machine and every host of a multi-host run.
TRAIN_THREADS = 8


class Tokenizer:
    def __init__(self, model_bytes: bytes, path: str | None = None):
        self.proto = model_bytes
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        eos = self.sp.eos_id()
        if eos < 0:
            raise DataError(f"tokenizer {path or ''}: the SentencePiece model has no EOS id; "
                            "jaxlm needs one to separate documents (train it with eos_id>=0)")
        self.eos_id = eos

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Token ids of each text (no EOS), in parallel over CPU cores."""
        return self.sp.encode(list(texts), num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def dtype(self):
        return np.uint16 if self.vocab_size <= 2**16 else np.uint32

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"data.tokenizer={str(path)!r}: no such file; give a SentencePiece .model or '' to train one")
        try:
            return cls(path.read_bytes(), str(path))
        except RuntimeError as e:
            raise DataError(f"data.tokenizer={str(path)!r}: not a SentencePiece model ({e})") from None


def _lines(docs: Iterable[str], max_docs: int, max_chars: int):
    chars = 0
    for i, doc in enumerate(docs):
        if (max_docs and i >= max_docs) or (max_chars and chars >= max_chars):
            return
        chars += len(doc)
        for line in doc.split("\n"):
            if line.strip():
                yield line


def train(docs: Iterable[str], vocab_size: int, *, max_docs: int = 20_000, max_chars: int = 50_000_000) -> Tokenizer:
    """Trains a BPE SentencePiece model on the first documents of `docs`."""
    buf = io.BytesIO()
    lines = _Guarded(_lines(docs, max_docs, max_chars))
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            unk_id=UNK_ID, eos_id=EOS_ID, bos_id=-1, pad_id=-1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=TRAIN_THREADS,
            minloglevel=2,
        )
    except RuntimeError as e:
        if lines.error is not None:
            raise lines.error from None
        msg = str(e)
        m = re.search(r"<= (\d+)", msg)
        if "Vocabulary size" in msg or m:
            limit = f" (at most {m.group(1)} for this corpus)" if m else ""
            raise DataError(
                f"data.vocab_size={vocab_size} is more than the corpus can support{limit}; "
                "lower data.vocab_size or raise data.tokenizer_max_docs / use a larger corpus"
            ) from None
        if "empty" in msg.lower() or "no sentence" in msg.lower():
            raise DataError("the corpus has no text to train a tokenizer on; check data.source") from None
        raise DataError(f"training the SentencePiece tokenizer failed: {msg}") from None
    if lines.error is not None:
        raise lines.error from None
    return Tokenizer(buf.getvalue())


class _Guarded:
    """An iterator handed to SentencePiece's C++ trainer that keeps an exception raised while reading the
    corpus (a malformed line, say) to re-raise it unchanged afterwards: through the C++ layer it would
    come back as a RuntimeError with a stack dump appended."""

    def __init__(self, it):
        self.it, self.error = it, None

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.it)
        except StopIteration:
            raise
        except Exception as e:
            self.error = e
            raise StopIteration from None
