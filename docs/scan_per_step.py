"""Per-step time, loop vs scan, same process: the gpt2 recipe (dropout 0.1, inverse-layer-index scaling)
at a CPU-sized shape. Wall and process CPU seconds per step (median of 6), rounds alternating.

    PYTHONPATH=. python docs/scan_per_step.py
"""

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import config as config_lib
from jaxlm import sharding, train

base = {"precision.regime": "fp32", "model.n_layer": 6, "model.n_embd": 256, "model.n_head": 4,
        "train.seq_len": 128, "train.batch_size": 4, "model.attention_impl": "reference", "data.vocab_size": 4096}
batch = jnp.asarray(np.random.RandomState(0).randint(0, 4096, (4, 129)).astype(np.int32))
runs = {}
for scan in (False, True):
    cfg = config_lib.load("configs/gpt2_small.py", {**base, "model.scan_layers": scan})
    tr = train.Trainer(cfg, sharding.make_mesh(cfg.mesh), vocab_size=4096)
    st = tr.init(np.uint32(0))
    st, m = tr.train_step(st, batch)
    jax.block_until_ready(m)
    runs[scan] = (tr, st)
out = {False: [], True: []}
for rnd in range(3):
    for scan in (False, True):
        tr, st = runs[scan]
        for _ in range(2):
            w, c = time.perf_counter(), time.process_time()
            st, m = tr.train_step(st, batch)
            jax.block_until_ready(m)
            out[scan].append((time.perf_counter() - w, time.process_time() - c))
        runs[scan] = (tr, st)
for scan, v in out.items():
    print(json.dumps({"scan": scan, "wall_s_median": round(statistics.median(x[0] for x in v), 3),
                      "cpu_s_median": round(statistics.median(x[1] for x in v), 3), "n": len(v),
                      "loss": float(m["train/loss"]) if scan else None}))
