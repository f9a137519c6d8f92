"""Evaluation texts and their scorers: WikiText, LAMBADA and any ``data.source``, read and tokenized
once, scored by sliding windows (``windows``) or by the last word. ``python -m jaxlm.eval`` evaluates
saved checkpoints with them, a run its ``train.eval_sets`` as it trains:

    sets = evalsets.parse_eval_sets(cfg.train.eval_sets)         # ('NAME=SPEC', ...) -> [EvalSet]
    evalsets.check_files(sets, cfg.data)                         # a missing file: one DataError
    fns = evalsets.callbacks(sets, cfg, cache.tokenizer, trainer)  # {name: params -> {metric: value}}

The jitted scoring functions: ``unsharded_scorer(graphdef)`` (cached per model structure, the CLI's)
or ``sharded_scorer`` (on a run's parameters as its mesh shards them).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import model as model_lib
from jaxlm import sharding, telemetry
from jaxlm.data import sources as sources_lib
from jaxlm.errors import ConfigError, DataError

# Hugging Face's perplexity recipe at GPT-2's 1024 positions with Mistral's stride.
MISTRAL_CONTEXT, MISTRAL_STRIDE = 1023, 512
# The kinds of SPEC in train.eval_sets: two files, or a data.source spec read as one stream of documents
# (not tokens: or mix:, which hold no text of their own).
STREAM_KINDS = ("stdlib", "files", "jsonl", "tfds", "parquet", "hf")
KINDS = ("wikitext", "lambada", *STREAM_KINDS)
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_RESERVED = re.compile(r"mix\d+")  # eval/mix<i>/loss is a mixture component's validation loss


@dataclasses.dataclass
class Text:
    tokens: np.ndarray  # the token stream (documents joined by EOS)
    n_bytes: int  # UTF-8 bytes of the documents' text
    n_documents: int


# --- texts --------------------------------------------------------------------------------------

# WikiText's tokenisation undone, in order (the detokenizer of Megatron-LM's zero-shot evaluation,
# which Mistral used): (what, pattern, replacement); patterns are regular expressions.
WIKITEXT_RULES: tuple[tuple[str, str, str], ...] = (
    ("possessive after s", r"s '", "s'"),
    ("number separator -", r" @-@ ", "-"),
    ("number separator ,", r" @,@ ", ","),
    ("number separator .", r" @\.@ ", "."),
    ("space before :", r" : ", ": "),
    ("space before ;", r" ; ", "; "),
    ("space before .", r" \. ", ". "),
    ("space before !", r" ! ", "! "),
    ("space before ?", r" \? ", "? "),
    ("space before ,", r" , ", ", "),
    ("inside ( )", r"\(\s*([^\)]*?)\s*\)", r"(\1)"),
    ("inside [ ]", r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    ("inside { }", r"{\s*([^}]*?)\s*}", r"{\1}"),
    ('inside " "', r'"\s*([^"]*?)\s*"', r'"\1"'),
    ("inside ' '", r"'\s*([^']*?)\s*'", r"'\1'"),
    ("heading = = = =", r"= = = =", "===="),
    ("heading = = =", r"= = =", "==="),
    ("heading = =", r"= =", "=="),
    ("degree sign", " \u00b0 ", "\u00b0"),
    ("space before a newline", r" \n", "\n"),
    ("space after a newline", r"\n ", "\n"),
    ("number placeholder", r" N ", " 1 "),
    ("possessive 's", r" 's", "'s"),
)
_WIKITEXT_COMPILED = tuple((re.compile(p), r) for _, p, r in WIKITEXT_RULES)


def wikitext_detokenize(text: str) -> str:
    """WikiText's raw token format back to running text, by ``WIKITEXT_RULES`` in order."""
    for pattern, replacement in _WIKITEXT_COMPILED:
        text = pattern.sub(replacement, text)
    return text


