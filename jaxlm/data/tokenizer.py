"""Tokenizers: SentencePiece (``PATH.model``), Hugging Face byte-level BPE (``hf:DIR``) or a character
vocabulary (``char:PATH``: nanoGPT's meta.pkl, ``jaxlm.data.chars``), one interface.

    tok = tokenizer.load(spec)        # "PATH.model" | "hf:DIR" (tokenizer.json, or GPT-2's vocab.json + merges.txt)
                                      # | "char:PATH" (meta.pkl, or the tokenizer.chars.json jaxlm writes)
    tok.encode(texts) -> list[list[int]]  (a batch, in parallel over cores; no EOS added)
    tok.decode(ids) -> str;  tok.eos_id, tok.vocab_size, tok.sha256 (content hash: cache keys), tok.dtype(),
    tok.kind ("sentencepiece" | "hf" | "char"), tok.save(dir) -> the spec of the files written into dir

A tokenizer is trained on the corpus when none is given (:mod:`jaxlm.data.tokenizer_train`):
SentencePiece BPE with byte fallback, or GPT-2's byte-level BPE. As in transformers,
``<|endoftext|>`` written inside a byte-level BPE's text encodes as the EOS token.

Document boundaries are marked by ``eos_id``. An export writes either kind in transformers' format
(``jaxlm.data.tokenizer_export``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from jaxlm.data import fastbpe
from jaxlm.errors import DataError

HF_PREFIX = "hf:"
CHAR_PREFIX, CHAR_FILE = "char:", "tokenizer.chars.json"  # a character vocabulary (jaxlm.data.chars)
EOS_TOKEN = "<|endoftext|>"  # GPT-2's end of text, the EOS of byte_bpe and of GPT-2 files
SPOT_CHECK = 512  # every how many texts the fast engine's ids are checked against tokenizers' (HFTokenizer)
HF_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def cores() -> int:
    """The cores this process may run on (its affinity), for thread counts."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _flat(ids: list[list[int]], eos: int | None, dtype) -> np.ndarray:
    """The documents' ids as one array, each followed by `eos` (None: nothing between them)."""
    tail = [] if eos is None else [eos]
    return np.concatenate([np.asarray(d + tail, dtype) for d in ids]) if ids else np.zeros(0, dtype)


