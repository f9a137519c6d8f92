"""A probing study of a run's checkpoints (or of a Hugging Face GPT-2): representations, probes, files.

    rows = study.probe_run("runs/tiny", steps=None, all_steps=True, tasks=["position", "bm25"])

For each checkpoint: restore it (the whole train state through ``jaxlm.saved_run.load_run``, of which only
the parameters are used), run the model once over the fixed probe windows keeping every layer's
residual stream (``model.apply(..., collect_residuals=True)``: the embedding output and each
block's output), gather the examples' features (float32, in memory only; freed when the checkpoint
is done), and train all probes of that checkpoint (``jaxlm.probe.mdl``). The examples and labels
(``jaxlm.probe.tasks``) are made once and cached under ``OUT/cache/``.

Written to OUT (default ``RUN/probe``): ``<task>.json`` (settings, label definition, one row per
(layer, step)), ``<task>.csv`` (the rows) and ``<task>.png`` (``jaxlm.probe.report``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import checkpoint, precision, saved_run
from jaxlm import eval as eval_lib
from jaxlm import model as model_lib
from jaxlm.configs import base as base_config
from jaxlm.data import cache as cache_lib
from jaxlm.data import sources as sources_lib
from jaxlm.data import tokenizer as tok_lib
from jaxlm.errors import CheckpointError, ConfigError, DataError
from jaxlm.probe import mdl, report
from jaxlm.probe import tasks as tasks_lib

MAX_TRAIN_TOKENS = 20_000_000  # corpus statistics from at most this many training tokens


@dataclasses.dataclass
class Source:
    """What to probe: a model per step, the tokenizer, the text streams and where to write."""

    name: str
    steps: list[int]
    load_params: object  # step -> (graphdef, params)
    tokenizer: object
    val_stream: np.ndarray
    train_stream: np.ndarray
    identity: dict  # what the cached examples depend on
    out: Path
    n_positions: int
    label: str | None = None  # a model that is no run's checkpoint (--hf): its name in the results, not "step 0"


def resolve_steps(available: list[int], step: int | None, steps: list[int] | None, all_steps: bool,
                  where: str) -> list[int]:
    if not available:
        raise CheckpointError(f"{where}: no complete checkpoint; train the run first (python -m jaxlm.main)")
    if all_steps:
        return list(available)
    wanted = list(steps) if steps else [available[-1] if step is None else step]
    missing = [s for s in wanted if s not in available]
    if missing:
        raise CheckpointError(f"{where}: no checkpoint for step(s) {missing}; available: {available}")
    return sorted(set(wanted))


def run_source(workdir, *, step=None, steps=None, all_steps=False, out=None) -> Source:
    workdir = Path(workdir)
    steps = resolve_steps(checkpoint.saved_steps(workdir), step, steps, all_steps, str(workdir / "checkpoints"))
    meta = checkpoint.read_meta(workdir, steps[-1])
    tok = tok_lib.load(saved_run.tokenizer_spec(meta, workdir))
    cache_path = Path(meta["data"]["cache"])
    if not (cache_path / "manifest.json").exists():  # a run from before the machine cache, moved: look inside it
        cache_path = workdir / "data" / "tokens" / cache_path.name
    if not (cache_path / "manifest.json").exists():
        raise DataError(f"{meta['data']['cache']}: the run's token cache is gone; rebuild it with "
                        f"python -m jaxlm.data --config=... --workdir={workdir}")
    cache = cache_lib.TokenCache.open(cache_path)
    n_positions = int(meta["config"]["model"]["n_positions"])
    graphdef_holder = {}

    def load(s):
        _, trainer, state, _, _ = saved_run.load_run(workdir, s)
        graphdef_holder.setdefault("g", trainer.graphdef)  # one graphdef for all steps: one compilation
        return graphdef_holder["g"], state.params

    train = np.asarray(cache.split("train")).reshape(-1)[:MAX_TRAIN_TOKENS]
    return Source(str(workdir), steps, load, tok, np.asarray(cache.split("validation")).reshape(-1), train,
                  {"cache": cache_path.name, "tokenizer": tok.sha256}, Path(out) if out else workdir / "probe",
                  n_positions)


# --hf: the model has no validation split of its own, so one is held out of --data's documents
HF_VAL_FRACTION, HF_MAX_DOCS = 0.1, 2000


def hf_source(hf_dir, *, data: str, tokenizer: str | None = None, out=None, workdir=None,
              val_fraction: float = HF_VAL_FRACTION, max_docs: int = HF_MAX_DOCS) -> Source:
    """A Hugging Face GPT-2 directory (one model, labelled ``hf:<directory name>`` where a run's rows have
    their step) with its tokenizer (`tokenizer`, a spec, or the directory's own) and a data.source spec:
    `val_fraction` of its documents (at most `max_docs` per split; 0 = all) are probed, the rest give the
    corpus statistics. Nothing is written into the model directory: results and the example cache go to
    `out`, default WORKDIR/probe."""
    if not data:
        raise ConfigError("--hf needs --data (a data.source spec whose held-out documents are probed and whose other "
                          "documents give the corpus statistics)")
    if not out and not workdir:
        raise ConfigError("--hf needs --workdir (or --out): where the probe's results and example cache go (the model "
                          "directory is left as it is)")
    if not 0 < val_fraction < 1 or max_docs < 0:
        raise ConfigError(f"--val_fraction={val_fraction} must be in (0, 1) and --max_docs={max_docs} >= 0 (0 = all)")
    cfg, graphdef, params, tok = eval_lib.load_hf(hf_dir, tokenizer=tokenizer)
    data_cfg = base_config.get_config().data
    data_cfg.source, data_cfg.max_docs, data_cfg.val_fraction = data, max_docs, val_fraction
    src = sources_lib.open_source(data_cfg)

    def stream(split):
        docs = list(src.documents(split))
        if not docs:
            raise DataError(f"--data={data}: no documents in its {split} split (--val_fraction={val_fraction}, "
                            f"--max_docs={max_docs}); raise --val_fraction or --max_docs, or give more documents")
        return np.concatenate([np.asarray(d + [tok.eos_id], np.int32) for d in tok.encode(docs)])

    return Source(str(hf_dir), [0], lambda s: (graphdef, params), tok, stream("validation"),
                  stream("train")[:MAX_TRAIN_TOKENS], {"hf": str(Path(hf_dir).resolve()), "data": data,
                                                        "val_fraction": val_fraction, "max_docs": max_docs,
                                                        "tokenizer": tok.sha256},
                  Path(out) if out else Path(workdir) / "probe", cfg.n_positions,
                  label=f"hf:{Path(hf_dir).resolve().name}")


# --- representations --------------------------------------------------------------------------------

@jax.jit(static_argnums=0)
def _residuals(graphdef, params, tokens_BT):
    _, res = model_lib.apply(graphdef, params, tokens_BT, collect_residuals=True)
    return res.astype(precision.FP32)  # (L+1, B, T, D)


def features(graphdef, params, data: tasks_lib.ProbeData, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(token features (L+1, Ntok, D), pair features (L+1, Npair, 2D)) of one model."""
    R = data.windows.shape[0]
    tok, doc, qry = [], [], []
    for lo in range(0, R, batch):
        rows = np.arange(lo, min(lo + batch, R))
        res = np.asarray(_residuals(graphdef, params, jnp.asarray(_pad(data.windows[rows], batch))))[:, : rows.size]
        t_sel = (data.tok_row >= lo) & (data.tok_row < lo + rows.size)
        tok.append(res[:, data.tok_row[t_sel] - lo, data.tok_pos[t_sel]])
        p_sel = (data.pair_row >= lo) & (data.pair_row < lo + rows.size)
        csum = np.cumsum(res, axis=2)
        lens = data.pair_len[p_sel]
        doc.append(csum[:, data.pair_row[p_sel] - lo, lens - 1] / lens[None, :, None])
    Q = data.queries
    qb = max(batch * 8, 1)
    for lo in range(0, Q.shape[0], qb):
        q = Q[lo: lo + qb]
        qry.append(np.asarray(_residuals(graphdef, params, jnp.asarray(_pad(q, qb))))[:, : q.shape[0]].mean(axis=2))
    return np.concatenate(tok, axis=1), np.concatenate([np.concatenate(doc, 1), np.concatenate(qry, 1)], axis=-1)


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([x, np.repeat(x[:1], n - x.shape[0], axis=0)]) if x.shape[0] < n else x


# --- the study --------------------------------------------------------------------------------------

def probe_source(src: Source, task_names, *, settings: tasks_lib.TaskSettings = tasks_lib.TaskSettings(),
                 hp: mdl.ProbeSettings = mdl.ProbeSettings(), log=print) -> dict[str, list[dict]]:
    names = tasks_lib.check_tasks(task_names)
    if settings.window > src.n_positions:
        settings = dataclasses.replace(settings, window=src.n_positions)
    key = tasks_lib.cache_key(settings, names, src.identity)
    cache_file = src.out / "cache" / f"tasks-{key}.npz"

    def make():
        log(f"making the probe examples ({', '.join(names)}) -> {cache_file}")
        stats = tasks_lib.corpus_stats(src.train_stream, src.tokenizer.vocab_size, src.tokenizer.eos_id,
                                       settings.window)
        texts = tasks_lib.token_texts(src.tokenizer) if any(n in tasks_lib.NEEDS_TEXT for n in names) else None
        return tasks_lib.make(src.val_stream, stats, names, settings, texts)

    data = tasks_lib.load_or_make(cache_file, make)
    groups = {"token": [n for n in names if n in tasks_lib.TOKEN_TASKS],
              "pair": [n for n in names if n in tasks_lib.PAIR_TASKS]}
    rows_of = {"token": data.tok_row, "pair": data.pair_row}
    order = {}
    for g, rows in rows_of.items():
        train = np.flatnonzero(rows < data.n_train_rows)
        order[g] = (np.random.default_rng(settings.seed).permutation(train), np.flatnonzero(rows >= data.n_train_rows))
    results: dict[str, list[dict]] = {n: [] for n in names}
    for step in src.steps:
        tag = src.label or int(step)  # what the rows, the table, the plot and the log call this model
        t0 = time.perf_counter()
        graphdef, params = src.load_params(step)
        feats = dict(zip(("token", "pair"), features(graphdef, params, data)))
        del params
        t1 = time.perf_counter()
        for g, group in groups.items():
            if not group:
                continue
            tr, te = order[g]
            label_sets = [x for n in group for x in (n, n + "_control")]
            y = np.stack([data.labels[n] for n in label_sets])
            r = mdl.probe(feats[g][:, tr], y[:, tr], [data.classes[n] for n in label_sets], feats[g][:, te],
                          y[:, te], seed=settings.seed, hp=hp)
            for i, n in enumerate(group):
                c, k = 2 * i, 2 * i + 1
                majority = float(np.mean(y[c, te] == np.bincount(y[c, tr]).argmax()))
                for layer in range(r["compression"].shape[0]):
                    results[n].append({
                        "task": n, "step": tag, "layer": layer,
                        "online_bits": r["online_bits"][layer, c], "uniform_bits": r["uniform_bits"][layer, c],
                        "compression": r["compression"][layer, c], "accuracy": r["accuracy"][layer, c],
                        "control_online_bits": r["online_bits"][layer, k],
                        "control_compression": r["compression"][layer, k],
                        "control_accuracy": r["accuracy"][layer, k],
                        "selectivity": r["accuracy"][layer, c] - r["accuracy"][layer, k],
                        "majority_accuracy": majority, "classes": data.classes[n],
                        "n_train": int(tr.size), "n_test": int(te.size)})
        del feats
        best = ", ".join(f"{n} {max(r['compression'] for r in results[n] if r['step'] == tag):.2f}" for n in names)
        log(f"{src.label or f'step {step:>7}'}: representations {t1 - t0:.1f}s, probes {time.perf_counter() - t1:.1f}s; "
            f"best compression: {best}")
    src.out.mkdir(parents=True, exist_ok=True)
    for n in names:
        report.write_task(src.out, n, results[n], {
            "source": src.name, "steps": [src.label] if src.label else src.steps, "definition": tasks_lib.definition(n),
            "tasks": dataclasses.asdict(settings), "probe": dataclasses.asdict(hp),
            "portion_ends": list(mdl.portion_ends(int(order[_group(n)][0].size), hp.min_first)),
            "representations": "residual stream; layer 0 = embedding output, layer i = output of block i",
            "restore": "whole train state through jaxlm.saved_run.load_run; only the parameters are used"})
    log(f"wrote {', '.join(f'{n}.json/.csv/.png' for n in names)} to {src.out}")
    return results


def _group(name: str) -> str:
    return "token" if name in tasks_lib.TOKEN_TASKS else "pair"
