"""Training a tokenizer on the corpus, when ``data.tokenizer`` names none, of ``data.tokenizer_kind``:

``sentencepiece`` (:func:`train`): BPE with byte fallback, fixed inputs. Lossless on any text: no
normalisation, whitespace kept as is, unknown characters fall back to bytes, so
``decode(encode(text)) == text``. Training is deterministic: the same documents (first ``max_docs``,
at most ``max_chars`` characters, in corpus order), no input shuffling, a fixed thread count.

``byte_bpe`` (:func:`train_byte_bpe`): GPT-2's scheme, trained with the ``tokenizers`` library: the
ByteLevel pre-tokenizer (GPT-2's split regex, no prefix space) over the same documents, ByteLevel
decoder, ``<|endoftext|>`` as EOS. Lossless too, deterministic, and saved in Hugging Face's format
(tokenizer.json, vocab.json + merges.txt, tokenizer_config.json), so ``transformers.AutoTokenizer``
loads it.

    tok = tokenizer_train.TRAINERS[kind](documents, vocab_size, max_docs=..., max_chars=...)
"""

from __future__ import annotations

import io
import re
from typing import Iterable

import sentencepiece as spm
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from jaxlm.data.tokenizer import EOS_TOKEN, HFTokenizer, Tokenizer, byte_level
from jaxlm.errors import DataError

UNK_ID, EOS_ID = 0, 1  # the SentencePiece model's reserved ids (no BOS, no padding)
DEFAULT_KIND = "sentencepiece"  # data.tokenizer_kind: what is trained when data.tokenizer is ''
# SentencePiece's BPE training gives a different model for a different thread count (measured:
# 1, 2 and 4 threads, three models), so it is fixed here, never os.cpu_count(): the same corpus
# must give the same tokenizer on every machine and every host of a multi-host run.
TRAIN_THREADS = 8


def _first(docs: Iterable[str], max_docs: int, max_chars: int):
    """The first documents: at most `max_docs`, stopping once `max_chars` characters are read (0 = no limit)."""
    chars = 0
    for i, doc in enumerate(docs):
        if (max_docs and i >= max_docs) or (max_chars and chars >= max_chars):
            return
        chars += len(doc)
        yield doc


def _lines(docs: Iterable[str], max_docs: int, max_chars: int):
    for doc in _first(docs, max_docs, max_chars):
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


def train_byte_bpe(docs: Iterable[str], vocab_size: int, *, max_docs: int = 20_000,
                   max_chars: int = 50_000_000) -> HFTokenizer:
    """Trains a GPT-2-style byte-level BPE (``tokenizers``) on the first documents of `docs`: the 256
    byte symbols, ``<|endoftext|>`` (id 0, the EOS), then merges up to `vocab_size` (fewer if the
    corpus runs out of pairs). Deterministic: merges are chosen by count, ties by pair, whatever the
    thread count."""
    floor = len(pre_tokenizers.ByteLevel.alphabet()) + 1
    if vocab_size < floor:
        raise DataError(f"data.vocab_size={vocab_size} is too small for a byte-level BPE: at least {floor} "
                        f"(256 bytes + {EOS_TOKEN})")
    seen = [0]

    def counted():
        for doc in _first(docs, max_docs, max_chars):
            seen[0] += 1
            yield doc

    tk = byte_level(tokenizers.Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(counted(), trainer)  # an exception raised reading the corpus comes back as is
    if not seen[0]:
        raise DataError("the corpus has no text to train a tokenizer on; check data.source")
    return HFTokenizer(tk)


# data.tokenizer_kind -> the trainer (both take docs, vocab_size, max_docs=, max_chars=)
TRAINERS = {"sentencepiece": train, "byte_bpe": train_byte_bpe}


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
        except BaseException as e:  # a signal's Interrupted or ^C too: re-raised once the trainer returns
            self.error = e
            raise StopIteration from None