def dtype_for(vocab_size: int):
    """The row dtype of a token cache: uint16 while every id fits, else uint32."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def check_dtype(vocab_size: int, dtype, where: str) -> None:
    """Fails if `dtype` cannot hold every id of a `vocab_size` vocabulary."""
    dt = np.dtype(dtype)
    if vocab_size - 1 > np.iinfo(dt).max:
        raise DataError(f"{where}: {dt.name} cannot hold token ids up to {vocab_size - 1} (vocabulary of "
                        f"{vocab_size}); a vocabulary over 65536 needs uint32 rows. Delete that cache directory to "
                        "rebuild it")


class Tokenizer:
    """A SentencePiece model."""

    kind = "sentencepiece"

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
        return self.sp.encode(list(texts), num_threads=num_threads or cores())

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def encode_flat(self, texts: Sequence[str], num_threads: int | None = None, eos: bool = True) -> np.ndarray:
        """The texts' ids, each text followed by EOS (`eos`), as one array of dtype() (what a cache shard holds)."""
        return _flat(self.encode(texts, num_threads), self.eos_id if eos else None, self.dtype())

    def dtype(self):
        return dtype_for(self.vocab_size)

    def save(self, directory: str | os.PathLike) -> str:
        """Writes ``tokenizer.model`` into `directory`; returns its spec (the path)."""
        path = Path(directory) / "tokenizer.model"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.proto)
        return str(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            raise DataError(f"data.tokenizer={str(path)!r} is a directory; write hf:{path} for a Hugging Face "
                            "tokenizer (tokenizer.json, or vocab.json + merges.txt), or give a SentencePiece .model")
        if not path.is_file():
            raise DataError(f"data.tokenizer={str(path)!r}: no such file; give a SentencePiece .model, hf:DIR for a "
                            "Hugging Face tokenizer, or '' to train one")
        try:
            return cls(path.read_bytes(), str(path))
        except RuntimeError as e:
            raise DataError(f"data.tokenizer={str(path)!r}: not a SentencePiece model ({e})") from None


class HFTokenizer:
    """A Hugging Face ``tokenizers`` BPE tokenizer (byte-level, or with byte fallback), e.g. GPT-2's."""

    kind = "hf"

    def __init__(self, tk: tokenizers.Tokenizer, *, eos_token: str = EOS_TOKEN, config: dict | None = None,
                 special_tokens_map: dict | None = None, path: str | None = None, parsed: dict | None = None):
        self.tk, self.path = tk, path
        self.json = tk.to_str()
        self.eos_token = eos_token
        eos = tk.token_to_id(eos_token)
        if eos is None:
            raise DataError(f"data.tokenizer={_spec(path)!r}: the EOS token {eos_token!r} is not in the vocabulary; "
                            "jaxlm needs one to separate documents")
        self.eos_id = int(eos)
        # max id + 1: the ids the model's table must cover, also where added tokens leave a gap
        self.vocab_size = max(tk.get_vocab(with_added_tokens=True).values()) + 1
        # the whole pipeline as tokenizers serialises it, and the EOS chosen: what decides the tokens
        self.sha256 = hashlib.sha256(self.json.encode() + b"\0eos=" + eos_token.encode()).hexdigest()
        parsed = parsed if parsed is not None else json.loads(self.json)  # (the file's, when loaded)
        self.byte_level = _has_type(parsed.get("pre_tokenizer"), "ByteLevel")
        self.config = config if config is not None else self._default_config()
        self.special_tokens_map = special_tokens_map if special_tokens_map is not None else {
            k: eos_token for k in ("bos_token", "eos_token", "unk_token")}

    def _default_config(self) -> dict:
        # GPT2Tokenizer for a byte-level BPE (GPT-2's own class), else the generic tokenizer.json class
        return {"tokenizer_class": "GPT2Tokenizer" if self.byte_level else "PreTrainedTokenizerFast",
                "bos_token": self.eos_token, "eos_token": self.eos_token, "unk_token": self.eos_token,
                "add_prefix_space": False, "add_bos_token": False, "clean_up_tokenization_spaces": False,
                "model_max_length": 2**30}

    def encode(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Token ids of each text (no EOS), in parallel over CPU cores unless `num_threads` is 1. The
        fast engine encodes (``fastbpe``: fastokens), the first and every SPOT_CHECK-th text checked
        against ``tokenizers``: on a difference this tokenizer goes back to ``tokenizers`` for good."""
        texts = list(texts)
        if (fast := self._fast_ids(texts, num_threads)) is not None:
            ids, offsets = fast
            return [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
        if num_threads == 1:
            return [self.tk.encode(t, add_special_tokens=False).ids for t in texts]
        return [e.ids for e in self.tk.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_flat(self, texts: Sequence[str], num_threads: int | None = None, eos: bool = True) -> np.ndarray:
        """The texts' ids, each text followed by EOS (`eos`), as one array of dtype() (what a cache shard holds)."""
        texts, dtype = list(texts), self.dtype()
        if (fast := self._fast_ids(texts, num_threads)) is not None:
            ids, offsets = fast  # no Python list of ints on this path
            if eos:
                ids = np.insert(ids, offsets[1:].astype(np.intp), self.eos_id)
            return ids.astype(dtype, copy=False)
        return _flat(self.encode(texts, num_threads), self.eos_id if eos else None, dtype)

    def _fast_ids(self, texts: list[str], num_threads: int | None):
        """The fast engine's (ids, offsets) of `texts` (``fastbpe.encode_flat``), or None: no engine
        for this tokenizer, or its ids differ from tokenizers' on the first or a SPOT_CHECK-th text."""
        if (engine := self._fast()) is None:
            return None
        ids, offsets = fastbpe.encode_flat(engine, texts, one_core=num_threads == 1)
        if all(ids[offsets[i]:offsets[i + 1]].tolist() == self.tk.encode(texts[i], add_special_tokens=False).ids
               for i in range(0, len(texts), SPOT_CHECK)):
            return ids, offsets
        self._engine = False
        return None

    def _fast(self):
        if getattr(self, "_engine", None) is None:
            self._engine = fastbpe.engine(self.json) or False
        return self._engine or None

    def __getstate__(self):  # (to worker processes) the engine is rebuilt there
        return {k: v for k, v in self.__dict__.items() if k != "_engine"}

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def dtype(self):
        return dtype_for(self.vocab_size)

    def save(self, directory: str | os.PathLike) -> str:
        """Writes the Hugging Face files (tokenizer.json; vocab.json + merges.txt for a byte-level BPE;
        tokenizer_config.json, special_tokens_map.json) into `directory`; returns its spec ``hf:DIR``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "tokenizer.json").write_text(self.json, encoding="utf-8")
        if self.byte_level:
            self.tk.model.save(str(d))  # vocab.json + merges.txt, as GPT-2 ships them
        (d / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")
        (d / "special_tokens_map.json").write_text(json.dumps(self.special_tokens_map, indent=2, ensure_ascii=False) + "\n")
        return HF_PREFIX + str(d)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "HFTokenizer":
        d = Path(directory)
        spec = HF_PREFIX + str(d)
        if not d.is_dir():
            raise DataError(f"data.tokenizer={spec!r}: no such directory")
        config = _read_json(d / "tokenizer_config.json", spec)
        special = _read_json(d / "special_tokens_map.json", spec)
        eos = _token(config.get("eos_token")) or _token(special.get("eos_token")) or EOS_TOKEN
        if (d / "tokenizer.json").is_file():
            tk, parsed = _from_tokenizer_json(d / "tokenizer.json", spec)
        else:
            missing = [f for f in ("vocab.json", "merges.txt") if not (d / f).is_file()]
            if missing:
                raise DataError(f"data.tokenizer={spec!r}: no tokenizer.json, and no {' or '.join(missing)}; a Hugging "
                                "Face tokenizer directory has tokenizer.json, or vocab.json + merges.txt (GPT-2)")
            tk, parsed = _from_vocab_merges(d, spec, eos), None
        return cls(tk, eos_token=eos, config=config or None, special_tokens_map=special or None, path=str(d),
                   parsed=parsed)


AnyTokenizer = Tokenizer | HFTokenizer  # what load() returns: the interface in the module docstring
# Loaders of the tokenizers defined in modules that build on this one, registered as they are imported
# (the package's __init__ imports them): spec prefix -> loader (chars: nanoGPT's meta.pkl vocabulary).
LOADERS: dict = {}

def load(spec: str | os.PathLike) -> AnyTokenizer:
    """The tokenizer of `spec`: ``hf:DIR`` (Hugging Face files) or a SentencePiece ``.model`` path."""
    s = str(spec)
    if s.startswith(HF_PREFIX):
        return HFTokenizer.load(s[len(HF_PREFIX):])
    if s.startswith(CHAR_PREFIX):
        return LOADERS[CHAR_PREFIX](s[len(CHAR_PREFIX):])
    return Tokenizer.load(s)


def spec_path(spec: str) -> Path:
    """The file (SentencePiece, ``char:PATH``) or directory (``hf:DIR``) a spec names."""
    s = str(spec)
    for prefix in (HF_PREFIX, CHAR_PREFIX):
        if s.startswith(prefix):
            return Path(s[len(prefix):])
    return Path(s)


def store(tok: AnyTokenizer, directory: str | os.PathLike) -> str:
    """Saves `tok` in a cache directory: ``tokenizer.model``, ``tokenizer.chars.json``, or the HF files under
    ``hf/``; returns its spec."""
    return tok.save(Path(directory) / "hf" if tok.kind == "hf" else directory)


def stored(directory: str | os.PathLike) -> str | None:
    """The spec of the tokenizer :func:`store` saved in `directory`, or None if there is none."""
    d = Path(directory)
    if (d / "hf" / "tokenizer.json").is_file():
        return HF_PREFIX + str(d / "hf")
    if (d / "tokenizer.model").is_file():
        return str(d / "tokenizer.model")
    if (d / CHAR_FILE).is_file():
        return CHAR_PREFIX + str(d / CHAR_FILE)
    return None


def _spec(path) -> str:
    return HF_PREFIX + str(path) if path else "<trained>"


def _token(t) -> str | None:
    """A special token as transformers writes it: a string, or a dict with its content."""
    return t.get("content") if isinstance(t, dict) else t


def _read_json(path: Path, spec: str) -> dict:
    if not path.is_file():
        return {}
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"data.tokenizer={spec!r}: {path.name} is not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise DataError(f"data.tokenizer={spec!r}: {path.name} is not a JSON object")
    return out


def _has_type(node, name: str) -> bool:
    """Whether a serialised component (a pre-tokenizer, maybe a Sequence of them) has one of type `name`."""
    if isinstance(node, dict):
        return node.get("type") == name or any(_has_type(v, name) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, name) for v in node)
    return False


def _from_tokenizer_json(path: Path, spec: str) -> tuple[tokenizers.Tokenizer, dict]:
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise DataError(f"data.tokenizer={spec!r}: tokenizer.json is not valid JSON ({e})") from None
    model = (obj.get("model") or {}) if isinstance(obj, dict) else {}
    kind = model.get("type") or ("BPE" if "merges" in model else None)
    if kind != "BPE":
        raise DataError(f"data.tokenizer={spec!r}: tokenizer.json has a {kind or 'unknown'} model; jaxlm takes BPE "
                        "tokenizers that cover every byte (byte-level like GPT-2's, or with byte fallback)")
    if not (_has_type(obj.get("pre_tokenizer"), "ByteLevel") or model.get("byte_fallback")):
        raise DataError(f"data.tokenizer={spec!r}: tokenizer.json is a BPE that is neither byte-level (no ByteLevel "
                        "pre-tokenizer) nor byte fallback, so some text would have no tokens; use a byte-level BPE")
    try:
        return tokenizers.Tokenizer.from_str(text), obj
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise DataError(f"data.tokenizer={spec!r}: tokenizers cannot read tokenizer.json ({e})") from None


def byte_level(tk: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """GPT-2's pipeline around a BPE model (as transformers' GPT2 converter builds it)."""
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return tk


def _from_vocab_merges(d: Path, spec: str, eos: str) -> tokenizers.Tokenizer:
    try:
        tk = byte_level(tokenizers.Tokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt"))))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise DataError(f"data.tokenizer={spec!r}: vocab.json + merges.txt cannot be read ({e})") from None
    if tk.token_to_id(eos) is not None:  # special, as transformers registers it: never split, matched in text
        tk.add_special_tokens([tokenizers.AddedToken(eos, special=True, normalized=False)])
    return tk
