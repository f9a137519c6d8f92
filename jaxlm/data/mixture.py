"""Weighted mixtures of sources: ``data.source="mix:0.7*parquet:/a/*.parquet,0.3*jsonl:/b/*.jsonl"``.

Each component is an ordinary source with its own token cache, keyed as if it were trained on
alone (the weights are in no cache key): a component shared by several mixtures, or a weight
changed, reuses the cache. Without ``data.tokenizer`` one tokenizer is trained for the mixture on
the components' documents taken in turn (its key names the components, not the weights).

The training rows come from a seeded schedule (:class:`Schedule`, a grain ``DatasetSelectionMap``
handed to ``grain.MapDataset.select_from_datasets``): global row ``i`` belongs to block
``i // BLOCK``; each block's component counts are one multinomial draw with the weights, in an
order permuted by a generator seeded with (data.seed, block). So the mixture is random (realised
proportions vary as a multinomial sample does), every row is a pure function of (seed, weights,
i), and a resumed run reads exactly the rows an uninterrupted one reads. Within a component the
rows follow that component's own shuffle (seeded by data.seed and its spec), a new one per epoch.

Validation: each component's held-out rows on their own (per-component losses), and together
interleaved by weight (``grain.MapDataset.mix``) for the overall loss.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import threading

import grain
import numpy as np

from jaxlm.data import cache as cache_lib
from jaxlm.data import sources as sources_lib
from jaxlm.data import tokenizer as tok_lib
from jaxlm.errors import DataError

PREFIX = "mix:"
BLOCK = 1024  # rows per block of the schedule
_CHUNK = 256  # blocks whose counts are drawn together (the unit of the prefix-count memo)
_COMPONENT = re.compile(r"\s*([0-9.eE+-]+)\s*\*\s*(\S.*?)\s*$")


def is_mixture(spec: str) -> bool:
    return str(spec).startswith(PREFIX)


def parse(spec: str) -> list[tuple[float, str]]:
    """[(weight, source spec)] of a ``mix:`` spec, weights normalised to sum 1."""
    body = spec[len(PREFIX):]
    # a component starts after a comma followed by "WEIGHT*" (globs may hold commas elsewhere)
    parts = re.split(r",(?=\s*[0-9.eE+-]+\s*\*)", body)
    out = []
    for part in parts:
        m = _COMPONENT.match(part)
        try:
            w = float(m.group(1)) if m else None
        except ValueError:
            w = None
        if w is None or not m.group(2) or is_mixture(m.group(2)):
            raise DataError(f"data.source={spec!r}: component {part.strip()!r} is not WEIGHT*SOURCE; write "
                            "mix:0.7*parquet:/a/*.parquet,0.3*jsonl:/b/*.jsonl")
        if not np.isfinite(w) or w < 0:
            raise DataError(f"data.source={spec!r}: weight {m.group(1)} of {m.group(2)!r} is not a number >= 0")
        out.append((w, m.group(2)))
    total = sum(w for w, _ in out)
    if not total > 0:
        raise DataError(f"data.source={spec!r}: the weights sum to {total:g}; give at least one component a "
                        "positive weight")
    return [(w / total, s) for w, s in out if w > 0]


def _component_cfg(data_cfg, spec: str, tokenizer: str):
    c = copy.deepcopy(data_cfg)
    c.source, c.tokenizer = spec, tokenizer
    return c


class MixSource(sources_lib.Source):
    """The components' training documents in turn: what a mixture's tokenizer is trained on."""

    def __init__(self, spec, data_cfg, components: list[sources_lib.Source]):
        super().__init__(spec, data_cfg)
        self.components = components

    def fingerprint(self):  # the components, not the weights
        return {"mix": [c.fingerprint() for c in self.components]}

    def holds_out(self):  # each component splits itself (jaxlm.data.splits)
        return any(c.holds_out() for c in self.components)

    def tail_cut(self):  # not None where a component's validation split is its tail: the tokenizer's key says so
        return next((at for c in self.components if c.holds_out() and (at := c.tail_cut()) is not None), None)

    def documents(self, split):
        streams = [c.documents(split) for c in self.components]
        while streams:
            for s in list(streams):
                try:
                    yield next(s)
                except StopIteration:
                    streams.remove(s)


@dataclasses.dataclass
class MixtureCache:
    """The component token caches of a mixture and its schedule; reads like a TokenCache where the run
    needs one (tokenizer, vocabulary, manifest)."""

    spec: str
    weights: list[float]
    specs: list[str]
    components: list[cache_lib.TokenCache]
    seed: int

    @property
    def path(self):
        return self.components[0].path

    @property
    def seq_len(self) -> int:
        return self.components[0].seq_len

    @property
    def tokenizer_spec(self) -> str:
        return self.components[0].tokenizer_spec

    @property
    def tokenizer_path(self):
        return self.components[0].tokenizer_path

    def tokenizer(self):
        return self.components[0].tokenizer()

    @property
    def schedule_key(self) -> str:
        return hashlib.sha256(json.dumps([self.seed, self.weights, self.specs]).encode()).hexdigest()[:20]

    @property
    def manifest(self) -> dict:
        first = self.components[0].manifest
        splits = {s: {k: sum(c.manifest["splits"][s].get(k, 0) for c in self.components)
                      for k in ("documents", "tokens", "sequences")} for s in sources_lib.SPLITS}
        for s in sources_lib.SPLITS:  # ids used by any component (a lower bound of the union)
            splits[s]["vocab_used"] = max(c.manifest["splits"][s].get("vocab_used", 0) for c in self.components)
        counters = {k: sum(c.manifest.get("counters", {}).get(k, 0) for c in self.components)
                    for k in ("empty_documents", "replaced_bytes_documents", "missing_field")}
        return {**{k: first[k] for k in ("seq_len", "dtype", "vocab_size", "eos_id", "tokenizer_sha256")},
                "source": self.spec, "splits": splits, "counters": counters,
                "mixture": {"weights": self.weights, "schedule_key": self.schedule_key,
                            "components": [{"source": s, "weight": w, "cache": str(c.path)}
                                           for s, w, c in zip(self.specs, self.weights, self.components)]}}

    def split(self, name: str) -> np.ndarray:
        """Validation: the components' rows interleaved by weight (grain's mix); train: see order()."""
        parts = [c.split(name) for c in self.components]
        live = [(p, w) for p, w in zip(parts, self.weights) if len(p)]
        if not live:
            return np.zeros((0, self.seq_len + 1), np.dtype(self.components[0].manifest["dtype"]))
        ds = grain.MapDataset.mix([grain.MapDataset.source(p) for p, _ in live], [w for _, w in live])
        return np.stack([ds[i] for i in range(len(ds))]) if len(ds) else np.zeros((0, self.seq_len + 1))

    def order(self, seed: int) -> grain.MapDataset:
        """The training rows in schedule order, endless (each component reshuffled every epoch)."""
        parts = []
        for spec, c in zip(self.specs, self.components):
            s = int.from_bytes(hashlib.blake2b(f"{seed}\0{spec}".encode(), digest_size=4).digest(), "big")
            parts.append(grain.MapDataset.source(c.split("train")).shuffle(seed=s).repeat())
        return grain.MapDataset.select_from_datasets(parts, Schedule(self.weights, seed))

    def describe(self, rows: int, whole_run: bool = True) -> str:
        """The realised proportions over the run's `rows` (or, for a run whose length a budget decides,
        over its first `rows`)."""
        rows = int(rows)
        counts = Schedule(self.weights, self.seed).counts(rows)
        got = ", ".join(f"{s} {n / max(rows, 1):.3f} (weight {w:.3f})"
                        for s, w, n in zip(self.specs, self.weights, counts))
        span = f"the run's {rows:,} rows" if whole_run else f"the first {rows:,} rows (the budget decides the run's length)"
        return f"data: mixture of {len(self.specs)} sources; realised proportions over {span}: {got}"


class Schedule(grain.transforms.DatasetSelectionMap):
    """Global row -> (component, row within the component's endless order); see the module docstring."""

    def __init__(self, weights, seed: int):
        self.weights, self.seed = np.asarray(weights, np.float64), int(seed)
        self._before: dict[int, np.ndarray] = {}  # chunk -> counts of each component before each of its blocks
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return 2**62

    def _chunk(self, j: int) -> np.ndarray:
        """(_CHUNK + 1, C) counts of each component before each block of chunk j (and after the last)."""
        with self._lock:
            done = max((k for k in self._before if k <= j), default=-1)
            for k in range(done + 1, j + 1):  # chunks in order: each starts where the previous ended
                start = self._before[k - 1][-1] if k > 0 else np.zeros(len(self.weights), np.int64)
                rng = np.random.default_rng([self.seed, 0, k])
                counts = rng.multinomial(BLOCK, self.weights / self.weights.sum(), size=_CHUNK)
                self._before[k] = start + np.concatenate([np.zeros((1, len(self.weights)), np.int64),
                                                          np.cumsum(counts, 0)])
            return self._before[j]

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        before = self._chunk(b // _CHUNK)
        start, end = before[b % _CHUNK], before[b % _CHUNK + 1]
        labels = np.repeat(np.arange(len(self.weights)), end - start)
        labels = np.random.default_rng([self.seed, 1, b]).permutation(labels)
        # rank of each position among the positions of the same component, within the block
        rank = np.zeros(BLOCK, np.int64)
        for c in range(len(self.weights)):
            where = labels == c
            rank[where] = np.arange(int(where.sum()))
        return labels, rank, start

    def __getitem__(self, index: int) -> tuple[int, int]:
        b, r = divmod(int(index), BLOCK)
        cached = getattr(self, "_last", None)
        if cached is None or cached[0] != b:
            cached = (b, *self._block(b))
            self._last = cached
        _, labels, rank, start = cached
        c = int(labels[r])
        return c, int(start[c] + rank[r])

    def counts(self, rows: int) -> np.ndarray:
        """Rows of each component among the first `rows`."""
        b, r = divmod(rows, BLOCK)
        before = self._chunk(b // _CHUNK)[b % _CHUNK].copy()
        if r:
            labels = self._block(b)[0][:r]
            before += np.bincount(labels, minlength=len(self.weights))
        return before


def build(data_cfg, seq_len: int, cache_root, log=print, fetch=None) -> MixtureCache:
    """The component caches of a mixture (each built once), its tokenizer trained once if not given."""
    parsed = parse(data_cfg.source)
    tokenizer = data_cfg.tokenizer
    if not tokenizer:
        comps = [sources_lib.open_source(_component_cfg(data_cfg, s, "")) for _, s in parsed]
        mix = MixSource(data_cfg.source, data_cfg, comps)
        tok = cache_lib.tokenizer_for(data_cfg, mix, cache_root, log, fetch=fetch)
        tokenizer = tok.path if tok.kind == "sentencepiece" else tok_lib.HF_PREFIX + tok.path
    caches = [cache_lib.build(_component_cfg(data_cfg, s, tokenizer), seq_len, cache_root, log=log, fetch=fetch)
              for _, s in parsed]
    return MixtureCache(data_cfg.source, [w for w, _ in parsed], [s for _, s in parsed], caches,
                        int(data_cfg.seed))
