"""Reading what an offline W&B run wrote: its ``run-ID.wandb`` transaction log.

wandb (0.31) keeps an offline run in ``wandb/offline-run-*/run-ID.wandb`` only (no config.yaml), in
LevelDB's log format: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of
chunks (crc32 uint32, length uint16, type uint8: 1 full, 2 first, 3 middle, 4 last), each record a
serialised ``wandb_internal_pb2.Record``; the installed wandb has no Python reader for it any more.
"""

import json
import struct
import time
from pathlib import Path

BLOCK, CHUNK_HEADER = 32768, 7


def records(path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    pos, buf = 7, b""
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        pos += CHUNK_HEADER
        buf += data[pos:pos + n]
        pos += n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def run_info(run_dir, wait_s: float = 30.0) -> dict:
    """{'group', 'job_type', 'name', 'config'} of the offline W&B run under a jaxlm run directory.
    wandb's service may still be writing the log when the run's process has returned: waits for the
    run record up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        paths = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
        for rec in records(paths[-1]) if paths else ():
            if rec.WhichOneof("record_type") == "run":
                r = rec.run
                config = {i.key: json.loads(i.value_json) for i in r.config.update if i.key != "_wandb"}
                return {"group": r.run_group, "job_type": r.job_type, "name": r.display_name, "config": config}
        if time.monotonic() > deadline:
            raise AssertionError(f"{run_dir}: no offline W&B run record ({paths})")
        time.sleep(0.5)
