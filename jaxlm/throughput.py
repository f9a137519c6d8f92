"""A throughput model on paper: expected tokens/s per chip of a config on accelerators we cannot reach.

    python -m jaxlm.throughput --census [--sizes=small,medium] [--meshes=dp,fsdp] [--out=docs/throughput_census.json]
    python -m jaxlm.throughput [--census_json=docs/throughput_census.json]     # the table, from the cached census

``--census`` compiles the train step of configs/gpt2_<size>.py on 8 simulated CPU devices (one compile
per size and mesh: 2-4 minutes each for gpt2_small on the shared CPU) and records, per device and step,
every collective in the compiled HLO with the bytes a bandwidth-optimal (ring) algorithm moves for it,
and the FLOPs and bytes XLA's CPU cost analysis counts. The table reads that JSON and, per chip in
``CHIPS`` (datasheet peak, HBM and interconnect bandwidth), bounds the step time three ways:

    t_math = FLOPs / (peak × η)        η: the MFU a well-tuned stack reaches (``ANCHORS``)
    t_hbm  = hbm_bytes / HBM bandwidth (an analytic count, ``hbm_bytes``: the CPU's byte count is not
             the GPU's or TPU's fusion, and overcounts: see PERFORMANCE.md)
    t_comm = collective bytes moved / interconnect bandwidth per chip

expected step = max(t_math, t_hbm) + (1 − overlap) × t_comm, for overlap 1 (collectives hidden behind
compute, as XLA's latency-hiding scheduler aims for) and 0 (none hidden): a bracket, not a point.
FLOPs are ``telemetry.flops_per_token`` (6·N + 6·L·d·T), as everywhere in jaxlm.
"""

from __future__ import annotations

import collections
import json
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import flags

from jaxlm import cli, files, sharding, telemetry, train
from jaxlm import config as config_lib

ROOT = Path(__file__).resolve().parent.parent
CENSUS_JSON = ROOT / "docs" / "throughput_census.json"
MESHES = {"dp": dict(data=8, fsdp=1, tensor=1), "fsdp": dict(data=1, fsdp=8, tensor=1)}

# Datasheet numbers per chip: dense bf16 TFLOP/s (telemetry.PEAK_TFLOPS), HBM GB/s, and the
# interconnect's bandwidth per chip in one direction (GB/s), which a ring collective's busy link runs at.
# TPU: Cloud TPU system-architecture pages (v4: 1200 GB/s HBM, all-reduce bandwidth 1.1 PB/s per
# 4096-chip pod = 268 GB/s per chip; v5e: 819 GB/s, ICI 1600 Gbps = 200 GB/s, which matches its
# 51.2 TB/s all-reduce bandwidth per 256-chip pod; v5p: 2765 GB/s, ICI 4800 Gbps = 600 GB/s).
# H100 SXM: 3350 GB/s HBM3, NVLink 4 at 900 GB/s both directions = 450 GB/s each way (NVSwitch, 8 GPUs).
CHIPS = {
    "TPU v4": {"peak_tflops": 275.0, "hbm_gbs": 1200.0, "link_gbs": 268.0},
    "TPU v5e": {"peak_tflops": 197.0, "hbm_gbs": 819.0, "link_gbs": 200.0},
    "TPU v5p": {"peak_tflops": 459.0, "hbm_gbs": 2765.0, "link_gbs": 600.0},
    "H100 x8": {"peak_tflops": 989.0, "hbm_gbs": 3350.0, "link_gbs": 450.0},
}
# Published MFU anchors, η above. llm.c (karpathy/llm.c, GPT-2 124M on H100): ~468K tokens/s per GPU
# = 468e3 × 803.3 MFLOP/token (6·N + 6·L·d·T at T=1024, telemetry.flops_per_token) / 989 TFLOP/s = 38%. MaxText's README,
# "Runtime Performance Results" (AI-Hypercomputer/maxtext): 71.5% on v5p-128 (32B), 61.1% on
# v5e-256 (16B); no v4 row there, so v4 takes v5p's. Those are large models, whose matmuls fill the
# chip; a 124M model reaches less, which is why t_hbm is in the bound.
ANCHORS = {"TPU v4": 0.715, "TPU v5e": 0.611, "TPU v5p": 0.715, "H100 x8": 0.38}

DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
               "f8e4m3fn": 1, "f8e5m2": 1, "s8": 1, "u8": 1, "pred": 1}
_COLLECTIVE = re.compile(r"= (.*?) (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


def array_bytes(type_text: str) -> list[int]:
    """Bytes of each array in an HLO result type (`f32[8,16]{1,0}` or a tuple of them)."""
    out = []
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype in DTYPE_BYTES:
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            out.append(n * DTYPE_BYTES[dtype])
    return out


def group_size(line: str, n_devices: int) -> int:
    """Devices in one replica group: `replica_groups={{0,1},{2,3}}` or the iota form `[groups,size]<=[..]`."""
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)  # mesh['axis_0'=8,'axis_1'=1] {'axis_0'}
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'(\w+)'=(\d+)", m.group(1))}
        n = 1
        for axis in re.findall(r"'(\w+)'", m.group(2)):
            n *= sizes[axis]
        return n
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"source_target_pairs=\{", line)
    return 2 if m else n_devices  # replica_groups={}: every device


