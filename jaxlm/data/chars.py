"""A character vocabulary as a tokenizer: nanoGPT's ``meta.pkl`` (``data/shakespeare_char/prepare.py``
writes the sorted characters of a text as ``stoi``/``itos``), lossless on the characters it holds.

    tok = tokenizer.load("char:DIR/meta.pkl")   # or char:CACHE/tokenizer.chars.json, jaxlm's own copy
    tok.encode(texts)  # [[stoi[c] for c in text]]; a character outside the vocabulary is one DataError naming it
    tok.decode(ids)    # "".join(itos[i]); EOS (and any id past the characters) decodes to nothing

The vocabulary has no end-of-text token, which jaxlm needs between documents: EOS is one more id,
``len(itos)`` (a model of nanoGPT's 65 Shakespeare characters has 66 ids; nanoGPT's .bin files never
hold it). ``meta.pkl`` is read by an unpickler that refuses every class and function, so it builds plain
dicts, lists, strings and integers only: unpickling anything else can run code.

An export (``jaxlm.data.tokenizer_export``) writes ``tokenizer.chars.json``, which jaxlm reads back,
and the Hugging Face equivalent (``to_hf``: a BPE without merges over the characters, so that
``AutoTokenizer`` gives the same ids; unlike jaxlm it drops a character outside the vocabulary).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models

from jaxlm.data import tokenizer as tok_lib
from jaxlm.data.tokenizer import CHAR_FILE as FILE  # jaxlm's copy of the vocabulary (a cache's, an export's)
from jaxlm.data.tokenizer import CHAR_PREFIX as PREFIX
from jaxlm.data.tokenizer import EOS_TOKEN, HFTokenizer, dtype_for
from jaxlm.errors import DataError


class CharTokenizer:
    """One id per character (``itos``), and EOS after them."""

    kind = "char"

    def __init__(self, itos: Sequence[str], path: str | None = None):
        self.itos, self.path = list(itos), path
        where = path or "the character vocabulary"
        if not self.itos or any(not isinstance(c, str) or len(c) != 1 for c in self.itos):
            raise DataError(f"{where}: a character vocabulary is a non-empty list of single characters")
        if len(set(self.itos)) != len(self.itos):
            raise DataError(f"{where}: a character appears twice in the vocabulary")
        self.eos_id = len(self.itos)
        self.vocab_size = len(self.itos) + 1
        self.json = json.dumps({"type": "char", "itos": self.itos, "eos_token": EOS_TOKEN}, ensure_ascii=False)
        self.sha256 = hashlib.sha256(self.json.encode()).hexdigest()
        points = np.array([ord(c) for c in self.itos])
        self._table = np.full(int(points.max()) + 2, -1, np.int64)  # code point -> id; the last: all beyond
        self._table[points] = np.arange(len(self.itos))

    def ids(self, text: str) -> np.ndarray:
        """The ids of one text; a character outside the vocabulary fails, naming it and where it is."""
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), "<u4")
        ids = self._table[np.minimum(points, len(self._table) - 1)]
        if ids.size and int(ids.min()) < 0:
            i = int(np.argmax(ids < 0))
            raise DataError(f"the character {text[i]!r} (U+{ord(text[i]):04X}, at character {i:,} of a text) is not "
                            f"in the {len(self.itos)}-character vocabulary of {self.path or 'this tokenizer'}; a "
                            "character tokenizer encodes only its own characters: remove it from the text, or make "
                            "the vocabulary from a text that has it")
        return ids

    def encode(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Token ids of each text (no EOS)."""
        return [self.ids(t).tolist() for t in texts]

    def encode_flat(self, texts: Sequence[str], num_threads: int | None = None, eos: bool = True) -> np.ndarray:
        """The texts' ids, each text followed by EOS (`eos`), as one array of dtype() (what a cache shard holds)."""
        tail = [np.array([self.eos_id])] if eos else []
        parts = [p for t in texts for p in [self.ids(t), *tail]]
        return np.concatenate(parts).astype(self.dtype()) if parts else np.zeros(0, self.dtype())

    def decode(self, ids: Iterable[int]) -> str:
        n = len(self.itos)
        return "".join(self.itos[i] for i in map(int, ids) if 0 <= i < n)

    def dtype(self):
        return dtype_for(self.vocab_size)

    def save(self, directory: str | os.PathLike) -> str:
        """Writes ``tokenizer.chars.json`` into `directory`; returns its spec (``char:PATH``)."""
        path = Path(directory) / FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.json, encoding="utf-8")
        return PREFIX + str(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CharTokenizer":
        """A ``meta.pkl`` (nanoGPT's) or a ``tokenizer.chars.json`` (jaxlm's)."""
        p = Path(path)
        where = f"data.tokenizer={PREFIX}{p}"
        if not p.is_file():
            raise DataError(f"{where}: no such file; give nanoGPT's meta.pkl or a {FILE}")
        if p.suffix == ".pkl":
            return from_meta(p.read_bytes(), str(p))
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
            itos = obj["itos"] if isinstance(obj, dict) and obj.get("type") == "char" else None
        except (ValueError, UnicodeDecodeError, KeyError):
            itos = None
        if not isinstance(itos, list):
            raise DataError(f"{where}: not a character vocabulary ({FILE}: a JSON object with type 'char' and itos)")
        return cls(itos, str(p))


class _PlainUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, strings and numbers only: every class or function is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}")


