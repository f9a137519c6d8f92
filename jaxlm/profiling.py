"""Where a compiled step's device time goes: a JAX profiler trace, summed by model part and by op.

    summary = profiling.profile_step(compiled, state, batch, steps=3, trace_dir="prof/bf16")  # consumes state
    print(profiling.report(summary))

``jax.profiler.trace`` writes an XSpace (``*.xplane.pb``, what TensorBoard's profile plugin, XProf,
reads). XProf's own converter turns it into its trace viewer's events (``trace_events``); every op
the device ran is an event there carrying its XLA instruction name (``hlo_op``). The compiled HLO
gives that instruction's ``op_name``, which holds the model's named scopes (``model.py``: embed,
attn, attn/core, mlp, head; ``train.py``: loss, optimizer, metrics), with ``transpose(`` marking the
backward pass: that split by model part is what this module adds to XProf's tools. So the summary
says, per step: how long the device was busy, how that splits over the parts of the model forward
and backward, and which ops cost most. ``tensorboard --logdir`` on the trace directory's parent
shows the same trace in XProf (trace viewer, op and HLO statistics).
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path

import jax

# Named scopes, most specific first; an op belongs to the first whose words all occur in its op_name.
PARTS = (("attn/core", ("attn", "core")), ("attn", ("attn",)), ("mlp", ("mlp",)), ("embed", ("embed",)),
         ("head", ("head",)), ("loss", ("loss",)), ("optimizer", ("optimizer",)), ("metrics", ("metrics",)))
_MODEL_PARTS = {"attn/core", "attn", "mlp", "embed", "head", "loss"}  # these run forward and backward
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")


def part_of(op_name: str) -> str:
    """'attn/core bwd', 'mlp fwd', 'optimizer', ... or 'other' for an op_name with no jaxlm scope
    (or one that names an argument, e.g. a copy of "state.params['h'][0]['attn']...")."""
    if not op_name.startswith("jit("):
        return "other"
    words = set(re.findall(r"[A-Za-z_]\w*", op_name))
    for name, needs in PARTS:
        if all(w in words for w in needs):
            if name in _MODEL_PARTS:
                return f"{name} {'bwd' if 'transpose' in words else 'fwd'}"
            return name
    return "other"


def instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (kind, op_name)} for every instruction of a compiled module's text."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, rest = m.groups()
        op = re.search(r'op_name="([^"]*)"', rest)
        target = re.search(r'custom_call_target="([^"]*)"', rest) or re.search(r'"kind":"(__\w+)"', rest)
        fusion = re.search(r"\bkind=(k\w+)", rest)
        opcode = re.search(r"(?:^|\s)([a-z][\w\-]*)\(", rest)  # after the result type: "f32[8]{0} fusion("
        kind = target.group(1) if target else (fusion.group(1) if fusion else (opcode.group(1) if opcode else "?"))
        out[name] = (kind, op.group(1) if op else "")
    return out


def _newest(trace_dir, pattern: str) -> Path | None:
    found = sorted(Path(trace_dir).rglob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def trace_events(trace_dir) -> list[dict]:
    """The Chrome-format events of the newest trace in `trace_dir`: its ``*.xplane.pb`` through XProf's
    trace-viewer converter, or (a trace without one, or no XProf installed) a ``*.trace.json.gz``."""
    xplane, chrome = _newest(trace_dir, "*.xplane.pb"), _newest(trace_dir, "*.trace.json.gz")
    if xplane is not None:
        try:
            from xprof.convert import raw_to_tool_data  # XProf's converters (a C++ extension): only to read a trace
        except ImportError:
            if chrome is None:
                raise FileNotFoundError(f"{xplane}: reading an xplane needs XProf (pip install .[profile])") from None
        else:
            data, _ = raw_to_tool_data.xspace_to_tool_data([str(xplane)], "trace_viewer", {})
            return json.loads(data)["traceEvents"]
    if chrome is None:
        raise FileNotFoundError(f"{trace_dir}: no *.xplane.pb or *.trace.json.gz (was it written by jax.profiler.trace?)")
    return json.load(gzip.open(chrome))["traceEvents"]


def summarize(trace_dir, hlo_text: str, steps: int) -> dict:
    """Device time per step of the module `hlo_text`, by part and by op, from the newest trace in
    `trace_dir` (which holds `steps` calls of it)."""
    events = trace_events(trace_dir)
    meta = [e for e in events if e.get("ph") == "M"]
    process = {e["pid"]: e["args"]["name"] for e in meta if e.get("name") == "process_name"}
    thread = {(e["pid"], e.get("tid")): e["args"]["name"] for e in meta if e.get("name") == "thread_name"}
    timed = [e for e in events if e.get("ph") == "X"]
    # A GPU's kernels run on its stream lines (other lines of the device, e.g. whole modules, span
    # them and would count twice); on a CPU, host threads run the ops and each carries its hlo_op.
    device = [e for e in timed if process.get(e["pid"], "").startswith("/device:")]
    streams = [e for e in device if thread.get((e["pid"], e.get("tid")), "").startswith("Stream")]
    events = streams or device or [e for e in timed if "hlo_op" in e.get("args", {})]
    module = re.match(r"HloModule (\S+?),", hlo_text)
    if module:  # the step's ops only (a kernel without an hlo_module stays: a copy, a memset)
        events = [e for e in events if e.get("args", {}).get("hlo_module", module.group(1)) == module.group(1)]
    info = instructions(hlo_text)
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:  # µs in the trace -> ms per step; a kernel no HLO op claims keeps its own name
        per_op[e.get("args", {}).get("hlo_op") or "kernel:" + e["name"]] += e.get("dur", 0.0) / 1e3 / steps
    per_part: dict[str, float] = collections.defaultdict(float)
    ops = []
    for op, ms in per_op.items():
        kind, op_name = info.get(op, ("?", ""))
        part = "unattributed" if op.startswith("kernel:") else part_of(op_name)
        per_part[part] += ms
        ops.append({"op": op, "ms": ms, "part": part, "kind": kind, "op_name": op_name})
    total = sum(per_op.values())
    return {"busy_ms": total, "steps": steps, "device_events": bool(device),
            "parts": dict(sorted(per_part.items(), key=lambda kv: -kv[1])),
            "ops": sorted(ops, key=lambda o: -o["ms"])}


CATEGORIES = ("GEMM", "attention core", "softmax/loss", "optimizer", "other")


def category(op: dict) -> str:
    """The op's share in the coarse split (CATEGORIES): the weight matmuls (QKV, projections, MLP,
    head; forward and backward) are GEMM; the attention core (QK^T, mask, softmax, PV, its matmuls
    included) is attention; the loss and the head's non-matmul ops (log-sum-exp, the target's
    logit, their gradients) are softmax/loss; the optimizer and clipping; the rest (LayerNorms,
    GELU, residuals, embedding gathers, copies, metrics) is other."""
    part, name, kind = op["part"], op["op_name"], op["kind"].lower()
    if part == "optimizer":
        return "optimizer"
    if part.startswith("attn/core"):
        return "attention core"
    if "dot_general" in name or kind in ("dot", "koutput") or "xnn" in kind or "onednn" in kind or "ynn" in kind:
        return "GEMM"
    if part.startswith(("head", "loss")):
        return "softmax/loss"
    return "other"


# Ops whose event on a CPU spans the ops they run (a scan's while loop: the chunked loss), which have
# events of their own: counted once, through those.
CONTAINERS = ("while", "conditional", "call")


def by_category(summary: dict) -> dict[str, float]:
    """ms per step in each of CATEGORIES, container ops (CONTAINERS) left out."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for o in summary["ops"]:
        if o["kind"] not in CONTAINERS:
            out[category(o)] += o["ms"]
    return out


