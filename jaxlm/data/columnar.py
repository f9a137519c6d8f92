"""Text columns of Parquet files and of Hugging Face ``datasets`` Arrow files, read with pyarrow.

``parquet_texts(path, field)``   the `field` column of one Parquet file, streamed by record batch
                                 (row groups are never all in memory);
``arrow_layout(directory)``      the Arrow files of each split of a ``datasets`` directory:
                                 ``save_to_disk`` output (``dataset_dict.json`` + one directory per
                                 split, or ``state.json`` for one split) or a directory of Arrow cache
                                 files as the hub cache keeps them (``NAME-train.arrow``,
                                 ``NAME-validation-00000-of-00002.arrow``, ...);
``arrow_texts(path, field)``     the `field` column of one Arrow file (IPC stream, as ``datasets``
                                 writes it, or IPC file), by record batch.

A value that is null yields ``None`` (the source counts or refuses it, ``data.on_missing_field``);
binary values are returned as bytes for the source to decode. No ``datasets`` import, no network.
"""

from __future__ import annotations

import json
import re
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from jaxlm.data import storage
from jaxlm.errors import DataError

BATCH_ROWS = 1024


def _column(batch: pa.RecordBatch, field: str, path: str, names: list[str]) -> Iterator:
    col = batch.column(batch.schema.get_field_index(field))
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_binary(col.type)
            or pa.types.is_large_binary(col.type)):
        raise DataError(f"{path}: column data.text_field={field!r} holds {col.type}, not text; set data.text_field "
                        f"to a string column (columns: {names})")
    yield from col.to_pylist()


def _missing(path: str, field: str, names: list[str]) -> DataError:
    return DataError(f"{path}: no column data.text_field={field!r} (columns: {names}); set data.text_field to the "
                     "column that holds the text")


def parquet_texts(path: str, field: str) -> Iterator[str | bytes | None]:
    with storage.open_binary(path, decompress=False) as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())[:200]}); the file is "
                            "damaged or not Parquet: replace it or leave it out of the glob") from None
        names = pf.schema_arrow.names
        if field not in names:
            raise _missing(path, field, names)
        try:
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[field]):
                yield from _column(batch, field, path, names)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: a damaged Parquet row group ({' '.join(str(e).split())[:200]})") from None


def _arrow_reader(f, path: str):
    try:
        return pa.ipc.open_stream(f)  # datasets writes IPC streams
    except pa.ArrowInvalid:
        f.seek(0)
    try:
        return pa.ipc.open_file(f)
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: not an Arrow file ({e}); data.source=hf:DIR takes a datasets directory "
                        "(save_to_disk output or Arrow cache files)") from None


def arrow_texts(path: str, field: str) -> Iterator[str | bytes | None]:
    with storage.open_binary(path, decompress=False) as f:
        reader = _arrow_reader(f, path)
        names = reader.schema.names
        if field not in names:
            raise _missing(path, field, names)
        if isinstance(reader, pa.ipc.RecordBatchFileReader):
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
        for batch in batches:
            yield from _column(batch, field, path, names)


def _state_files(directory: str) -> list[str]:
    state = json.loads(storage.read_bytes(storage.join(directory, "state.json")))
    return [storage.join(directory, d["filename"]) for d in state.get("_data_files", [])]


_SPLIT = re.compile(r"-(train|validation|test)(?:-\d+-of-\d+)?\.arrow$")


def arrow_layout(directory: str) -> dict[str, list[str]]:
    """{split: Arrow files in order} of a datasets directory; one DataError when it is none."""
    spec = f"data.source=hf:{directory}"
    if not storage.is_dir(directory):
        raise DataError(f"{spec}: no such directory (hf: as a data.source is a datasets directory on disk or in a "
                        "bucket: save_to_disk output or Arrow cache files; hf: in data.tokenizer is a tokenizer)")
    if storage.exists(storage.join(directory, "dataset_dict.json")):
        splits = json.loads(storage.read_bytes(storage.join(directory, "dataset_dict.json"))).get("splits", [])
        return {s: _state_files(storage.join(directory, s)) for s in splits}
    if storage.exists(storage.join(directory, "state.json")):
        return {"train": _state_files(directory)}
    try:
        files = storage.expand(storage.join(directory, "**", "*.arrow"), "hf")
    except DataError:
        raise DataError(f"{spec}: neither save_to_disk output (dataset_dict.json or state.json) nor Arrow files "
                        "(*.arrow); point it at a datasets directory") from None
    named: dict[str, list[str]] = {}
    for f in files:
        m = _SPLIT.search(f)
        named.setdefault(m.group(1) if m else "train", []).append(f)
    return named
