"""What verifying a token cache costs (jaxlm/data/integrity.py), for PERFORMANCE.md.

    python docs/cache_verify_cost.py [--gb=1] [--workdir=/tmp/verify-cost]

1. A synthetic cache of --gb GiB of uint16 rows: writing its records (the build's extra work), and
   verifying it whole (what opening a cache up to integrity.OPEN_BOUND does; page cache warm), and a
   chunk as the lazy path reads it.
2. The tiny config's own cache (the offline stdlib corpus): verification at open against the first
   epoch's training time at the tiny config's measured step time (a short run of it).
Best of --repeats, in seconds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from jaxlm import config, data, telemetry
from jaxlm import run as run_lib
from jaxlm.data import cache as cache_lib
from jaxlm.data import integrity


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def synthetic(root: Path, gib: float, repeats: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "train.bin"
    n = int(gib * 2**30) // 2
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for start in range(0, n, 1 << 26):
            f.write(rng.integers(0, 50257, min(1 << 26, n - start), dtype=np.uint16).tobytes())
    record = integrity.record(path)
    t_record = best(lambda: integrity.record(path), repeats)
    t_whole = best(lambda: integrity.check_file(path, record, 50257, np.uint16), repeats)
    t_chunk = best(lambda: integrity.check_file(path, record, 50257, np.uint16, [len(record["xxh3_128"]) // 2]),
                   repeats)
    size = path.stat().st_size
    print(f"synthetic {size / 2**30:.2f} GiB, {len(record['xxh3_128'])} chunks of {integrity.CHUNK_BYTES >> 20} MiB:"
          f" records {t_record:.3f} s; verify whole {t_whole:.3f} s ({size / t_whole / 2**30:.1f} GiB/s); one chunk "
          f"{t_chunk * 1e3:.1f} ms")
    path.unlink()


def tiny(root: Path, repeats: int) -> None:
    cfg = config.load("configs/tiny.py", {"train.steps": 40, "log.wandb_mode": "disabled", "train.eval_every": 0,
                                          "log.stats_every": 0, "checkpoint.stages": ((1000, 10_000),)})
    result = run_lib.run(cfg, root / "tiny", log=lambda s: None)
    records = [r for r in telemetry.read_metrics(root / "tiny" / "metrics.jsonl")[0] if telemetry.STEP_TIME in r]
    step = min(r[telemetry.STEP_TIME] for r in records[1:])  # (the first window holds the compile's first step)
    cache = data.prepare(cfg, root / "tiny", log=lambda s: None)
    t_open = best(lambda: cache_lib.TokenCache.open(cache.path), repeats)
    t_none = best(lambda: cache_lib.TokenCache.open(cache.path, verify=False), repeats)
    rows = cache.manifest["splits"]["train"]["sequences"]
    epoch_steps = rows / cfg.train.batch_size
    epoch = epoch_steps * step
    size = sum(r["size"] for r in cache.manifest["files"].values())
    print(f"tiny: cache {size / 2**20:.1f} MiB ({rows:,} rows); open with verification {t_open:.4f} s, without "
          f"{t_none:.4f} s; first epoch {epoch_steps:,.0f} steps x {step * 1e3:.1f} ms = {epoch:.1f} s; verification "
          f"= {(t_open - t_none) / epoch:.5%} of it (ran {result.step} steps)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default="/tmp/verify-cost")
    a = p.parse_args()
    root = Path(a.workdir)
    synthetic(root / "synthetic", a.gb, a.repeats)
    tiny(root, a.repeats)


if __name__ == "__main__":
    main()