def profile_step(compiled, state, batch, *, steps: int, trace_dir) -> dict:
    """Traces `steps` calls of a compiled train step (after one untraced call); returns the summary.
    The step donates its input state: `state` is consumed."""
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    with jax.profiler.trace(str(trace_dir)):
        for _ in range(steps):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
    return summarize(trace_dir, compiled.as_text(), steps)


def report(summary: dict, step_ms: float | None = None, top: int = 15) -> str:
    """The summary as text: busy time, the parts, the costliest ops."""
    busy = summary["busy_ms"]
    where = "device kernels" if summary["device_events"] else "host-run ops (CPU; threads may overlap)"
    lines = [f"{busy:.2f} ms per step in {where}"
             + (f", {busy / step_ms:.0%} of the {step_ms:.2f} ms step" if step_ms else "")]
    lines.append(f"  {'part':<16}{'ms/step':>9}{'share':>8}")
    for part, ms in summary["parts"].items():
        lines.append(f"  {part:<16}{ms:>9.3f}{ms / busy if busy else 0:>8.1%}")
    cats = by_category(summary)
    ops_ms = sum(cats.values())
    lines.append(f"  without loops' own spans ({ops_ms:.2f} ms): "
                 + ", ".join(f"{c} {ms / ops_ms if ops_ms else 0:.0%}" for c, ms in cats.items()))
    lines.append(f"  {'op':<24}{'ms/step':>9}{'share':>8}  {'part':<15}{'kind':<22}op_name")
    for o in summary["ops"][:top]:
        lines.append(f"  {o['op'][:23]:<24}{o['ms']:>9.3f}{o['ms'] / busy if busy else 0:>8.1%}  "
                     f"{o['part']:<15}{o['kind'][:21]:<22}{o['op_name'][-70:]}")
    return "\n".join(lines)
