"""What each step trained on (as Pythia's batch viewer): the token rows of any training step, read
from the loader alone, no checkpoint needed.

    cfg = viewer.run_config(workdir)                         # the run's own config (WORKDIR/run.json)
    rows = viewer.batches(cfg, workdir, 1, 100)              # (100, train.batch_size, train.seq_len + 1) int32
    hits = viewer.find(cfg, workdir, "some text")            # [(step, row), ...] of the first epoch

Steps are numbered as in metrics.jsonl, from 1: step n trains on global batch n - 1 of the loader
(``jaxlm.run``: batch k is the one step k + 1 consumes). Every batch is a pure function of the data
order's seed (``data.data_seed``) and its index, so it is read here by random access from the same
token cache (``data.prepare``: found, or built as training builds it) through the same
``data.train_loader``, as one process would read it: the global batch, every host's rows in global
order. Under train.batch_ramp a step may train on only its first micro-batches; the viewer gives the
full global batch the loader yielded.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from jaxlm import config as config_lib
from jaxlm import data, paths
from jaxlm.errors import ConfigError

PROGRESS_FROM = 64  # steps: a shorter range reads too fast to need a progress bar
# The fields that decide which rows a step trains on (besides every data.* field).
ORDER_FIELDS = ("train.seed", "train.batch_size", "train.seq_len")


def parse_range(text: str) -> tuple[int, int]:
    """``"FIRST:LAST"`` -> (FIRST, LAST), inclusive steps from 1; a ConfigError naming --batches."""
    parts = str(text).split(":")
    try:
        first, last = (int(p) for p in parts) if len(parts) == 2 else (int(text),) * 2
    except ValueError:
        raise ConfigError(f"--batches={text}: not FIRST:LAST (two step numbers, e.g. --batches=1:100) or "
                          "one step") from None
    if first < 1:
        raise ConfigError(f"--batches={text}: FIRST must be >= 1 (steps count from 1, as in metrics.jsonl)")
    if last < first:
        raise ConfigError(f"--batches={text}: LAST must be >= FIRST")
    return first, last


def run_config(workdir, cfg=None, log: Callable[[str], None] = print):
    """The validated config whose batches to read: `cfg`, else the run's own (WORKDIR/run.json).

    Where both exist and `cfg` differs from the run's in a field that decides the batches (any
    data.* field, train.seed, train.batch_size, train.seq_len), one warning line names the
    differences: the batches are `cfg`'s, not what the run trained on."""
    path = paths.path(workdir) / "run.json"
    saved = _saved_config(path) if path.exists() else None
    if cfg is None:
        if saved is None:
            raise ConfigError(f"--config is required: {path} does not exist (a run directory's run.json holds the "
                              "config it trained with)")
        cfg = config_lib.from_dict(saved)
    elif saved is not None:
        diffs = [d for d in config_lib.config_differences(saved, config_lib.to_dict(cfg))
                 if d.startswith("data.") or d.split(":", 1)[0] in ORDER_FIELDS]
        if diffs:
            log(f"warning: --config differs from {path} in what decides the batches ({'; '.join(diffs)}); "
                "these are --config's batches, not the ones the run trained on")
    config_lib.validate(cfg)
    return cfg


def _saved_config(path) -> dict:
    try:
        return json.loads(path.read_text())["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a run's run.json ({type(e).__name__}: {e}); give --config") from None


def open_loader(cfg, workdir, log: Callable[[str], None] = print):
    """(token cache, training loader) of `cfg`: the cache training uses (found under data.cache_dir or
    the machine's cache, or built there), its loader as one process reads it (the global batches)."""
    config_lib.validate(cfg)
    config_lib.check_corpus(cfg)
    paths.check_url(workdir, "--workdir")
    paths.check_url(cfg.data.cache_dir, "data.cache_dir")
    cache = data.prepare(cfg, workdir, log=log)
    return cache, data.train_loader(cache, cfg, process_index=0, process_count=1)


def epoch_steps(loader: data.Loader) -> int:
    """Steps until every training row has been read once: the first epoch (its last batch may end in
    the next epoch's rows)."""
    return math.ceil(len(loader.rows) / loader.global_batch)


