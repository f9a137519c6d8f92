"""Corpus sources, each named by one string (``data.source``):

``stdlib``              the running Python's standard library source (``*.py`` under
                        ``sysconfig.get_paths()["stdlib"]``, site-packages excluded), files sorted:
                        the offline default, the same on every run of the same Python.
``files:GLOB``          plain text / markdown files (``.gz`` too); a file is a document, or split on
                        ``data.doc_separator``.
``jsonl:GLOB``          JSON Lines (``.gz`` too) with the text in ``data.text_field``; lines without
                        it fail or are skipped and counted (``data.on_missing_field``).
``tfds:NAME[:SPLIT]``   a prepared TFDS dataset read through its array_record data source (no
                        TensorFlow), from ``data.tfds_data_dir``; text in ``data.text_field``.
                        Its ``validation`` split is used when it has one.
``parquet:GLOB``        Parquet files, the text in column ``data.text_field``, streamed by record batch.
``hf:DIR``              a Hugging Face ``datasets`` directory (``save_to_disk`` output, or Arrow cache
                        files), read with pyarrow; its ``validation`` split is used when it has one.
                        (As a data.source; ``hf:DIR`` in data.tokenizer names a tokenizer.)
``tokens:GLOB``         pre-tokenized shards (nanoGPT's uint16 ``.bin``, llm.c's headered ``.bin``;
                        ``jaxlm.data.shards``) made with ``data.tokenizer``: no tokenization, the
                        ids are checked against its vocabulary; a document ends at each EOS.
``tokens:DIR``          nanoGPT's prepared directory: ``train.bin`` trains, ``val.bin`` is the
                        validation split; its ``meta.pkl`` character vocabulary (``shakespeare_char``)
                        is the tokenizer (``jaxlm.data.chars``), else ``data.tokenizer`` must name the
                        one the ids were made with (GPT-2's, for ``data/shakespeare``).

Every GLOB / DIR may be local or an object-store URL (``gs://bucket/corpus/*.parquet``).

The validation split: the documents of ``data.val_source`` (a source spec) when it is set, instead of
the source's own (then unused); else the source's own where it has one; else ``data.val_fraction``
held out (``jaxlm.data.splits``):
documents by hash (identical documents land in the same split), or, where the corpus has too few
documents for that (one file), the last ``data.val_fraction`` of its text.
Non-UTF-8 bytes are decoded with replacement and counted.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

from jaxlm.config_rules import SOURCE_FORMS, SOURCE_NAMES
from jaxlm.data import columnar, splits, storage
from jaxlm.data.splits import held_out, held_out_tokens  # noqa: F401  (also reached as sources.held_out)
from jaxlm.errors import DataError

SPLITS = ("train", "validation")
KINDS, NAMES = SOURCE_FORMS, SOURCE_NAMES  # every form of a single source (config_rules: validated there)
# The readers defined in modules that build on this one, registered as they are imported (the package's
# __init__ imports them): kind -> Source class (token_source: tokens:), and the wrapper of data.val_source.
OPENERS: dict = {}
WITH_VALIDATION: list = []
MIX = "mix:W*SOURCE,W*SOURCE,... (a mixture)"
_UNDECIDED = object()


@dataclasses.dataclass
class Counters:
    """What reading the corpus noticed; recorded in the cache manifest."""

    documents: int = 0
    empty_documents: int = 0
    replaced_bytes_documents: int = 0  # documents with non-UTF-8 bytes (decoded with U+FFFD)
    missing_field: int = 0  # jsonl lines without the text field (skipped)


class Source:
    """A corpus: documents of a split, in a fixed order, plus a fingerprint of what was read."""

    spec: str
    has_validation = False
    pretokenized = False  # True: token_chunks() gives ids, raw_documents() has no text
    unit = "characters"  # what the tail split (jaxlm.data.splits) measures

    def __init__(self, spec: str, data_cfg):
        self.spec, self.cfg = spec, data_cfg
        self.counters = Counters()
        self._tail = _UNDECIDED

    def raw_documents(self, split: str) -> Iterator[str]:  # implemented by subclasses
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What identifies the corpus for the cache key (cheap: names, sizes, mtimes)."""
        return {"spec": self.spec}

    def own_tokenizer(self):
        """The tokenizer the corpus comes with (nanoGPT's meta.pkl), used when data.tokenizer is ''; None."""
        return None

    def documents(self, split: str) -> Iterator[str]:
        """Non-empty documents of `split` ('train' or 'validation'), capped by data.max_docs."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        cap = self.cfg.max_docs or None
        f = self.cfg.val_fraction
        if self.has_validation or f <= 0:
            docs = self._nonempty(self.raw_documents(split)) if self.has_validation or split == "train" else iter(())
        elif (at := self.tail_cut()) is None:
            docs = (d for d in self._nonempty(self.raw_documents("train")) if held_out(d, f) == (split == "validation"))
        else:
            docs = splits.tail(itertools.islice(self._nonempty(self.raw_documents("train")), cap), at, split)
        n = 0
        for doc in docs:
            if not doc.strip():  # (the piece of a document cut by the tail split)
                continue
            self.counters.documents += 1
            yield doc
            n += 1
            if cap and n >= cap:
                return

    def _nonempty(self, docs: Iterator[str]) -> Iterator[str]:
        for doc in docs:
            if doc.strip():
                yield doc
            else:
                self.counters.empty_documents += 1

    def holds_out(self) -> bool:
        """Whether data.val_fraction makes the validation split (no split of the source's own)."""
        return not self.has_validation and self.cfg.val_fraction > 0

    def tail_cut(self) -> tuple[int, int] | None:
        """Where the tail split starts validation (``splits.cut``), or None where documents are held out by
        hash; decided once, by a pass over the documents that counts nothing."""
        if self._tail is _UNDECIDED:
            saved, self.counters = self.counters, Counters()
            try:
                lengths = self._tail_lengths()
            finally:
                self.counters = saved
            self._tail = None if lengths is None else splits.cut(lengths, self.cfg.val_fraction)
            self._n_docs = 0 if lengths is None else len(lengths)
        return self._tail

    def _tail_lengths(self) -> list[int] | None:
        """``splits.decide`` over this corpus's documents."""
        f = self.cfg.val_fraction
        return splits.decide(self._nonempty(self.raw_documents("train")), lambda d: held_out(d, f), self.cfg.max_docs)

    def split_record(self) -> dict | None:
        """What the cache manifest records of a tail split (``splits.describe`` reads it); None otherwise."""
        if not self.holds_out() or self.tail_cut() is None:
            return None
        return {"rule": splits.TAIL, "fraction": self.cfg.val_fraction, "unit": self.unit,
                "documents": self._n_docs, "at_boundary": self._tail[1] == 0}

    def _text(self, value, where: str) -> str | None:
        """A column's value as text; None for a missing one when data.on_missing_field=skip."""
        if isinstance(value, bytes):
            return self._decode(value)
        if isinstance(value, str):
            return value
        if self.cfg.on_missing_field == "skip":
            self.counters.missing_field += 1
            return None
        raise DataError(f"{where}: a row without text in data.text_field={self.cfg.text_field!r} (null); "
                        "set data.on_missing_field=skip to skip such rows")

    def _decode(self, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.counters.replaced_bytes_documents += 1
            return data.decode("utf-8", errors="replace")


BINARY_PROBE = 8192  # bytes of a files: file looked at for NUL bytes (text never has them)


def _glob(pattern: str, field: str) -> list[str]:
    return storage.expand(pattern, field)


def _read_bytes(path) -> bytes:
    return storage.read_bytes(str(path))


def _file_fingerprint(paths) -> str:
    return storage.fingerprint([str(p) for p in paths])


class FilesSource(Source):
    def __init__(self, spec, data_cfg, pattern):
        super().__init__(spec, data_cfg)
        self.paths = _glob(pattern, "files")

    def fingerprint(self):
        return {"spec": self.spec, "files": _file_fingerprint(self.paths), "sep": self.cfg.doc_separator}

    def raw_documents(self, split):
        sep = self.cfg.doc_separator.encode("utf-8")
        for p in self.paths:
            raw = _read_bytes(p)
            if b"\0" in raw[:BINARY_PROBE]:
                raise DataError(f"data.source={self.spec!r}: {p} is not a text file (NUL bytes in its first "
                                f"{BINARY_PROBE:,}: an image, an archive, a binary?); remove it from the glob")
            # each document decoded on its own, so the non-UTF-8 count is of documents, not files
            yield from (self._decode(d) for d in (raw.split(sep) if sep else [raw]))


class StdlibSource(FilesSource):
    def __init__(self, spec, data_cfg):
        Source.__init__(self, spec, data_cfg)
        root = Path(sysconfig.get_paths()["stdlib"])
        self.paths = sorted(_stdlib_files(root))
        if not self.paths:
            raise DataError(f"data.source=stdlib: no .py files under {root}; is this Python's stdlib installed?")

    def fingerprint(self):
        return {"spec": self.spec, "python": sys.version.split()[0], "files": _file_fingerprint(self.paths)}


def _stdlib_files(root: Path):
    """The *.py files under `root`, not under site-packages, dist-packages or __pycache__ (which are not
    entered: site-packages alone can hold tens of thousands of files), symlinked directories not followed."""
    skip = {"site-packages", "dist-packages", "__pycache__"}
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in skip]
        yield from (Path(d) / n for n in names if n.endswith(".py"))


class JsonlSource(Source):
    def __init__(self, spec, data_cfg, pattern):
        super().__init__(spec, data_cfg)
        self.paths = _glob(pattern, "jsonl")

    def fingerprint(self):
        return {"spec": self.spec, "files": _file_fingerprint(self.paths), "field": self.cfg.text_field,
                "on_missing": self.cfg.on_missing_field}

    def raw_documents(self, split):
        field = self.cfg.text_field
        for p in self.paths:
            # JSON Lines separates records on "\n" only (U+2028 and the like may stand inside a string)
            for lineno, raw in enumerate(_read_bytes(p).split(b"\n"), 1):
                if not raw.strip():
                    continue
                line = self._decode(raw)
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg}); fix or remove the line") from None
                text = record.get(field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    if self.cfg.on_missing_field == "skip":
                        self.counters.missing_field += 1
                        continue
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise DataError(
                        f"{p}:{lineno}: no string field data.text_field={field!r} (found {keys}); "
                        "set data.text_field, or data.on_missing_field=skip to skip such lines"
                    )
                yield text


class TfdsSource(Source):
    def __init__(self, spec, data_cfg, name, split):
        super().__init__(spec, data_cfg)
        import tensorflow_datasets as tfds  # heavy; only tfds: sources need it

        self.name, self.split = name, split or "train"
        data_dir = data_cfg.tfds_data_dir or None
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # DatasetNotFoundError and friends
            try:  # registered builder code only: listing community datasets needs the network
                registered = tfds.core.registered.list_imported_builders()
            except Exception:
                registered = []
            known = difflib.get_close_matches(name.split("/")[0], registered, n=3)
            raise DataError(
                f"data.source=tfds:{name}: unknown TFDS dataset ({type(e).__name__})"
                + (f"; did you mean {', '.join(known)}?" if known else "")
            ) from None
        if not builder.is_prepared():
            raise DataError(
                f"data.source=tfds:{name}: not prepared in data.tfds_data_dir={data_dir or builder.data_dir!r}. "
                f"Nothing downloads here: prepare it where there is network (tfds build {name} --data_dir=DIR "
                "--file_format=array_record) and point data.tfds_data_dir at DIR"
            )
        self.splits = set(builder.info.splits.keys())
        if self.split not in self.splits:
            raise DataError(f"data.source={spec}: no split {self.split!r}; the dataset has {sorted(self.splits)}")
        self.has_validation = "validation" in self.splits and self.split == "train"
        self.data_dir = data_dir
        self.version = str(builder.info.version)
        self._tfds = tfds

    def fingerprint(self):
        return {"spec": self.spec, "version": self.version, "data_dir": str(self.data_dir),
                "field": self.cfg.text_field}

    def raw_documents(self, split):
        tfds_split = self.split if split == "train" else "validation"
        try:
            ds = self._tfds.data_source(self.name, split=tfds_split, data_dir=self.data_dir)
        except Exception as e:
            raise DataError(
                f"data.source=tfds:{self.name}: cannot open split {tfds_split!r} as an array_record data source "
                f"({e}); prepare it with --file_format=array_record"
            ) from None
        field = self.cfg.text_field
        for i in range(len(ds)):
            record = ds[i]
            if field not in record:
                raise DataError(f"data.source=tfds:{self.name}: records have no field data.text_field={field!r}; "
                                f"fields: {sorted(record)}")
            text = record[field]
            yield self._decode(text) if isinstance(text, bytes) else str(text)


class ParquetSource(Source):
    def __init__(self, spec, data_cfg, pattern):
        super().__init__(spec, data_cfg)
        self.paths = _glob(pattern, "parquet")

    def fingerprint(self):
        return {"spec": self.spec, "files": _file_fingerprint(self.paths), "field": self.cfg.text_field,
                "on_missing": self.cfg.on_missing_field}

    def raw_documents(self, split):
        for p in self.paths:
            for value in columnar.parquet_texts(p, self.cfg.text_field):
                if (text := self._text(value, p)) is not None:
                    yield text


class ArrowSource(Source):
    """``hf:DIR``: a datasets directory; its train split, and its validation split when it has one."""

    def __init__(self, spec, data_cfg, directory):
        super().__init__(spec, data_cfg)
        self.layout = columnar.arrow_layout(directory.rstrip("/"))
        if not self.layout.get("train"):
            raise DataError(f"data.source={spec}: the datasets directory has no train split (splits: "
                            f"{sorted(self.layout)}); point it at a directory with one")
        self.has_validation = bool(self.layout.get("validation"))

    def fingerprint(self):
        files = [f for split in sorted(self.layout) for f in self.layout[split]]
        return {"spec": self.spec, "files": _file_fingerprint(files), "splits": sorted(self.layout),
                "field": self.cfg.text_field, "on_missing": self.cfg.on_missing_field}

    def raw_documents(self, split):
        for p in self.layout[split]:
            for value in columnar.arrow_texts(p, self.cfg.text_field):
                if (text := self._text(value, p)) is not None:
                    yield text


def open_source(data_cfg) -> Source:
    """The Source named by ``data_cfg.source`` (with ``data_cfg.val_source`` as its validation split when
    set); fails with the accepted forms on a bad spec."""
    if data_cfg.get("val_source", ""):
        main, val = copy.deepcopy(data_cfg), copy.deepcopy(data_cfg)
        for c in (main, val):
            c.val_source, c.val_fraction = "", 0.0  # each read whole
        val.source = data_cfg.val_source
        try:
            val_src = _open(val)
        except DataError as e:
            raise DataError(f"data.val_source: {str(e).removeprefix('data.source=')}") from None
        return WITH_VALIDATION[0](_open(main), val_src, data_cfg)
    return _open(data_cfg)


def _open(data_cfg) -> Source:
    spec = data_cfg.source
    kind, _, rest = spec.partition(":")
    if kind == "stdlib" and not rest:
        return StdlibSource(spec, data_cfg)
    if kind == "files" and rest:
        return FilesSource(spec, data_cfg, rest)
    if kind == "jsonl" and rest:
        return JsonlSource(spec, data_cfg, rest)
    if kind == "tfds" and rest:
        name, _, split = rest.partition(":")
        return TfdsSource(spec, data_cfg, name, split)
    if kind == "parquet" and rest:
        return ParquetSource(spec, data_cfg, rest)
    if kind == "hf" and rest:
        return ArrowSource(spec, data_cfg, rest)
    if kind in OPENERS and rest:
        return OPENERS[kind](spec, data_cfg, rest)
    if kind == "mix":
        raise DataError(f"data.source={spec!r}: a mixture is read only to train (its components' caches); "
                        "where documents are needed, give one of its components")
    raise DataError(f"data.source={spec!r}: not understood; use one of {KINDS}, {MIX}")
