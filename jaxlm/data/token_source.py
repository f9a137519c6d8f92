"""``tokens:GLOB`` and ``tokens:DIR``: token ids already made (``jaxlm.data.shards`` reads the files).

``tokens:GLOB``  shards in corpus order, made with ``data.tokenizer``; a document ends at each EOS. The
                 validation split is held out by ``data.val_fraction`` (``jaxlm.data.splits``).
``tokens:DIR``   nanoGPT's prepared directory (``data/<name>/prepare.py``): ``train.bin`` is the
                 training split and ``val.bin``, when present, the validation split. Where the directory
                 holds ``meta.pkl`` (``shakespeare_char``: a character vocabulary), that vocabulary is the
                 tokenizer (``jaxlm.data.chars``; data.tokenizer stays ''); where it holds none (GPT-2 BPE,
                 ``data/shakespeare``), ``data.tokenizer`` names the tokenizer the ids were made with.

A glob that matches both ``train.bin`` and ``val.bin`` of one directory is refused: it would train on
the validation split.
"""

from __future__ import annotations

import posixpath
from typing import Iterator

import numpy as np

from jaxlm.data import chars, shards, sources, splits, storage
from jaxlm.data import tokenizer as tok_lib
from jaxlm.data.sources import Source, _file_fingerprint, _glob
from jaxlm.errors import DataError

NANOGPT_FILES = ("train.bin", "val.bin", "meta.pkl")
GPT2_HINT = "hf:DIR holding GPT-2's vocab.json + merges.txt (or its tokenizer.json)"


class TokensSource(Source):
    """Token ids in corpus order, checked against the tokenizer's vocabulary; a document ends at each EOS."""

    pretokenized = True
    unit = "tokens"

    def __init__(self, spec, data_cfg, pattern):
        super().__init__(spec, data_cfg)
        self.format = data_cfg.get("token_format", "auto")
        self._tok = None
        self.meta = None
        if storage.is_dir(pattern):
            self._directory(pattern.rstrip("/"))
        else:
            self.paths = {"train": _glob(pattern, "tokens")}
            _refuse_train_and_val(spec, self.paths["train"])
        if self.meta is None and not data_cfg.tokenizer:
            raise DataError(f"data.source={spec}: token ids need data.tokenizer, the tokenizer they were made with "
                            f"({GPT2_HINT} for GPT-2's); none can be trained on ids")

    def _directory(self, d: str) -> None:
        found = {n: storage.join(d, n) for n in NANOGPT_FILES if storage.exists(storage.join(d, n))}
        if "train.bin" not in found:
            raise DataError(f"data.source={self.spec}: {d} has no train.bin; give nanoGPT's prepared directory "
                            "(train.bin, val.bin, meta.pkl for a character vocabulary) or a glob of token files")
        self.paths = {"train": [found["train.bin"]]}
        if "val.bin" in found:
            self.paths["validation"] = [found["val.bin"]]
            self.has_validation = True
        if "meta.pkl" in found:
            if self.cfg.tokenizer:
                raise DataError(f"data.source={self.spec}: its meta.pkl is the vocabulary of its ids; leave "
                                f"data.tokenizer unset (it is {self.cfg.tokenizer!r})")
            self.meta = found["meta.pkl"]
            self._tok = chars.from_meta(storage.read_bytes(self.meta), self.meta)

    def own_tokenizer(self):
        return self._tok

    def use_tokenizer(self, tok) -> None:
        """The run's tokenizer, loaded by the cache (from its local copy where data.tokenizer is a URL), for
        what reads the ids before the cache exists (the split's decision, ``documents``)."""
        self._tok = self._tok or tok

    def _tokenizer_name(self) -> str:
        return self.cfg.tokenizer or f"{chars.PREFIX}{self.meta}"

    def fingerprint(self):
        files = [p for split in sorted(self.paths) for p in self.paths[split]] + ([self.meta] if self.meta else [])
        return {"spec": self.spec, "files": _file_fingerprint(files), "format": self.format}

    def raw_documents(self, split):
        raise DataError(f"data.source={self.spec}: holds token ids, not text; use it to train (the cache), not "
                        "where text is needed")

    def documents(self, split):
        """The documents of `split` as text, decoded with the tokenizer (what jaxlm.eval reads): the same
        split as the cache's."""
        tok = self._tok or tok_lib.load(self.cfg.tokenizer)
        for _, flat in self.token_chunks(split, tok.vocab_size, tok.eos_id, np.int64):
            for doc in shards.documents(flat, tok.eos_id):
                text = tok.decode(doc[:-1] if doc[-1] == tok.eos_id else doc)
                if text.strip():
                    yield text

    def _shards(self, split: str, vocab_size: int, eos_id: int) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
        """(ids, its documents) per shard of `split` (the source's own) in order; a document cut at the end
        of a shard continues in the next one (llm.c's shards)."""
        paths = self.paths.get(split, [])
        carry = None
        for i, p in enumerate(paths):
            ids = shards.read_shard(p, self.format)
            shards.check_ids(ids, vocab_size, p, self._tokenizer_name())
            if carry is not None and carry.size:
                ids = np.concatenate([carry, ids])
            if i < len(paths) - 1:
                ends = np.flatnonzero(ids == eos_id)
                cut = int(ends[-1]) + 1 if ends.size else 0
                ids, carry = ids[:cut], ids[cut:]
            yield ids, shards.documents(ids, eos_id)

    def token_chunks(self, split: str, vocab_size: int, eos_id: int, dtype) -> Iterator[tuple[int, np.ndarray]]:
        """(documents, ids) per shard of `split`, in corpus order, checked against the vocabulary."""
        self._check_args = (vocab_size, eos_id)  # (what the tail split's deciding pass reads with)
        fraction = self.cfg.val_fraction
        at = self.tail_cut() if self.holds_out() else None
        first = 0
        for ids, docs in self._shards("train" if not self.has_validation else split, vocab_size, eos_id):
            if self.has_validation or fraction <= 0:
                keep, flat = (docs, ids) if self.has_validation or split == "train" else ([], ids[:0])
            else:
                if at is None:
                    keep = [d for d in docs if splits.held_out_tokens(d, fraction) == (split == "validation")]
                else:
                    keep = list(splits.tail(docs, at, split, first))
                    first += len(docs)
                flat = np.concatenate(keep) if keep else ids[:0]
            self.counters.documents += len(keep)
            yield len(keep), flat.astype(dtype)

    def _tail_lengths(self) -> list[int] | None:
        f = self.cfg.val_fraction
        if not hasattr(self, "_check_args"):  # (decided before any chunk was read: the cache's key)
            tok = self._tok or tok_lib.load(self.cfg.tokenizer)
            self._check_args = (tok.vocab_size, tok.eos_id)
        docs = (d for _, ds in self._shards("train", *self._check_args) for d in ds)
        return splits.decide(docs, lambda d: splits.held_out_tokens(d, f))


def _refuse_train_and_val(spec: str, paths: list[str]) -> None:
    """nanoGPT's train.bin and val.bin matched together by a glob: the run would train on its validation split."""
    names: dict[str, set[str]] = {}
    for p in paths:
        names.setdefault(posixpath.dirname(p), set()).add(posixpath.basename(p))
    for d, found in names.items():
        if {"train.bin", "val.bin"} <= found:
            raise DataError(f"data.source={spec}: matches both train.bin and val.bin of {d}, so training would read the "
                            f"validation split too; give the directory (tokens:{d}): its val.bin is then the "
                            "validation split")


sources.OPENERS["tokens"] = TokensSource  # data.source=tokens:... opens it
