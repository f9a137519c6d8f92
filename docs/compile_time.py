"""Compile time of the gpt2_<size> train step (``bench --compile_only``'s program, bf16_upcast, batch 1),
wall and process CPU seconds (the CPU seconds hold still on a loaded machine; wall seconds do not).

    PYTHONPATH=. python docs/compile_time.py {small,xl} {scan,loop}
"""

import json
import sys
import time

import jax
import jax.numpy as jnp

from jaxlm import bench, sharding, train
from jaxlm import config as config_lib

size, scan = sys.argv[1], sys.argv[2] == "scan"
cfg = config_lib.load(f"configs/gpt2_{size}.py", {"precision.regime": "bf16_upcast", "model.scan_layers": scan})
cfg.train.batch_size, cfg.train.micro_batch_size = bench.global_batch(cfg, 1), 0
trainer = train.Trainer(cfg, sharding.make_mesh(cfg.mesh), cfg.data.vocab_size)
batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len + 1), jnp.int32, sharding=trainer.batch_sharding)
w0, c0 = time.perf_counter(), time.process_time()
lowered = trainer.train_step.lower(train.abstract_state(trainer), batch, *trainer.knobs(1.0))
w1, c1 = time.perf_counter(), time.process_time()
compiled = lowered.compile()
w2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"size": size, "scan": scan, "lower_wall_s": round(w1 - w0, 1), "lower_cpu_s": round(c1 - c0, 1),
                  "compile_wall_s": round(w2 - w1, 1), "compile_cpu_s": round(c2 - c1, 1),
                  "hlo_chars": len(compiled.as_text()), "step_gib": round(bench._planned_memory_gib(compiled), 2)}), flush=True)
