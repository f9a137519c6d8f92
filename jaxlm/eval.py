"""Evaluation of checkpoints and Hugging Face GPT-2s on texts and benchmarks: library and CLI.

    python -m jaxlm.eval --workdir=RUN [--step=N | --all-steps] [--data=SPEC] [--context=N] [--stride=N]
    python -m jaxlm.eval --hf=DIR --data=SPEC [--tokenizer=hf:DIR|PATH.model] [--regime=fp32]

What is evaluated (``--data``; a run's own validation split by default):

``files:GLOB``, ``jsonl:GLOB``, ``tfds:NAME[:SPLIT]``, ``stdlib``
    every document of a ``data.source`` spec, tokenized and joined by EOS into one stream.
``wikitext:PATH``
    a WikiText-103/WikiText-2 raw file (``wiki.test.raw``), detokenized (``wikitext_detokenize``:
    the Megatron/Mistral rules, listed there) and evaluated as one stream, as Mistral did.
``lambada:PATH``
    OpenAI's LAMBADA jsonl (``{"text": ...}`` per line): last-word accuracy and the perplexity of the
    final word, as lm-evaluation-harness's ``lambada_openai`` defines them (``lambada``).

Streams are scored with a sliding window. A window feeds ``context`` tokens to the model; windows
start every ``stride`` tokens (the last one may be shorter); each token after the first is scored
once, by the first window whose predictions reach it, so it sees at least ``context - stride``
tokens of context (all of them while the first window lasts). With ``stride < context`` this is
Hugging Face's perplexity recipe with ``max_length = context + 1``: Mistral's WikiText numbers
(max_length 1024, stride 512) are ``--context=1023 --stride=512``, the default for ``wikitext:``
and ``--hf``. Reported: mean loss (nats/token), perplexity = exp(mean loss), and bits per byte =
total nats / ln 2 / UTF-8 bytes of the text -- comparable across tokenizers. ``--all-steps``
evaluates every saved checkpoint and writes ``eval.csv`` and ``eval.png`` (the training-dynamics
curve) into the run directory.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import math
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from jaxlm import checkpoint, cli, files, hf, paths, telemetry
from jaxlm import config as config_lib
from jaxlm import model as model_lib
from jaxlm import run as run_lib
from jaxlm.data import sources as sources_lib
from jaxlm.data import tokenizer as tok_lib
from jaxlm.data import tokenizer_export
from jaxlm.errors import ConfigError, DataError

# Hugging Face's perplexity recipe at GPT-2's 1024 positions with Mistral's stride.
MISTRAL_CONTEXT, MISTRAL_STRIDE = 1023, 512


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


def _read(path: str, what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--data={what}:{path}: no such file")
    return p.read_bytes().decode("utf-8", errors="replace")


def documents(data_spec: str, data_cfg, split: str = "train", max_docs: int = 0) -> list[str]:
    """The documents of an evaluation text: a ``wikitext:`` file (one detokenized document) or every
    document of a ``data.source`` spec (`split` of it)."""
    kind, _, path = data_spec.partition(":")
    if kind == "wikitext":
        return [wikitext_detokenize(_read(path, kind))]
    data_cfg = data_cfg.copy_and_resolve_references()
    data_cfg.source, data_cfg.max_docs = data_spec, max_docs or data_cfg.max_docs
    if split == "train":
        data_cfg.val_fraction = 0.0  # every document
    return list(sources_lib.open_source(data_cfg).documents(split))


def encode_stream(tok, docs: list[str], what: str) -> Text:
    """Documents tokenized and joined by EOS into one stream."""
    if not docs or not any(d.strip() for d in docs):
        raise DataError(f"--data={what}: no text to evaluate on")
    ids = tok.encode(docs)
    stream = np.concatenate([np.asarray(d + [tok.eos_id], np.int64) for d in ids])
    return Text(stream, sum(len(d.encode("utf-8")) for d in docs), len(docs))


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


def token_nll(graphdef, params, text: Text, context: int, stride: int, batch: int = 8) -> np.ndarray:
    """The negative log-likelihood (nats) of every token of the stream after the first, in order."""
    n = len(text.tokens)
    context = min(context, n - 1)
    model_lib.check_token_ids(text.tokens, _vocab_size(graphdef, params))
    nll = np.full(n - 1, np.nan, np.float64)
    fn = _nll_fn(graphdef)
    wins = windows(n, context, stride)
    for i in range(0, len(wins), batch):
        chunk = wins[i:i + batch]
        x = np.zeros((batch, context + 1), np.int32)  # short windows and the last batch padded with id 0
        for row, (s, _, e) in enumerate(chunk):
            x[row, : e + 1 - s] = text.tokens[s:e + 1]
        out = np.asarray(fn(params, jnp.asarray(x)))
        for (s, first, e), row in zip(chunk, out):
            nll[first - 1: e] = row[first - 1 - s: e - s]  # row[j]: the NLL of token s+j+1
    assert not np.isnan(nll).any(), "a token was not scored"
    return nll


def _vocab_size(graphdef, params) -> int:
    return nnx.merge(graphdef, params).cfg.vocab_size


@functools.cache  # one compiled function per model structure: --all-steps reuses it
def _nll_fn(graphdef):
    @jax.jit
    def fn(params, x):
        return model_lib.token_losses(graphdef, params, x[:, :-1], x[:, 1:])[0]
    return fn


def evaluate(graphdef, params, text: Text, context: int, stride: int) -> dict[str, float]:
    nll = token_nll(graphdef, params, text, context, stride)
    loss = float(nll.mean())
    return {"loss": loss, "perplexity": telemetry.perplexity(loss),
            "bits_per_byte": float(nll.sum() / math.log(2) / text.n_bytes), "tokens": int(nll.size),
            "bytes": text.n_bytes}


# --- LAMBADA -----------------------------------------------------------------------------------

def lambada_examples(path: str) -> list[tuple[str, str]]:
    """(context, " " + last word) of each line of OpenAI's LAMBADA jsonl, split at the last space."""
    out = []
    for i, line in enumerate(_read(path, "lambada").splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"--data=lambada:{path}:{i}: expected a JSON object with a \"text\" field") from None
        context, sep, word = text.rstrip().rpartition(" ")
        if not sep or not context:
            raise DataError(f"--data=lambada:{path}:{i}: a passage needs a context and a last word")
        out.append((context, " " + word))
    if not out:
        raise DataError(f"--data=lambada:{path}: no passages")
    return out


