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

Sources without a validation split get a deterministic held-out split by document hash
(``data.val_fraction`` of documents; identical documents land in the same split).
Non-UTF-8 bytes are decoded with replacement and counted.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob as glob_lib
import gzip
import hashlib
import json
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

from jaxlm.errors import DataError

SPLITS = ("train", "validation")


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

    def __init__(self, spec: str, data_cfg):
        self.spec, self.cfg = spec, data_cfg
        self.counters = Counters()

    def raw_documents(self, split: str) -> Iterator[str]:  # implemented by subclasses
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What identifies the corpus for the cache key (cheap: names, sizes, mtimes)."""
        return {"spec": self.spec}

    def documents(self, split: str) -> Iterator[str]:
        """Non-empty documents of `split` ('train' or 'validation'), capped by data.max_docs."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        cap = self.cfg.max_docs or None
        n = 0
        native = split if self.has_validation else "train"
        for doc in self.raw_documents(native):
            if not doc.strip():
                self.counters.empty_documents += 1
                continue
            if not self.has_validation and held_out(doc, self.cfg.val_fraction) != (split == "validation"):
                continue
            self.counters.documents += 1
            yield doc
            n += 1
            if cap and n >= cap:
                return

    def _decode(self, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.counters.replaced_bytes_documents += 1
            return data.decode("utf-8", errors="replace")


def held_out(text: str, fraction: float) -> bool:
    """Deterministic: the document goes to validation iff its hash falls below `fraction`."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "big")
    return h < fraction * 2**64


def _glob(pattern: str, field: str) -> list[Path]:
    paths = sorted(Path(p) for p in glob_lib.glob(pattern, recursive=True) if Path(p).is_file())
    if not paths:
        raise DataError(
            f"data.source={field}:{pattern!r} matched no files (relative to {Path.cwd()}); "
            "check the pattern (use ** for subdirectories) or the working directory"
        )
    return paths


def _read_bytes(path: Path) -> bytes:
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        return f.read()


def _file_fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class FilesSource(Source):
    def __init__(self, spec, data_cfg, pattern):
        super().__init__(spec, data_cfg)
        self.paths = _glob(pattern, "files")

    def fingerprint(self):
        return {"spec": self.spec, "files": _file_fingerprint(self.paths), "sep": self.cfg.doc_separator}

    def raw_documents(self, split):
        sep = self.cfg.doc_separator
        for p in self.paths:
            text = self._decode(_read_bytes(p))
            yield from (text.split(sep) if sep else [text])


class StdlibSource(FilesSource):
    def __init__(self, spec, data_cfg):
        Source.__init__(self, spec, data_cfg)
        root = Path(sysconfig.get_paths()["stdlib"])
        self.paths = sorted(
            p for p in root.rglob("*.py")
            if "site-packages" not in p.parts and "dist-packages" not in p.parts and "__pycache__" not in p.parts
        )
        if not self.paths:
            raise DataError(f"data.source=stdlib: no .py files under {root}; is this Python's stdlib installed?")

    def fingerprint(self):
        return {"spec": self.spec, "python": sys.version.split()[0], "files": _file_fingerprint(self.paths)}


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
            for lineno, line in enumerate(self._decode(_read_bytes(p)).splitlines(), 1):
                if not line.strip():
                    continue
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


def open_source(data_cfg) -> Source:
    """The Source named by ``data_cfg.source``; fails with the accepted forms on a bad spec."""
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
    raise DataError(
        f"data.source={spec!r}: not understood; use one of stdlib, files:GLOB, jsonl:GLOB, tfds:NAME[:SPLIT]"
    )