def moved_bytes(kind: str, result_bytes: int, n: int) -> float:
    """Bytes one device sends for a collective with `result_bytes` of result over a group of n, by a
    bandwidth-optimal ring: all-reduce = reduce-scatter + all-gather."""
    if n <= 1:
        return 0.0
    return {"all-reduce": 2 * (n - 1) / n * result_bytes, "all-gather": (n - 1) / n * result_bytes,
            "reduce-scatter": (n - 1) * result_bytes, "all-to-all": (n - 1) / n * result_bytes,
            "collective-permute": float(result_bytes)}[kind]


def census(hlo: str, n_devices: int) -> dict:
    """Per collective kind in a compiled HLO module: count, result bytes and ring bytes moved per device."""
    out = collections.defaultdict(lambda: {"count": 0, "result_bytes": 0, "moved_bytes": 0.0})
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        result, kind, start = m.groups()
        sizes = array_bytes(result)
        # an async all-gather-start's result is (operand, result): the gathered array is the larger
        size = max(sizes) if (start and kind == "all-gather") else sum(sizes)
        row = out[kind]
        row["count"] += 1
        row["result_bytes"] += size
        row["moved_bytes"] += moved_bytes(kind, size, group_size(line, n_devices))
    return {k: dict(v) for k, v in sorted(out.items())}


def compile_step(cfg, mesh_axes: dict, per_device_batch: int):
    """The compiled train step of `cfg` on the current devices laid out as `mesh_axes`, and its Trainer."""
    cfg = config_lib.with_overrides(cfg, {})
    cfg.mesh.update(mesh_axes)
    if "scan_layers" in cfg.model:
        # Only for a schema with model.scan_layers (a scanned layer stack; the schema here has no such
        # key, so this does nothing): the census counts each collective instruction once, and a scanned
        # stack runs its body's collectives once per layer, so the layers are unrolled, which writes
        # out the same traffic once per layer.
        cfg.model.scan_layers = False
    cfg.train.batch_size, cfg.train.micro_batch_size = per_device_batch * jax.device_count(), 0
    trainer = train.Trainer(cfg, sharding.make_mesh(cfg.mesh), cfg.model.vocab_size or cfg.data.vocab_size)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len + 1), jnp.int32,
                                 sharding=trainer.batch_sharding)
    return trainer.train_step.lower(train.abstract_state(trainer), batch, *trainer.knobs(1.0)).compile(), trainer


def measure(cfg, mesh_name: str, per_device_batch: int) -> dict:
    """One census row: the compiled step's cost analysis and collectives, per device and step."""
    t = time.perf_counter()
    compiled, trainer = compile_step(cfg, MESHES[mesh_name], per_device_batch)
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"mesh": mesh_name, "mesh_axes": MESHES[mesh_name], "devices": jax.device_count(),
            "regime": cfg.precision.regime, "attention": trainer.attention, "remat": cfg.model.remat,
            "per_device_batch": per_device_batch, "seq_len": cfg.train.seq_len, "n_params": trainer.n_params,
            "n_layer": cfg.model.n_layer, "n_embd": cfg.model.n_embd, "vocab_size": trainer.model_cfg.padded_vocab_size,
            "flops_per_token": trainer.flops_per_token,
            "xla_flops": float(cost.get("flops", 0.0)), "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "collectives": census(compiled.as_text(), jax.device_count()), "cpu_compile_s": compile_s}


def hbm_bytes(row: dict, vocab: int) -> float:
    """HBM bytes one chip moves per step, counted by hand (a floor for a well-fused step):
    - activations: 34·d bytes per token and layer (Korthikanti et al. 2022, 16-bit, no recompute, the
      s²·heads term gone with fused attention), written forward, read backward and their gradients
      once more: 3 × 34·d·L per token;
    - the head: float32 logits written and read, forward and backward: 4 × 4·V per token;
    - parameters, gradients and AdamW moments in float32 with a 16-bit copy: 36 bytes per parameter
      held (FSDP holds 1/fsdp of them) plus, under FSDP, the gathered weights read forward and backward."""
    tokens = row["per_device_batch"] * row["seq_len"]
    fsdp = row["mesh_axes"]["fsdp"]
    per_token = 3 * 34 * row["n_embd"] * row["n_layer"] + 16 * vocab
    state = 36 * row["n_params"] / fsdp + (8 * row["n_params"] if fsdp > 1 else 0)
    return tokens * per_token + state