def batches(cfg, workdir, first: int, last: int, *, log: Callable[[str], None] = print,
            out: str | os.PathLike | None = None) -> np.ndarray:
    """The int32 rows steps `first`..`last` (inclusive, from 1) train on: shape (last - first + 1,
    train.batch_size, train.seq_len + 1), index i the global batch of step first + i.

    With `out`, written there as a .npy file through a memory map (memory stays bounded for any
    range; the file appears only once complete) and returned memory-mapped."""
    if first < 1 or last < first:
        raise ConfigError(f"--batches={first}:{last}: FIRST must be >= 1 and LAST >= FIRST")
    _, loader = open_loader(cfg, workdir, log)
    shape = (last - first + 1, loader.global_batch, cfg.train.seq_len + 1)
    partial = None
    try:
        if out is None:
            arr = np.empty(shape, np.int32)
        else:
            out = Path(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            partial = out.with_name(out.name + ".partial")
            arr = np.lib.format.open_memmap(partial, mode="w+", dtype=np.int32, shape=shape)
        for i, step in enumerate(_steps(first, last, "reading")):
            arr[i] = loader.batch(step - 1)
        if partial is not None:
            arr.flush()
            os.replace(partial, out)
    except BaseException:
        if partial is not None:
            partial.unlink(missing_ok=True)
        raise
    finally:
        loader.close()
    return arr


def token_patterns(tokenizer, text: str) -> list[list[int]]:
    """The id sequences `text` appears as: its own ids, and those after a space (BPE tokenizes a word
    differently there); without repeats, empty ones left out."""
    found: list[list[int]] = []
    for ids in tokenizer.encode([text, " " + text]):
        ids = [int(i) for i in ids]
        if ids and ids not in found:
            found.append(ids)
    return found


def rows_containing(batch: np.ndarray, pattern: list[int]) -> np.ndarray:
    """Indices of the rows of `batch` (rows, tokens) that contain `pattern` contiguously."""
    n = batch.shape[1] - len(pattern) + 1
    if n <= 0:
        return np.zeros(0, np.int64)
    hit = batch[:, :n] == pattern[0]
    for j, t in enumerate(pattern[1:], 1):
        hit &= batch[:, j:j + n] == t
    return np.flatnonzero(hit.any(axis=1))


def find(cfg, workdir, text: str, first: int | None = None, last: int | None = None, *,
         log: Callable[[str], None] = print) -> list[tuple[int, int]]:
    """(step, row) of every row steps `first`..`last` train on that contains `text`'s token ids (or
    those of " " + `text`), in order. Without a range: the first epoch, steps 1 to ``epoch_steps``
    (grain shuffles every epoch anew, so later epochs hold the same rows at other steps: give their
    range). A text crossing a row boundary is not found: rows are separate training examples."""
    if not text:
        raise ConfigError("--find: an empty text; give the text to search for")
    cache, loader = open_loader(cfg, workdir, log)
    try:
        patterns = token_patterns(cache.tokenizer(), text)
        if first is None:
            first, last = 1, epoch_steps(loader)
            log(f"searching the first epoch: steps 1 to {last} ({loader.global_batch} rows a step read the "
                f"{len(loader.rows):,} training rows once; grain shuffles every epoch anew, so a later epoch holds "
                "them at other steps: search those with --batches=FIRST:LAST)")
        log(f"{text!r} is the token ids {' or '.join(str(p) for p in patterns)}")
        hits = []
        for step in _steps(first, last, "searching"):
            batch = loader.batch(step - 1)
            rows = set()
            for p in patterns:
                rows.update(int(r) for r in rows_containing(batch, p))
            hits.extend((step, r) for r in sorted(rows))
    finally:
        loader.close()
    return hits


def _steps(first: int, last: int, what: str):
    """Steps first..last, with a progress bar on stderr for a long range (where stderr is a terminal)."""
    n = last - first + 1
    return tqdm(range(first, last + 1), desc=f"{what} steps", unit="step", file=sys.stderr,
                disable=None if n >= PROGRESS_FROM else True, mininterval=1.0, leave=False)
