"""Probing tasks, generated offline from a run's own text: which examples, and what each label means.

The text is the run's validation split as token windows of ``window`` tokens (consecutive slices of
the validation token stream, documents joined by EOS as in training). Rows ``[0, n_train_rows)`` give
the training examples, the rest the test examples (split by window, so no window is on both sides).
Corpus statistics (token counts, document frequencies) come from the run's training split.

Token-level tasks: ``tokens_per_row`` positions sampled per window (without replacement, fixed by the
seed); the label of the token x_i at position i of its window (i = 0 is the window's first token):

``position``          log-bucketed position: 0 for i = 0, else 1 + floor(log2(i)) (the bit length of i:
                      1 | 2-3 | 4-7 | ... | 64-127), window 128: 8 classes.
``token_frequency``   Zipf class of the token's type: types sorted by training-split count (most
                      frequent first, ties by id); class c holds the types whose cumulative count
                      before them falls in [c/8, (c+1)/8) of all training tokens (8 classes, each about
                      an eighth of running text; class 0 is the handful of most frequent types).
``prev_token``        the previous token x_{i-1} if it is one of the 15 most frequent training types
                      (its rank, 0..14), else 15 ("other"; also at i = 0): 16 classes.
``repeat``            0 if x_i does not occur earlier in the window, else 1 + floor(log2(d)) for the
                      distance d >= 1 to its latest earlier occurrence, capped at 7: 8 classes.
``word_start``        1 if the token's first word character (letter, digit or underscore) starts a
                      word: the character before it (in the token, or the previous tokens' text in the
                      window) is not a word character, or there is none; 0 otherwise, including tokens
                      without a word character. 2 classes.
``bracket_depth``     the number of brackets ``([{`` opened and not yet closed (``)]}``, never below 0)
                      in the window's text before the token, capped at 3: 4 classes.
``capitalised_span``  1 if the token's first word character belongs to a word whose first character is
                      an uppercase letter (the word may have started in an earlier token), else 0
                      (also for tokens without a word character). 2 classes.

A token's text is its SentencePiece piece with ``▁`` as a space and byte pieces ``<0xNN>`` as that
byte (a lone byte of a multi-byte character counts as no character).

Ranking tasks, at the level of a (query, document) pair; ``pairs_per_row`` pairs per window. The
document d is the first ``dl`` tokens of the window, dl uniform in [8, window]; the query is
``query_terms`` distinct token types, each drawn (with probability 1/2) uniformly from the document's
tokens or else from the training split's unigram distribution (redrawn when already in the query).
Corpus statistics: the training split cut into passages at every EOS and after every ``window``
tokens; N passages, df(t) passages containing t, avgdl their mean length. With tf(t, d) the count of
t in d, k1 = 1.2, b = 0.75 and idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5)) (Lucene's, never
negative), the raw values are

``tf``    sum over query terms of tf(t, d);
``idf``   sum over query terms of idf(t) (a property of the query alone);
``bm25``  sum over query terms of idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * dl / avgdl)),

each binned into ``pair_classes`` classes at the quantiles of its values over all pairs (train and
test; bin edges ``np.quantile`` at 1/K, ..., (K-1)/K, class = number of edges <= value, so ties
stay together and a class can be rarer than 1/K). The model sees the document (mean of its
residual stream over the dl positions) and the query run as its own sequence (mean over its terms);
the probe's input is the two concatenated.

Controls (Hewitt & Liang 2019), ``<task>_control`` for every task: each token type gets a class drawn
at random (from the seed) from the task's empirical label distribution over all examples; a token
example's control label is its own token type's class (the type is the token x_i itself, for every
token task), a pair's is its query's first term's class. A probe that does well on a control
memorises types; selectivity = task accuracy - control accuracy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np

from jaxlm.errors import ConfigError, DataError

TOKEN_TASKS = ("position", "token_frequency", "prev_token", "repeat", "word_start", "bracket_depth",
               "capitalised_span")
PAIR_TASKS = ("tf", "idf", "bm25")
TASKS = TOKEN_TASKS + PAIR_TASKS
NEEDS_TEXT = ("word_start", "bracket_depth", "capitalised_span")  # need each token's text
K1, B = 1.2, 0.75
ZIPF_CLASSES, PREV_TOP, REPEAT_CLASSES, MAX_DEPTH = 8, 15, 8, 3
FORMAT_VERSION = 1  # part of the cache key: bump it when an example or label definition changes


@dataclasses.dataclass(frozen=True)
class TaskSettings:
    window: int = 128  # tokens per window (at most the model's n_positions)
    rows: int = 256  # windows of validation text
    test_fraction: float = 0.2  # of the windows, the last ones
    tokens_per_row: int = 40
    pairs_per_row: int = 16
    query_terms: int = 3
    pair_classes: int = 4
    seed: int = 0


def check_tasks(names) -> list[str]:
    """The task names asked for, in order, without duplicates; ``<task>_control`` means its task
    (controls always come with their task). An unknown name is a ConfigError listing the known ones."""
    out = []
    for n in names:
        base = n[: -len("_control")] if n.endswith("_control") else n
        if base not in TASKS:
            raise ConfigError(f"--tasks: unknown task {n!r}; known: {', '.join(TASKS)} (each also as <task>_control)")
        if base not in out:
            out.append(base)
    if not out:
        raise ConfigError(f"--tasks: no task given; known: {', '.join(TASKS)}")
    return out


def definition(name: str) -> str:
    """The task's label definition, as this module's docstring gives it."""
    lines = __doc__.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"``{name}``"):
            out = [line[len(name) + 4:].strip()]
            for more in lines[i + 1:]:
                if not more.startswith(" ") or not more.strip():
                    break
                out.append(more.strip())
            text = " ".join(out)
            if name in PAIR_TASKS:
                text += " The label: its quantile class (pair_classes classes, see jaxlm.probe.tasks)."
            return text
    raise KeyError(name)


# --- corpus statistics --------------------------------------------------------------------------

@dataclasses.dataclass
class CorpusStats:
    counts: np.ndarray  # (V,) training-split count of each type
    df: np.ndarray  # (V,) passages containing each type
    n_passages: int
    avgdl: float

    def idf(self, t):
        df = self.df[t]
        return np.log1p((self.n_passages - df + 0.5) / (df + 0.5))


def corpus_stats(train_stream: np.ndarray, vocab_size: int, eos_id: int, window: int) -> CorpusStats:
    """Counts and BM25 statistics of the training token stream (passages: cut at EOS and every `window`)."""
    s = np.asarray(train_stream, np.int64)
    if s.size == 0:
        raise DataError("the training split has no tokens; cannot compute corpus statistics")
    counts = np.bincount(s, minlength=vocab_size)[:vocab_size]
    # passage id of every token: a new passage after each EOS and after `window` tokens of a passage
    doc = np.concatenate([[0], np.cumsum(s[:-1] == eos_id)])
    start = np.concatenate([[0], np.flatnonzero(np.diff(doc)) + 1])  # first token of each document
    pos_in_doc = np.arange(s.size) - np.repeat(start, np.diff(np.append(start, s.size)))
    # passages: (document, chunk of `window`); renumber densely
    key = doc * (s.size // window + 2) + pos_in_doc // window
    _, passage = np.unique(key, return_inverse=True)
    n_passages = int(passage.max()) + 1
    pairs = np.unique(passage * vocab_size + s)
    df = np.bincount(pairs % vocab_size, minlength=vocab_size)[:vocab_size]
    return CorpusStats(counts, df, n_passages, float(s.size) / n_passages)


def bm25_values(query: np.ndarray, doc_counts: dict, dl: int, stats: CorpusStats) -> tuple[float, float, float]:
    """(tf, idf, bm25) of one query (distinct token ids) against a document given as {type: count}."""
    tf_sum = idf_sum = score = 0.0
    for t in query:
        tf = doc_counts.get(int(t), 0)
        idf = float(stats.idf(int(t)))
        tf_sum += tf
        idf_sum += idf
        score += idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * dl / stats.avgdl))
    return tf_sum, idf_sum, score


def zipf_classes(counts: np.ndarray, k: int = ZIPF_CLASSES) -> np.ndarray:
    """(V,) Zipf class of every type: equal shares of the training tokens, most frequent types first."""
    order = np.lexsort((np.arange(counts.size), -counts))
    before = np.cumsum(counts[order]) - counts[order]
    cls = np.empty(counts.size, np.int32)
    cls[order] = np.minimum((k * before) // max(int(counts.sum()), 1), k - 1)
    return cls


def position_buckets(pos: np.ndarray) -> np.ndarray:
    """The bit length of each position: 0 | 1 | 2-3 | 4-7 | ..."""
    return np.array([int(p).bit_length() for p in pos], np.int32)


def quantile_bins(values: np.ndarray, k: int) -> np.ndarray:
    edges = np.quantile(values, np.arange(1, k) / k)
    return np.searchsorted(edges, values, side="right").astype(np.int32)


# --- token texts ----------------------------------------------------------------------------------

def token_texts(tokenizer) -> list[str]:
    """Each id's text: SentencePiece's piece with ▁ as space, a byte piece as its byte (if ASCII)."""
    out = []
    for i in range(tokenizer.vocab_size):
        p = tokenizer.sp.id_to_piece(i)
        if tokenizer.sp.is_byte(i):
            b = int(p[3:-1], 16)
            out.append(chr(b) if b < 128 else "")
        elif tokenizer.sp.is_control(i) or tokenizer.sp.is_unknown(i):
            out.append("")
        else:
            out.append(p.replace("\u2581", " "))
    return out


def _word(c: str) -> bool:
    return c.isalnum() or c == "_"


def text_labels(window: np.ndarray, texts: list[str]) -> dict[str, np.ndarray]:
    """word_start, bracket_depth, capitalised_span of every token of one window."""
    T = len(window)
    ws, depth, cap = np.zeros(T, np.int32), np.zeros(T, np.int32), np.zeros(T, np.int32)
    prev, d, word_cap = "", 0, False  # previous character, open brackets, current word capitalised
    for i, t in enumerate(window):
        depth[i] = min(d, MAX_DEPTH)
        first = True
        for c in texts[int(t)]:
            starts = _word(c) and not _word(prev)
            if starts:
                word_cap = c.isupper()
            if first and _word(c):
                ws[i], cap[i], first = int(starts), int(word_cap), False
            if c in "([{":
                d += 1
            elif c in ")]}":
                d = max(d - 1, 0)
            prev = c
    return {"word_start": ws, "bracket_depth": depth, "capitalised_span": cap}


# --- the examples ---------------------------------------------------------------------------------

@dataclasses.dataclass
class ProbeData:
    """Everything a probe needs but the representations: the windows, which positions and pairs are
    examples, their labels (task and control) and the number of classes of each task."""

    windows: np.ndarray  # (R, T) int32 token windows fed to the model
    n_train_rows: int
    tok_row: np.ndarray  # (Ntok,) token examples: window and position
    tok_pos: np.ndarray
    pair_row: np.ndarray  # (Npair,) pair examples: window, document length, query terms
    pair_len: np.ndarray
    queries: np.ndarray  # (Npair, Q)
    labels: dict  # name (task or <task>_control) -> (N,) int32
    classes: dict  # name -> number of classes
    values: dict  # pair tasks' raw values (tf, idf, bm25) -> (Npair,) float64

    def arrays(self) -> dict:
        out = {k: getattr(self, k) for k in ("windows", "tok_row", "tok_pos", "pair_row", "pair_len", "queries")}
        out["n_train_rows"] = np.asarray(self.n_train_rows)
        out.update({f"label/{k}": v for k, v in self.labels.items()})
        out.update({f"classes/{k}": np.asarray(v) for k, v in self.classes.items()})
        out.update({f"value/{k}": v for k, v in self.values.items()})
        return out

    @classmethod
    def from_arrays(cls, a) -> "ProbeData":
        pick = {k: a[k] for k in ("windows", "tok_row", "tok_pos", "pair_row", "pair_len", "queries")}
        return cls(**pick, n_train_rows=int(a["n_train_rows"]),
                   labels={k[6:]: a[k] for k in a if k.startswith("label/")},
                   classes={k[8:]: int(a[k]) for k in a if k.startswith("classes/")},
                   values={k[6:]: a[k] for k in a if k.startswith("value/")})


def make(val_stream: np.ndarray, stats: CorpusStats, tasks, settings: TaskSettings,
         texts: list[str] | None = None) -> ProbeData:
    """Windows, examples and labels of `tasks` (names from ``check_tasks``), deterministic in the seed."""
    s = settings
    rng = np.random.default_rng(s.seed)
    T = s.window
    n_rows = min(s.rows, len(val_stream) // T)
    if n_rows < 10:
        raise DataError(f"the validation text has {len(val_stream)} tokens: fewer than 10 windows of {T}; "
                        "use a smaller --window or more validation text (a run with more; with --hf, a larger "
                        "--val_fraction or --max_docs)")
    n_train_rows = n_rows - max(1, round(n_rows * s.test_fraction))
    windows = np.asarray(val_stream[: n_rows * T], np.int32).reshape(n_rows, T)
    V = stats.counts.size
    k_tok = min(s.tokens_per_row, T)
    tok_pos = np.stack([np.sort(rng.choice(T, k_tok, replace=False)) for _ in range(n_rows)])
    tok_row = np.repeat(np.arange(n_rows), k_tok)
    tok_pos = tok_pos.reshape(-1).astype(np.int32)
    tok_ids = windows[tok_row, tok_pos]
    labels, classes, values = {}, {}, {}
    token_tasks = [t for t in tasks if t in TOKEN_TASKS]
    if any(t in NEEDS_TEXT for t in token_tasks) and texts is None:
        raise ConfigError(f"tasks {[t for t in token_tasks if t in NEEDS_TEXT]} need the tokenizer's texts")
    top = np.lexsort((np.arange(V), -stats.counts))[:PREV_TOP]
    prev_rank = np.full(V, PREV_TOP, np.int32)
    prev_rank[top] = np.arange(PREV_TOP)
    per_window = [text_labels(w, texts) for w in windows] if any(t in NEEDS_TEXT for t in token_tasks) else None
    for t in token_tasks:
        if t == "position":
            y, k = position_buckets(tok_pos), (T - 1).bit_length() + 1
        elif t == "token_frequency":
            y, k = zipf_classes(stats.counts)[tok_ids], ZIPF_CLASSES
        elif t == "prev_token":
            prev = np.where(tok_pos > 0, windows[tok_row, np.maximum(tok_pos - 1, 0)], -1)
            y, k = np.where(prev >= 0, prev_rank[np.maximum(prev, 0)], PREV_TOP), PREV_TOP + 1
        elif t == "repeat":
            y, k = _repeat_labels(windows, tok_row, tok_pos), REPEAT_CLASSES
        else:
            y = np.array([per_window[r][t][p] for r, p in zip(tok_row, tok_pos)], np.int32)
            k = MAX_DEPTH + 1 if t == "bracket_depth" else 2
        labels[t], classes[t] = y.astype(np.int32), k
        labels[t + "_control"], classes[t + "_control"] = _control(y, tok_ids, V, k, rng), k
    # ranking pairs
    m = s.pairs_per_row
    pair_row = np.repeat(np.arange(n_rows), m)
    pair_len = rng.integers(min(8, T), T + 1, size=pair_row.size).astype(np.int32)
    unigram = stats.counts / stats.counts.sum()
    queries = np.zeros((pair_row.size, s.query_terms), np.int32)
    raw = np.zeros((pair_row.size, 3))
    for j, (r, dl) in enumerate(zip(pair_row, pair_len)):
        doc = windows[r, :dl]
        q: list[int] = []
        while len(q) < s.query_terms:
            t = int(doc[rng.integers(dl)]) if rng.random() < 0.5 else int(rng.choice(V, p=unigram))
            if t not in q:
                q.append(t)
        queries[j] = q
        ids, cnt = np.unique(doc, return_counts=True)
        raw[j] = bm25_values(queries[j], dict(zip(ids.tolist(), cnt.tolist())), int(dl), stats)
    for i, t in enumerate(PAIR_TASKS):
        if t not in tasks:
            continue
        y = quantile_bins(raw[:, i], s.pair_classes)
        labels[t], classes[t], values[t] = y, s.pair_classes, raw[:, i]
        labels[t + "_control"], classes[t + "_control"] = _control(y, queries[:, 0], V, s.pair_classes, rng), \
            s.pair_classes
    return ProbeData(windows, n_train_rows, tok_row.astype(np.int32), tok_pos, pair_row.astype(np.int32), pair_len,
                     queries, labels, classes, values)


def _repeat_labels(windows, rows, pos) -> np.ndarray:
    out = np.zeros(rows.size, np.int32)
    for j, (r, p) in enumerate(zip(rows, pos)):
        earlier = np.flatnonzero(windows[r, :p] == windows[r, p])
        if earlier.size:
            out[j] = min(1 + int(math.floor(math.log2(p - earlier[-1]))), REPEAT_CLASSES - 1)
    return out


def _control(y: np.ndarray, types: np.ndarray, vocab_size: int, k: int, rng) -> np.ndarray:
    """Hewitt & Liang's control: a random class per type, drawn from the empirical distribution of `y`."""
    marginal = np.bincount(y, minlength=k) / y.size
    per_type = rng.choice(k, size=vocab_size, p=marginal).astype(np.int32)
    return per_type[types]


# --- cached under the run -------------------------------------------------------------------------

def cache_key(settings: TaskSettings, tasks, source: dict) -> str:
    text = json.dumps({"v": FORMAT_VERSION, "settings": dataclasses.asdict(settings), "tasks": sorted(tasks),
                       "source": source}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_or_make(path: Path, make_fn) -> ProbeData:
    """The ProbeData cached at `path` (an .npz), else made by `make_fn()` and written atomically."""
    if path.exists():
        with np.load(path) as a:
            return ProbeData.from_arrays({k: a[k] for k in a.files})
    data = make_fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **data.arrays())
    tmp.replace(path)  # atomic: a reader sees the whole file or none
    return data