def lambada(graphdef, params, tok, examples: list[tuple[str, str]], n_positions: int) -> dict:
    """Last-word accuracy and final-word perplexity, as lm-evaluation-harness's ``lambada_openai``:
    the continuation's tokens are those of tokenize(context + word) past tokenize(context) (left-
    truncated to the model's positions); accuracy = the share of passages whose every continuation
    token is the model's greedy (argmax) choice; perplexity = exp(-mean over passages of the
    continuation's total log-likelihood), i.e. per word, not per token."""
    contexts = tok.encode([c for c, _ in examples])
    wholes = tok.encode([c + w for c, w in examples])
    model_lib.check_token_ids(np.concatenate([np.asarray(w) for w in wholes]), _vocab_size(graphdef, params))
    fn = _continuation_fn(graphdef)
    loglik, greedy = [], []
    for ctx, whole in zip(contexts, wholes):
        n_cont = len(whole) - len(ctx)
        if n_cont <= 0:
            raise DataError("lambada: a passage's last word adds no token to its context")
        tokens = whole[-(n_positions + 1):]
        # padded to a power of two (one compilation per length bucket, not per passage)
        x = np.zeros(min(1 << (len(tokens) - 1).bit_length(), n_positions + 1), np.int32)
        x[: len(tokens)] = tokens
        ll, hit = fn(params, jnp.asarray(x), len(tokens), n_cont)
        loglik.append(float(ll))
        greedy.append(bool(hit))
    return {"accuracy": float(np.mean(greedy)), "perplexity": telemetry.perplexity(-float(np.mean(loglik))),
            "documents": len(examples)}


@functools.cache
def _continuation_fn(graphdef):
    """(log-likelihood, all greedy) of the last `n_cont` of the first `length` tokens of `x` (padded)."""
    @jax.jit
    def fn(params, x, length, n_cont):
        logp = jax.nn.log_softmax(model_lib.apply(graphdef, params, x[None, :-1])[0])  # logp[p] predicts x[p+1]
        target = x[1:]
        p = jnp.arange(target.shape[0])
        cont = (p >= length - 1 - n_cont) & (p < length - 1)
        ll = jnp.sum(jnp.where(cont, jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0], 0.0))
        return ll, jnp.all(jnp.where(cont, jnp.argmax(logp, axis=-1) == target, True))
    return fn