def from_meta(data: bytes, where: str) -> CharTokenizer:
    """The vocabulary of nanoGPT's meta.pkl (`data`, read from `where`): a dict with ``itos`` {id: char}
    and/or ``stoi`` {char: id} over ids 0..n-1 (and ``vocab_size`` n)."""
    try:
        meta = _PlainUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # a refused class, a truncated or foreign file
        raise DataError(f"{where}: not read ({' '.join(str(e).split())[:120] or type(e).__name__}); only a pickled "
                        "plain dict of characters and integers is read, as unpickling anything else can run code") from None
    keys = sorted(map(str, meta)) if isinstance(meta, dict) else type(meta).__name__
    itos, stoi = (meta.get("itos"), meta.get("stoi")) if isinstance(meta, dict) else (None, None)
    if not isinstance(itos, dict) and isinstance(stoi, dict):
        itos = {i: c for c, i in stoi.items()}
    if not isinstance(itos, dict) or not itos:
        raise DataError(f"{where}: no character vocabulary (itos/stoi) in it (found {keys}); a directory of GPT-2 "
                        "BPE ids has no meta.pkl: remove it and give data.tokenizer")
    n = len(itos)
    if set(itos) != set(range(n)) or any(type(k) is not int for k in itos):
        raise DataError(f"{where}: itos's ids are not 0..{n - 1}; this is not nanoGPT's character vocabulary")
    if isinstance(stoi, dict) and stoi != {c: i for i, c in itos.items()}:
        raise DataError(f"{where}: stoi and itos disagree; this meta.pkl is damaged")
    if meta.get("vocab_size", n) != n:
        raise DataError(f"{where}: vocab_size={meta['vocab_size']!r} but itos has {n} characters")
    return CharTokenizer([itos[i] for i in range(n)], where)


def to_hf(tok: CharTokenizer) -> HFTokenizer:
    """The Hugging Face tokenizer with the same ids: a BPE without merges over the characters, with no
    pre-tokenizer (every character is its own token), EOS as a special token, decoded by concatenation."""
    vocab = {c: i for i, c in enumerate(tok.itos)}
    vocab[EOS_TOKEN] = tok.eos_id
    tk = tokenizers.Tokenizer(models.BPE(vocab, [], fuse_unk=False))
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([tokenizers.AddedToken(EOS_TOKEN, special=True, normalized=False)])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN,
              "clean_up_tokenization_spaces": False, "model_max_length": 2**30}
    return HFTokenizer(tk, eos_token=EOS_TOKEN, config=config, special_tokens_map={"eos_token": EOS_TOKEN})


tok_lib.LOADERS[PREFIX] = CharTokenizer.load  # tokenizer.load("char:PATH") finds it