def _read(path: str, where: str) -> str:
    """A local file's text; `where` starts the error (the flag or config entry that named the file)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{where}: no such file")
    return p.read_bytes().decode("utf-8", errors="replace")


def documents(data_spec: str, data_cfg, split: str = "train", max_docs: int = 0, *, where: str | None = None) -> list[str]:
    """The documents of an evaluation text: a ``wikitext:`` file (one detokenized document) or every
    document of a ``data.source`` spec (`split` of it). `where` (default ``--data=SPEC``) starts a
    missing file's error; a source's own errors are prefixed with it when given."""
    kind, _, path = data_spec.partition(":")
    if kind == "wikitext":
        return [wikitext_detokenize(_read(path, where or f"--data={data_spec}"))]
    data_cfg = data_cfg.copy_and_resolve_references()
    data_cfg.source, data_cfg.max_docs = data_spec, max_docs or data_cfg.max_docs
    if "val_source" in data_cfg:
        data_cfg.val_source = ""  # the text named here is read, not the run's validation corpus
    if split == "train":
        data_cfg.val_fraction = 0.0  # every document
    try:
        return list(sources_lib.open_source(data_cfg).documents(split))
    except DataError as e:
        if where is None:
            raise
        raise DataError(f"{where}: {str(e).removeprefix('data.source=')}") from None


def encode_stream(tok, docs: list[str], what: str, *, where: str | None = None) -> Text:
    """Documents tokenized and joined by EOS into one stream; an empty text fails with `where`
    (default ``--data=<what>``)."""
    if not docs or not any(d.strip() for d in docs):
        raise DataError(f"{where or '--data=' + what}: no text to evaluate on")
    ids = tok.encode(docs)
    stream = np.concatenate([np.asarray(d + [tok.eos_id], np.int64) for d in ids])
    return Text(stream, sum(len(d.encode("utf-8")) for d in docs), len(docs))


# --- the jitted scoring functions ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Scorer:
    """The jitted scoring functions of one model structure, and how a host array reaches them."""
    nll: Callable  # (params, x int32 (B, T+1)) -> the NLL (B, T) of x[:, 1:]
    continuation: Callable  # (params, x int32 (T+1,), length, n_cont) -> (log-likelihood, all greedy)
    put: Callable = jnp.asarray


def _nll(graphdef, params, x):
    return model_lib.token_losses(graphdef, params, x[:, :-1], x[:, 1:])[0]


def _continuation(graphdef, params, x, length, n_cont):
    """(log-likelihood, all greedy) of the last `n_cont` of the first `length` tokens of `x` (padded)."""
    logp = jax.nn.log_softmax(model_lib.apply(graphdef, params, x[None, :-1])[0])  # logp[p] predicts x[p+1]
    target = x[1:]
    p = jnp.arange(target.shape[0])
    cont = (p >= length - 1 - n_cont) & (p < length - 1)
    ll = jnp.sum(jnp.where(cont, jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0], 0.0))
    return ll, jnp.all(jnp.where(cont, jnp.argmax(logp, axis=-1) == target, True))


@functools.cache  # one compiled pair per model structure: eval --all-steps reuses it
def unsharded_scorer(graphdef) -> Scorer:
    """Unsharded: parameters on one device (or wherever jit puts them)."""
    return Scorer(jax.jit(functools.partial(_nll, graphdef)), jax.jit(functools.partial(_continuation, graphdef)))


def sharded_scorer(graphdef, params_sharding, mesh) -> Scorer:
    """On parameters sharded as `params_sharding` over `mesh` (a run's, as it trains): inputs and
    results replicated, so it works on any mesh and process count."""
    repl = sharding.replicated(mesh)
    nll = jax.jit(functools.partial(_nll, graphdef), in_shardings=(params_sharding, repl), out_shardings=repl)
    cont = jax.jit(functools.partial(_continuation, graphdef), in_shardings=(params_sharding, repl, repl, repl),
                   out_shardings=repl)
    return Scorer(nll, cont, put=lambda a: jax.make_array_from_process_local_data(repl, np.asarray(a)))


# --- sliding-window perplexity -----------------------------------------------------------------

def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, first, end) per window: it reads tokens start .. end-1 (at most `context` of them) and
    scores targets first .. end (those no earlier window scored). Windows start every `stride`."""
    if stride <= 0 or stride > context:
        raise ConfigError(f"--stride must be in 1..context ({context}), got {stride}")
    out, scored, start = [], 0, 0
    while scored < n_tokens - 1:
        end = min(start + context, n_tokens - 1)
        out.append((start, scored + 1, end))
        scored, start = end, start + stride
    return out


def token_nll(graphdef, params, text: Text, context: int, stride: int, batch: int = 8,
              scorer: Scorer | None = None) -> np.ndarray:
    """The negative log-likelihood (nats) of every token of the stream after the first, in order."""
    n = len(text.tokens)
    context = min(context, n - 1)
    model_lib.check_token_ids(text.tokens, nnx.merge(graphdef, params).cfg.vocab_size)
    nll = np.full(n - 1, np.nan, np.float64)
    sc = scorer or unsharded_scorer(graphdef)
    wins = windows(n, context, stride)
    for i in range(0, len(wins), batch):
        chunk = wins[i:i + batch]
        x = np.zeros((batch, context + 1), np.int32)  # short windows and the last batch padded with id 0
        for row, (s, _, e) in enumerate(chunk):
            x[row, : e + 1 - s] = text.tokens[s:e + 1]
        out = np.asarray(sc.nll(params, sc.put(x)))
        for (s, first, e), row in zip(chunk, out):
            nll[first - 1: e] = row[first - 1 - s: e - s]  # row[j]: the NLL of token s+j+1
    assert not np.isnan(nll).any(), "a token was not scored"
    return nll


def evaluate(graphdef, params, text: Text, context: int, stride: int, scorer: Scorer | None = None) -> dict:
    nll = token_nll(graphdef, params, text, context, stride, scorer=scorer)
    loss = float(nll.mean())
    return {"loss": loss, "perplexity": telemetry.perplexity(loss),
            "bits_per_byte": float(nll.sum() / math.log(2) / text.n_bytes), "tokens": int(nll.size),
            "bytes": text.n_bytes}


# --- LAMBADA -----------------------------------------------------------------------------------

def lambada_examples(path: str, *, where: str | None = None) -> list[tuple[str, str]]:
    """(context, " " + last word) of each line of OpenAI's LAMBADA jsonl, split at the last space.
    Errors start with `where` (default ``--data=lambada:PATH``)."""
    where = where or f"--data=lambada:{path}"
    out = []
    for i, line in enumerate(_read(path, where).splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{where}:{i}: expected a JSON object with a \"text\" field") from None
        context, sep, word = text.rstrip().rpartition(" ")
        if not sep or not context:
            raise DataError(f"{where}:{i}: a passage needs a context and a last word")
        out.append((context, " " + word))
    if not out:
        raise DataError(f"{where}: no passages")
    return out


def lambada_tokens(tok, examples: list[tuple[str, str]], n_positions: int,
                   where: str = "lambada") -> list[tuple[np.ndarray, int]]:
    """(tokens, n_cont) per passage: tokenize(context + word), left-truncated to the model's positions,
    whose last n_cont tokens (those past tokenize(context)) are the continuation."""
    contexts = tok.encode([c for c, _ in examples])
    wholes = tok.encode([c + w for c, w in examples])
    out = []
    for i, (ctx, whole) in enumerate(zip(contexts, wholes), 1):
        n_cont = len(whole) - len(ctx)
        if n_cont <= 0:
            raise DataError(f"{where}: passage {i}: its last word adds no token to its context")
        out.append((np.asarray(whole[-(n_positions + 1):], np.int32), n_cont))
    return out


def score_lambada(graphdef, params, items: list[tuple[np.ndarray, int]], n_positions: int,
                  scorer: Scorer | None = None) -> dict:
    """``lambada`` on passages tokenized already (``lambada_tokens``)."""
    model_lib.check_token_ids(np.concatenate([t for t, _ in items]), nnx.merge(graphdef, params).cfg.vocab_size)
    sc = scorer or unsharded_scorer(graphdef)
    loglik, greedy = [], []
    for tokens, n_cont in items:
        # padded to a power of two (one compilation per length bucket, not per passage)
        x = np.zeros(min(1 << (len(tokens) - 1).bit_length(), n_positions + 1), np.int32)
        x[: len(tokens)] = tokens
        ll, hit = sc.continuation(params, sc.put(x), sc.put(np.int32(len(tokens))), sc.put(np.int32(n_cont)))
        loglik.append(float(ll))
        greedy.append(bool(hit))
    return {"accuracy": float(np.mean(greedy)), "perplexity": telemetry.perplexity(-float(np.mean(loglik))),
            "documents": len(items)}


def lambada(graphdef, params, tok, examples: list[tuple[str, str]], n_positions: int,
            scorer: Scorer | None = None) -> dict:
    """Last-word accuracy and final-word perplexity, as lm-evaluation-harness's ``lambada_openai``:
    the continuation's tokens are those of tokenize(context + word) past tokenize(context) (left-
    truncated to the model's positions); accuracy = the share of passages whose every continuation
    token is the model's greedy (argmax) choice; perplexity = exp(-mean over passages of the
    continuation's total log-likelihood), i.e. per word, not per token."""
    return score_lambada(graphdef, params, lambada_tokens(tok, examples, n_positions), n_positions, scorer)


# --- evaluators: a text prepared once, scored on any parameters ---------------------------------

# Said with every result: the training-time eval/loss is another estimate of the same quantity.
METHOD = ("every token of the text scored once, with at least context - stride tokens of context (context "
          "{context}, stride {stride}); the eval/loss logged during training is the mean over train.eval_batches "
          "batches (0: all of them) of non-overlapping seq_len windows, so the two differ slightly")


@dataclasses.dataclass
class Evaluator:
    """A text read and tokenized once: a LAMBADA set (`passages`) or a stream (`text`, windows)."""
    n_positions: int
    text: Text | None = None
    context: int = 0
    stride: int = 0
    passages: list[tuple[np.ndarray, int]] | None = None

    def __call__(self, graphdef, params, scorer: Scorer | None = None) -> dict:
        if self.passages is not None:
            return {"task": "lambada", **score_lambada(graphdef, params, self.passages, self.n_positions, scorer)}
        return {**evaluate(graphdef, params, self.text, self.context, self.stride, scorer),
                "method": METHOD.format(context=self.context, stride=self.stride)}

    def describe(self) -> str:
        if self.passages is not None:
            return f"{len(self.passages)} passages, {sum(len(t) for t, _ in self.passages):,} tokens"
        t = self.text
        return (f"{t.n_documents} document{'s' * (t.n_documents != 1)}, {len(t.tokens):,} tokens, {t.n_bytes:,} "
                f"bytes (context {self.context}, stride {self.stride})")


def evaluator(data_spec, data_cfg, tok, n_positions, context, stride, max_docs, default_context, log=None,
              where: str | None = None) -> Evaluator:
    """`data_spec` (None: the run's validation split) read and tokenized once. Context and stride: as
    given, else Mistral's for ``wikitext:`` (clipped to n_positions - 1), else `default_context` and half
    of it. `where` starts the errors about the text (default: the ``--data`` flag's wording)."""
    kind, _, path = (data_spec or "").partition(":")
    say = log or (lambda s: None)
    if kind == "lambada":
        examples = lambada_examples(path, where=where)
        say(f"LAMBADA: {len(examples)} passages (last-word accuracy and final-word perplexity)")
        return Evaluator(n_positions, passages=lambada_tokens(tok, examples, n_positions, where or "lambada"))
    if kind == "wikitext":
        default_context = min(MISTRAL_CONTEXT, n_positions - 1)
    context = context or default_context
    if context > n_positions:
        raise ConfigError(f"--context={context} exceeds the model's n_positions={n_positions}")
    stride = stride or (MISTRAL_STRIDE if kind == "wikitext" and context > MISTRAL_STRIDE else max(context // 2, 1))
    if data_spec:
        docs = documents(data_spec, data_cfg, "train", max_docs, where=where)
        text = encode_stream(tok, docs, data_spec, where=where)
    else:
        text = encode_stream(tok, documents(data_cfg.source, data_cfg, "validation", max_docs),
                             "the run's validation split")
    ev = Evaluator(n_positions, text=text, context=context, stride=stride)
    say(f"evaluating on {text.n_documents} documents, {len(text.tokens):,} tokens, {text.n_bytes:,} bytes "
        f"(context {context}, stride {stride})")
    say(f"method: {METHOD.format(context=context, stride=stride)}")
    return ev


# --- train.eval_sets: named sets evaluated during training ---------------------------------------

@dataclasses.dataclass(frozen=True)
class EvalSet:
    name: str  # its metrics are eval/NAME/<metric>
    spec: str  # wikitext:PATH, lambada:PATH or a data.source spec

    @property
    def kind(self) -> str:
        return self.spec.partition(":")[0]

    @property
    def where(self) -> str:
        """How errors name it: the config field and the entry as given."""
        return f"train.eval_sets: {self.name + '=' + self.spec!r}"


def parse_eval_sets(entries) -> list[EvalSet]:
    """train.eval_sets ('NAME=SPEC' strings) as EvalSets; a bad entry is one ConfigError naming it."""
    if isinstance(entries, str) or not isinstance(entries, (tuple, list)):
        raise ConfigError(f"train.eval_sets must be a tuple of 'NAME=SPEC' strings, got {entries!r}")
    out: dict[str, EvalSet] = {}
    for entry in entries:
        where = f"train.eval_sets: {entry!r}"
        if not isinstance(entry, str) or "=" not in entry:
            raise ConfigError(f"{where}: expected 'NAME=SPEC', e.g. 'wiki=wikitext:/data/wiki.valid.raw'")
        name, _, spec = entry.partition("=")
        kind, colon, rest = spec.partition(":")
        if not _NAME.fullmatch(name) or _RESERVED.fullmatch(name):
            raise ConfigError(f"{where}: the name {name!r} must be letters, digits, '_' or '-' (not mix<i>, a mixture "
                              "component's): it names the metrics eval/NAME/...")
        if name in out:
            raise ConfigError(f"{where}: the name {name!r} is used twice; give each set its own")
        if kind not in KINDS:
            raise ConfigError(f"{where}: unknown kind {kind!r}; SPEC is wikitext:PATH, lambada:PATH or a data.source "
                              "spec (stdlib, files:GLOB, jsonl:GLOB, tfds:NAME[:SPLIT], parquet:GLOB, hf:DIR)")
        if (bool(colon) if kind == "stdlib" else not rest):
            raise ConfigError(f"{where}: " + ("stdlib takes nothing after it" if kind == "stdlib" else
                                              f"{kind}: needs what it reads after the colon"))
        out[name] = EvalSet(name, spec)
    return list(out.values())


def check_files(sets: list[EvalSet], data_cfg) -> None:
    """Fails (one DataError naming train.eval_sets and the path) where a set's file or files are
    missing: cheap, so a run can check before it builds its cache."""
    for s in sets:
        path = s.spec.partition(":")[2]
        if s.kind in ("wikitext", "lambada"):
            if not Path(path).is_file():
                raise DataError(f"{s.where}: no such file {path}")
            continue
        cfg = data_cfg.copy_and_resolve_references()
        cfg.source = s.spec
        try:
            sources_lib.open_source(cfg)  # lists the files (or opens the dataset)
        except DataError as e:
            raise DataError(f"{s.where}: {str(e).removeprefix('data.source=')}") from None


def callbacks(sets: list[EvalSet], cfg, tokenizer: Callable[[], object], trainer, log=None) -> dict[str, Callable]:
    """{name: params -> {metric: value}} (``telemetry.EVAL_SET_METRICS``) of a run's train.eval_sets,
    each read and tokenized once, here, with the run's tokenizer (`tokenizer()`), and scored on the
    run's parameters as `trainer` shards them, in its precision (its graphdef). A wikitext set takes
    Mistral's windows (context 1023, stride 512, clipped to n_positions - 1), a lambada set its passages,
    any other its documents as one EOS-joined stream in non-overlapping train.seq_len windows. None
    when periodic evaluation (train.eval_every) is off."""
    say = log or (lambda s: None)
    if sets and not cfg.train.eval_every:
        say(f"warning: train.eval_sets ({', '.join(s.name for s in sets)}) are not evaluated: train.eval_every=0")
    if not sets or not cfg.train.eval_every:
        return {}
    tok, graphdef, seq_len = tokenizer(), trainer.graphdef, cfg.train.seq_len
    sc = sharded_scorer(graphdef, trainer.state_sharding.params, trainer.mesh)
    out = {}
    for s in sets:
        context = stride = 0 if s.kind in ("wikitext", "lambada") else seq_len
        ev = evaluator(s.spec, cfg.data, tok, trainer.model_cfg.n_positions, context, stride, 0, seq_len, where=s.where)
        say(f"eval set {s.name} ({s.kind}): {ev.describe()}; logged as {telemetry.EVAL_SET.format(s.name, '*')}")
        keys = telemetry.EVAL_SET_METRICS["lambada" if ev.passages is not None else "stream"]
        out[s.name] = lambda params, ev=ev, keys=keys: {k: v for k, v in ev(graphdef, params, sc).items() if k in keys}
    return out
