"""Pre-tokenized token shards (``data.source=tokens:GLOB``): nanoGPT's and llm.c's ``.bin`` files.

``raw``   nanoGPT's ``train.bin``: a flat array of ``uint16`` token ids, nothing else.
``llmc``  llm.c / modded-nanogpt (``fineweb_train_000001.bin``): a header of 256 little-endian
          int32 -- magic, version, token count -- then the tokens: magic 20240520 version 1 holds
          ``uint16`` ids (GPT-2), magic 20240801 version 7 ``uint32`` (LLaMA 3).

``data.token_format`` is ``auto`` (a file whose header has a known magic is ``llmc``; a file whose
header is consistent with its size but has another magic is refused as damaged; anything else is
``raw``), or ``llmc`` / ``raw`` to insist. A header that disagrees with the body's length, a wrong
magic or version, and a token id outside the tokenizer's vocabulary are each one ``DataError``.
"""

from __future__ import annotations

import numpy as np

from jaxlm.data import storage
from jaxlm.errors import DataError

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# llm.c's data_common.py: magic -> (version, token dtype)
LLMC = {20240520: (1, np.uint16), 20240801: (7, np.uint32)}
FORMATS = ("auto", "llmc", "raw")


def _header(head: bytes) -> np.ndarray | None:
    return np.frombuffer(head[:HEADER_BYTES], "<i4") if len(head) >= HEADER_BYTES else None


def read_shard(path: str, fmt: str = "auto") -> np.ndarray:
    """The token ids of one shard (uint16 or uint32), checked against its header."""
    if fmt not in FORMATS:
        raise DataError(f"data.token_format={fmt!r}: allowed: {', '.join(FORMATS)}")
    data = storage.read_bytes(path)
    h = _header(data)
    body = len(data) - HEADER_BYTES
    if h is not None and int(h[0]) in LLMC and fmt != "raw":
        version, dtype = LLMC[int(h[0])]
        if int(h[1]) != version:
            raise DataError(f"{path}: llm.c token shard of version {int(h[1])} for magic {int(h[0])}, expected "
                            f"{version}; this shard was written by another tool or is damaged")
        count, item = int(h[2]), np.dtype(dtype).itemsize
        if count < 0 or count * item != body:
            raise DataError(f"{path}: llm.c header says {count:,} tokens ({count * item:,} bytes) but the body has "
                            f"{body:,} bytes; the shard is truncated or damaged: copy it again")
        return np.frombuffer(data, dtype, offset=HEADER_BYTES)
    if fmt == "llmc" or (fmt == "auto" and h is not None and any(
            int(h[2]) * np.dtype(d).itemsize == body > 0 for _, d in LLMC.values())):
        found = int(h[0]) if h is not None else None
        raise DataError(f"{path}: not an llm.c token shard (magic {found}, expected one of {sorted(LLMC)}); "
                        "the header is damaged, or set data.token_format=raw for a headerless uint16 file")
    if len(data) % 2:
        raise DataError(f"{path}: {len(data):,} bytes is not a whole number of uint16 tokens; a raw (nanoGPT) "
                        "shard is truncated or is not a token file")
    return np.frombuffer(data, np.uint16)


def check_ids(tokens: np.ndarray, vocab_size: int, path: str, tokenizer: str) -> None:
    if tokens.size and int(tokens.max()) >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise DataError(f"{path}: token id {int(tokens[bad])} at position {bad:,} is outside the vocabulary of "
                        f"data.tokenizer={tokenizer!r} ({vocab_size} ids); set data.tokenizer to the tokenizer the "
                        "shards were made with")


def documents(tokens: np.ndarray, eos_id: int) -> list[np.ndarray]:
    """The shard cut after each EOS (the tail after the last one is a document too)."""
    ends = np.flatnonzero(tokens == eos_id) + 1
    parts = np.split(tokens, ends)
    return [p for p in parts if p.size]
