"""XLA:CPU options and config choices, measured one by one against the default in the same run.

    python -m jaxlm.bench_cpu --shape=bench [--variants=default,no_xnnpack,...] [--steps=30] [--rounds=5]

XLA reads its flags once per process, so each variant is its own worker process (its ``XLA_FLAGS``,
its config overrides), all started first and compiled; the coordinator then asks each in turn for
steps/rounds timed train steps (``jaxlm.bench``'s step: ``train.Trainer``'s jitted step, synthetic
tokens, the shape's batch), the order rotated each round, and prints each variant's median step time,
its ratio to the default and its loss after the same steps: equal to the default's bit for bit, or
by how much it differs (an option that changes numerics says so here). Workers wait on a pipe while
another runs, so they do not share the cores. A variant whose flag this jaxlib rejects is reported
in its row, and the others still run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from jaxlm import bench, cli, files, sharding, telemetry, train
from jaxlm import config as config_lib
from jaxlm.errors import ConfigError

# name -> (XLA_FLAGS added, config overrides). Flags as jaxlib 0.10.2 lists them (an unknown one aborts
# that worker); --xla_cpu_use_thunk_runtime is "Deprecated" there (no effect) and not listed.
VARIANTS: dict[str, tuple[str, dict]] = {
    "default": ("", {}),
    "no_xnnpack": ("--xla_cpu_use_xnnpack=false", {}),
    "xnn_dot": ("--xla_cpu_experimental_xnn_fusion_type=dot", {}),
    "xnn_all": ("--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce", {}),
    "xnn_graph": ("--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY", {}),
    "ynn_dot": ("--xla_cpu_experimental_ynn_fusion_type=dot", {}),
    "onednn": ("--xla_cpu_use_onednn=true", {}),
    "onednn_dot": ("--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot", {}),
    "eigen_1thread": ("--xla_cpu_multi_thread_eigen=false", {}),
    "fast_math": ("--xla_cpu_enable_fast_math=true", {}),
    "vector_512": ("--xla_cpu_prefer_vector_width=512", {}),
    "no_fusion_emitters": ("--xla_cpu_use_fusion_emitters=false", {}),
    "remat_dots": ("", {"model.remat": "dots"}),
    "remat_full": ("", {"model.remat": "full"}),
    "plain_loss": ("", {"model.loss_chunk": 0}),
    "vocab_unpadded": ("", {"model.vocab_multiple": 1}),
    "scan_layers": ("", {"model.scan_layers": True}),
}


def define_flags():
    flags.DEFINE_enum("shape", "bench", list(bench.SHAPES), "The shape (jaxlm.bench.SHAPES) on configs/tiny.py.")
    flags.DEFINE_list("variants", list(VARIANTS), f"Variants to time beside default: {', '.join(VARIANTS)}.")
    flags.DEFINE_integer("steps", 30, "Timed steps per variant, split over --rounds.")
    flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
    flags.DEFINE_integer("warmup", 3, "Untimed steps per worker after compiling.")
    flags.DEFINE_string("out", None, "Write the results as JSON here.")
    flags.DEFINE_string("worker", None, "(internal) run as the worker of this variant, commands on stdin.")


def shape_config(shape: str, overrides: dict):
    """configs/tiny.py with the shape's keys, then `overrides`; and the shape's batch."""
    keys, batch = bench.SHAPES[shape]
    return config_lib.load(Path(__file__).parent / "configs" / "tiny.py", {**keys, **overrides}), batch


def worker(shape: str, variant: str) -> None:
    """Compiles the variant's step, says 'ready', then answers 'run N' (the N steps' seconds), 'loss'
    (the last step's loss, as a float's repr) and 'quit', one JSON line each on stdout."""
    cfg, batch_size = shape_config(shape, VARIANTS[variant][1])
    cfg.train.batch_size, cfg.train.micro_batch_size = batch_size, 0
    vocab = cfg.model.vocab_size or cfg.data.vocab_size
    trainer = train.Trainer(cfg, sharding.make_mesh(cfg.mesh), vocab)
    batch = jax.device_put(
        np.random.RandomState(0).randint(0, vocab, (batch_size, cfg.train.seq_len + 1)).astype(np.int32),
        trainer.batch_sharding)
    state = trainer.init(jnp.uint32(0))
    t = time.perf_counter()
    compiled = trainer.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    m = None
    for _ in range(FLAGS.warmup):
        state, m = compiled(state, batch)
    jax.block_until_ready(state)
    say = lambda obj: print(json.dumps(obj), flush=True)
    say({"ready": True, "compile_s": compile_s, "xla_flags": os.environ.get("XLA_FLAGS", "")})
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "run":
            times = []
            for _ in range(int(cmd[1])):
                t = time.perf_counter()
                state, m = compiled(state, batch)
                jax.block_until_ready(m)
                times.append(time.perf_counter() - t)
            say({"times": times})
        elif cmd[0] == "loss":
            say({"loss": repr(float(m[telemetry.LOSS]))})
        else:
            return


FLAGS = cli.FLAGS


def _start(shape: str, variant: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + VARIANTS[variant][0]).strip()
    return subprocess.Popen([sys.executable, "-m", "jaxlm.bench_cpu", f"--shape={shape}", f"--worker={variant}",
                             f"--warmup={FLAGS.warmup}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _ask(p: subprocess.Popen, cmd: str) -> dict:
    if cmd:
        p.stdin.write(cmd + "\n")
        p.stdin.flush()
    while True:  # libraries may print; the answer is the next JSON line
        line = p.stdout.readline()
        if not line:
            raise RuntimeError((p.stderr.read() or "").strip().splitlines()[-1:] or ["exited"])
        if line.startswith("{"):
            return json.loads(line)


def main(argv):
    if FLAGS.worker:
        return worker(FLAGS.shape, FLAGS.worker)
    names = ["default"] + [v for v in FLAGS.variants if v != "default"]
    for v in names:
        if v not in VARIANTS:
            raise ConfigError(f"--variants: unknown {v!r}; known: {', '.join(VARIANTS)}")
    load = os.getloadavg()[0]
    procs = {v: _start(FLAGS.shape, v) for v in names}
    ready, rows = {}, {}
    for v, p in procs.items():
        try:
            ready[v] = _ask(p, "")
        except RuntimeError as e:
            rows[v] = {"variant": v, "error": str(e.args[0][0] if e.args[0] else e)[:300]}
            p.kill()
    live = [v for v in names if v in ready]
    times = {v: [] for v in live}
    per = max(1, -(-FLAGS.steps // FLAGS.rounds))
    for r in range(FLAGS.rounds):
        for v in live[r % len(live):] + live[: r % len(live)]:
            times[v] += _ask(procs[v], f"run {per}")["times"]
    losses = {v: _ask(procs[v], "loss")["loss"] for v in live}
    for v in live:
        procs[v].stdin.write("quit\n")
        procs[v].stdin.flush()
        procs[v].wait(60)
    base = statistics.median(times["default"]) if "default" in times else None
    for v in live:
        step_s = statistics.median(times[v])
        rows[v] = {"variant": v, "xla_flags": VARIANTS[v][0], "overrides": VARIANTS[v][1],
                   "compile_s": ready[v]["compile_s"], "step_s": step_s,
                   "speedup": base / step_s if base else None, "loss": losses[v],
                   "loss_equal": losses[v] == losses.get("default")}
    cfg, batch = shape_config(FLAGS.shape, {})
    print(f"shape {FLAGS.shape}: d {cfg.model.n_embd} x {cfg.model.n_layer}, batch {batch} x {cfg.train.seq_len}; "
          f"{FLAGS.rounds} interleaved rounds, {per} steps each; load average {load:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end")
    print(f"{'variant':<20}{'compile s':>10}{'step ms':>10}{'vs default':>12}  {'loss after':<22}what")
    for v in names:
        r = rows[v]
        if "error" in r:
            print(f"{v:<20}failed: {r['error']}")
            continue
        same = "= default" if r["loss_equal"] else f"{float(r['loss']) - float(losses['default']):+.2e}"
        what = (r["xla_flags"] + " " + " ".join(f"{k}={val}" for k, val in r["overrides"].items())).strip()
        print(f"{v:<20}{r['compile_s']:>10.1f}{r['step_s'] * 1e3:>10.1f}{r['speedup']:>11.3f}x  {same:<22}{what}")
    if FLAGS.out:
        files.atomic_write_json(FLAGS.out, telemetry.jsonable({
            "shape": FLAGS.shape, "rounds": FLAGS.rounds, "load_average": [load, os.getloadavg()[0]],
            "rows": [rows[v] for v in names], "times": times, "environment": telemetry.environment()}), indent=2)


if __name__ == "__main__":
    cli.run(main, define_flags)