def expected(row: dict, chip: str, vocab: int, eta: float | None = None) -> dict:
    """Step-time bounds and tokens/s per chip of one census row on `chip` (see the module docstring)."""
    spec = CHIPS[chip]
    eta = ANCHORS[chip] if eta is None else eta
    tokens = row["per_device_batch"] * row["seq_len"]  # per chip and step
    t_math = tokens * row["flops_per_token"] / (spec["peak_tflops"] * 1e12 * eta)
    t_hbm = hbm_bytes(row, vocab) / (spec["hbm_gbs"] * 1e9)
    moved = sum(c["moved_bytes"] for c in row["collectives"].values())
    if row["mesh_axes"]["fsdp"] > 1 and "all-reduce" in row["collectives"]:
        # The CPU pipeline writes FSDP's gradient reduce-scatter as all-reduce + dynamic-slice; GPU and
        # TPU compile it to a reduce-scatter (XLA's ReduceScatterCreator), half a ring all-reduce's bytes.
        moved -= row["collectives"]["all-reduce"]["moved_bytes"] / 2
    t_comm = moved / (spec["link_gbs"] * 1e9)
    hidden, exposed = max(t_math, t_hbm), max(t_math, t_hbm) + t_comm
    return {"chip": chip, "eta": eta, "t_math_ms": t_math * 1e3, "t_hbm_ms": t_hbm * 1e3, "t_comm_ms": t_comm * 1e3,
            "moved_mib": moved / 2**20, "tokens_per_s_overlapped": tokens / hidden,
            "tokens_per_s_exposed": tokens / exposed, "roofline_tokens_per_s": tokens / max(t_math * eta, t_hbm, t_comm)}


def padded_vocab(size: str) -> int:
    """The token table's rows in configs/gpt2_<size>.py (GPT-2's 50257, padded by model.vocab_multiple)."""
    cfg = config_lib.load(ROOT / "jaxlm" / "configs" / f"gpt2_{size}.py")
    return config_lib.model_config(cfg).padded_vocab_size


def table(rows: dict) -> str:
    """Markdown: a line per (model, mesh, chip): the three times, and tokens/s per chip at llm.c's
    small-model MFU and at the chip's published large-model MFU, each with comm exposed .. hidden."""
    lines = ["| model | mesh | chip | t_math ms (η=1) | t_hbm ms | comm MiB/step | t_comm ms | tokens/s/chip at η=38% "
             "(comm exposed .. hidden) | at the chip's published η | roofline (η=1, all hidden) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, row in rows.items():
        model, _, mesh = key.partition("/")
        vocab = padded_vocab(model.removeprefix("gpt2_"))
        for chip in CHIPS:
            small, big = expected(row, chip, vocab, ANCHORS["H100 x8"]), expected(row, chip, vocab)
            lines.append(f"| {model} | {mesh.upper()}=8 | {chip} | {big['t_math_ms'] * big['eta']:.1f} "
                         f"| {big['t_hbm_ms']:.1f} | {big['moved_mib']:,.0f} | {big['t_comm_ms']:.2f} "
                         f"| {small['tokens_per_s_exposed']:,.0f} .. {small['tokens_per_s_overlapped']:,.0f} "
                         f"| {big['eta']:.0%}: {big['tokens_per_s_exposed']:,.0f} .. {big['tokens_per_s_overlapped']:,.0f} "
                         f"| {big['roofline_tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def define_flags():
    flags.DEFINE_bool("census", False, "Compile the steps on 8 simulated CPU devices and write --out.")
    flags.DEFINE_list("sizes", ["small", "medium"], "configs/gpt2_<size>.py to compile.")
    flags.DEFINE_list("meshes", list(MESHES), "Meshes to compile: " + ", ".join(MESHES))
    flags.DEFINE_string("regime", "bf16_upcast", "The precision regime of the compiled steps.")
    flags.DEFINE_integer("batch_per_device", 16, "Sequences per chip per step.")
    flags.DEFINE_string("out", str(CENSUS_JSON), "--census: the JSON to write (rows already there are kept).")
    flags.DEFINE_string("census_json", str(CENSUS_JSON), "The census to build the table from.")


def main(argv):
    F = cli.FLAGS
    if F.census:
        # before the backend starts: 8 CPU devices stand in for the 8 chips
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", 8)
        out = Path(F.out)
        rows = json.loads(out.read_text())["rows"] if out.exists() else {}
        for size in F.sizes:
            cfg = config_lib.load(ROOT / "jaxlm" / "configs" / f"gpt2_{size}.py",
                                  {"precision.regime": F.regime, "model.attn_pdrop": 0.0})
            config_lib.validate(cfg)
            for mesh in F.meshes:
                rows[f"gpt2_{size}/{mesh}"] = row = measure(cfg, mesh, F.batch_per_device)
                print(f"gpt2_{size}/{mesh}: compiled in {row['cpu_compile_s']:.0f} s; collectives {row['collectives']}",
                      flush=True)
                files.atomic_write_json(out, telemetry.jsonable({"environment": telemetry.environment(), "rows": rows}),
                                        indent=2)
    print(table(json.loads(Path(F.census_json if not F.census else F.out).read_text())["rows"]))


if __name__ == "__main__":
    cli.run(main, define_flags)
