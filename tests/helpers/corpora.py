"""Small corpora in the formats the data sources read, written by the tests themselves."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jaxlm import config

from conftest import ROOT


def docs_of(corpus: Path) -> list[str]:
    return [p.read_text() for p in sorted(corpus.glob("*.txt"))]


def cfg_for(source, **over):
    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py")
    cfg.data.source = source
    cfg.data.vocab_size = 300
    cfg.data.val_fraction = 0.1
    cfg.train.seq_len = 32
    cfg.train.batch_size = 8
    for k, v in over.items():
        config.set_by_path(cfg, k, v)
    return cfg


def write_jsonl(d: Path, docs: list[str]) -> str:
    d.mkdir(parents=True, exist_ok=True)
    (d / "a.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(docs)))
    return f"jsonl:{d}/*.jsonl"


def write_parquet(d: Path, docs: list[str], files: int = 2) -> str:
    """`docs` over `files` Parquet files with small row groups (so reading streams several batches)."""
    d.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // files)
    for i in range(files):
        part = docs[i * per:(i + 1) * per]
        pq.write_table(pa.table({"id": list(range(len(part))), "text": part}), d / f"part-{i:05d}.parquet",
                       row_group_size=7)
    return f"parquet:{d}/*.parquet"


def write_datasets_dir(d: Path, docs: list[str], validation: list[str] | None = None) -> str:
    import datasets  # the writer of the format under test (save_to_disk)

    splits = {"train": datasets.Dataset.from_dict({"text": docs})}
    if validation is not None:
        splits["validation"] = datasets.Dataset.from_dict({"text": validation})
        datasets.DatasetDict(splits).save_to_disk(str(d))
    else:
        splits["train"].save_to_disk(str(d))
    return f"hf:{d}"


def token_stream(tok, docs) -> np.ndarray:
    return np.concatenate([np.asarray(ids + [tok.eos_id], np.uint16) for ids in tok.encode(docs)])


def write_llmc(path: Path, ids: np.ndarray, magic=20240520, version=1, count=None) -> Path:
    header = np.zeros(256, np.int32)
    header[:3] = magic, version, len(ids) if count is None else count
    path.write_bytes(header.tobytes() + ids.astype(np.uint16).tobytes())
    return path