# --- runs and Hugging Face models ----------------------------------------------------------------

# Said with every result: the training-time eval/loss is another estimate of the same quantity.
METHOD = ("every token of the text scored once, with at least context - stride tokens of context (context "
          "{context}, stride {stride}); the eval/loss logged during training is the mean over train.eval_batches "
          "batches of non-overlapping seq_len windows, so the two differ slightly")


def _evaluator(data_spec, data_cfg, tok, n_positions, context, stride, max_docs, default_context, log):
    """A function (graphdef, params) -> result dict for `data_spec`, with its text prepared once."""
    kind = (data_spec or "").partition(":")[0]
    if kind == "lambada":
        examples = lambada_examples(data_spec.partition(":")[2])
        log(f"LAMBADA: {len(examples)} passages (last-word accuracy and final-word perplexity)")
        return lambda graphdef, params: {"task": "lambada", **lambada(graphdef, params, tok, examples, n_positions)}
    if kind == "wikitext":
        default_context = min(MISTRAL_CONTEXT, n_positions - 1)
    context = context or default_context
    if context > n_positions:
        raise ConfigError(f"--context={context} exceeds the model's n_positions={n_positions}")
    stride = stride or (MISTRAL_STRIDE if kind == "wikitext" and context > MISTRAL_STRIDE else max(context // 2, 1))
    if data_spec:
        text = encode_stream(tok, documents(data_spec, data_cfg, "train", max_docs), data_spec)
    else:
        text = encode_stream(tok, documents(data_cfg.source, data_cfg, "validation", max_docs),
                             "the run's validation split")
    method = METHOD.format(context=context, stride=stride)
    log(f"evaluating on {text.n_documents} documents, {len(text.tokens):,} tokens, {text.n_bytes:,} bytes "
        f"(context {context}, stride {stride})")
    log(f"method: {method}")
    return lambda graphdef, params: {**evaluate(graphdef, params, text, context, stride), "method": method}


def _say(r: dict) -> str:
    if r.get("task") == "lambada":
        return f"accuracy {r['accuracy']:.4f}  final-word perplexity {r['perplexity']:.2f}"
    return f"loss {r['loss']:.4f}  perplexity {r['perplexity']:.2f}  bits/byte {r['bits_per_byte']:.4f}"


def evaluate_run(workdir, *, step: int | None = None, all_steps: bool = False, data_spec: str | None = None,
                 context: int = 0, stride: int = 0, max_docs: int = 0, log=print) -> list[dict]:
    """Evaluates checkpoint `step` (the newest by default) or every checkpoint of a run."""
    workdir = paths.path(workdir)
    cfg, trainer, state, meta, last = run_lib.load_run(workdir, step, params_only=True)
    tok = tok_lib.load(run_lib.tokenizer_spec(meta))
    ev = _evaluator(data_spec, cfg.data, tok, trainer.model_cfg.n_positions, context, stride, max_docs,
                    min(cfg.train.seq_len, trainer.model_cfg.n_positions), log)
    steps = checkpoint.saved_steps(workdir) if all_steps else [last]
    rows = []
    for s in steps:
        params = state.params if s == last else run_lib.load_params(workdir, s, trainer)
        r = {"step": s, **ev(trainer.graphdef, params)}
        log(f"step {s:>8}: {_say(r)}")
        rows.append(r)
    if all_steps:
        write_curve(rows, workdir)
        log(f"wrote {workdir / 'eval.csv'} and {workdir / 'eval.png'}")
    return rows


def load_hf(directory, *, tokenizer: str | None = None, regime: str = "fp32"):
    """(GPT2Config, graphdef, params, tokenizer) of a Hugging Face GPT-2 directory; the tokenizer is
    `tokenizer` (a spec) or the directory's own, whatever its kind (``tokenizer_export.for_model_dir``)."""
    model_cfg, _, graphdef, params = hf.load_pretrained(directory, regime=regime)
    tok = tok_lib.load(tokenizer or tokenizer_export.for_model_dir(directory))
    if tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens, the model {model_cfg.vocab_size}: not the "
                          "model's tokenizer (see --tokenizer)")
    return model_cfg, graphdef, params, tok


def evaluate_hf(directory, data_spec: str, *, regime: str = "fp32", context: int = 0, stride: int = 0,
                max_docs: int = 0, tokenizer: str | None = None, log=print) -> dict:
    """Evaluates a Hugging Face GPT-2 directory (weights and tokenizer) on `data_spec`."""
    if not data_spec:
        raise ConfigError("--hf needs --data (a Hugging Face model has no validation split of its own)")
    model_cfg, graphdef, params, tok = load_hf(directory, tokenizer=tokenizer, regime=regime)
    ev = _evaluator(data_spec, config_lib.schema().data, tok, model_cfg.n_positions, context, stride, max_docs,
                    model_cfg.n_positions - 1, log)
    r = {"model": str(directory), **ev(graphdef, params)}
    log(f"{directory}: {_say(r)}")
    return r


def write_curve(rows: list[dict], out_dir: Path) -> None:
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=[k for k in rows[0] if k != "method"], lineterminator="\n",
                       extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    files.atomic_write(out_dir / "eval.csv", text.getvalue())
    import matplotlib  # heavy, and only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg backend

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [max(r["step"], 1) for r in rows]
    xlabel = "step (log scale; step 0 drawn at 1)" if rows[0]["step"] == 0 else "step (log scale)"
    lambada = rows[0].get("task") == "lambada"
    ax[0].plot(steps, [r["perplexity"] for r in rows], "o-")
    ax[0].set(xscale="log", yscale="log", xlabel=xlabel, ylabel="perplexity",
              title="LAMBADA final-word perplexity" if lambada else "perplexity")
    second = "accuracy" if lambada else "bits_per_byte"
    ax[1].plot(steps, [r[second] for r in rows], "o-", color="C1")
    ax[1].set(xscale="log", xlabel=xlabel, ylabel=second.replace("_", " "),
              title="LAMBADA last-word accuracy" if lambada else "bits per byte")
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()  # written through files: a local path or an object-store URL
    fig.savefig(png, format="png", dpi=110)
    files.atomic_write(out_dir / "eval.png", png.getvalue())
    plt.close(fig)


# --- CLI ----------------------------------------------------------------------------------------

def define_flags():
    flags.DEFINE_string("workdir", None, "The run directory.")
    flags.DEFINE_string("hf", None, "A Hugging Face GPT-2 directory (weights and tokenizer) instead of a run.")
    flags.DEFINE_string("regime", "fp32", "--hf: the precision regime to evaluate in.")
    flags.DEFINE_string("tokenizer", None, "--hf: the model's tokenizer, hf:DIR or PATH.model (default: its own).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_bool("all_steps", False, "Evaluate every saved checkpoint; write eval.csv and eval.png.")
    flags.DEFINE_alias("all-steps", "all_steps")
    flags.DEFINE_string("data", None, "files:GLOB, jsonl:GLOB, tfds:NAME[:SPLIT], wikitext:PATH or lambada:PATH "
                        "(default: the run's validation split).")
    flags.DEFINE_integer("context", 0, "Window length in tokens (default: train.seq_len).")
    flags.DEFINE_integer("stride", 0, "Window stride (default: context/2; Mistral: 512).")
    flags.DEFINE_integer("max_docs", 0, "Evaluate on at most this many documents (0 = all).")


def main(argv):
    F = cli.FLAGS
    log = lambda s: print(s, file=sys.stderr)
    if F.hf:
        if F.workdir or F.all_steps or F.step is not None:
            raise ConfigError("--hf evaluates one model: it takes no --workdir, --step or --all-steps")
        print(json.dumps(evaluate_hf(F.hf, F.data, regime=F.regime, context=F.context, stride=F.stride,
                                     max_docs=F.max_docs, tokenizer=F.tokenizer, log=log)))
        return
    if F.tokenizer:
        raise ConfigError("--tokenizer goes with --hf; a run evaluates with its own tokenizer")
    cli.require(workdir=F.workdir)
    rows = evaluate_run(F.workdir, step=F.step, all_steps=F.all_steps, data_spec=F.data, context=F.context,
                        stride=F.stride, max_docs=F.max_docs, log=log)
    print(json.dumps(rows if F.all_steps else rows[-1]))


if __name__ == "__main__":
    cli.run(main, define_flags)
