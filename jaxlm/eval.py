"""Perplexity and bits per byte of checkpoints on a text, with a sliding window: library and CLI.

    python -m jaxlm.eval --workdir=DIR [--step=N | --all-steps] [--data=SPEC] [--context=1024] [--stride=512]

The text: the run's own validation split (default), or every document of ``--data`` (a
``data.source`` spec such as ``files:GLOB``). Documents are tokenized with the run's tokenizer and
joined by EOS into one stream. Windows of ``context`` tokens advance by ``stride``; each token is
scored once, by the first window that predicts it after the window's overlap with the previous
one (Mistral used stride 512), so every token but the first gets at least ``context - stride``
tokens of context. Reported: mean loss (nats/token), perplexity = exp(mean loss), and bits per
byte = total nats / ln 2 / UTF-8 bytes of the documents' text -- comparable across tokenizers.
``--all-steps`` evaluates every saved checkpoint and writes ``eval.csv`` and ``eval.png`` (the
training-dynamics curve) into the run directory.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from jaxlm import checkpoint, cli, files, telemetry
from jaxlm import model as model_lib
from jaxlm import run as run_lib
from jaxlm.data import sources as sources_lib
from jaxlm.data import tokenizer as tok_lib
from jaxlm.errors import ConfigError, DataError


@dataclasses.dataclass
class Text:
    tokens: np.ndarray  # the token stream (documents joined by EOS)
    n_bytes: int  # UTF-8 bytes of the documents' text
    n_documents: int


def load_text(run_cfg, meta: dict, data_spec: str | None = None, max_docs: int = 0) -> Text:
    """The evaluation text as one token stream, with its byte count."""
    data_cfg = run_cfg.data.copy_and_resolve_references()
    split = "validation"
    if data_spec:
        data_cfg.source, data_cfg.val_fraction, split = data_spec, 0.0, "train"  # every document
    data_cfg.max_docs = max_docs or data_cfg.max_docs
    tok = tok_lib.load(meta["data"]["tokenizer"])
    docs = list(sources_lib.open_source(data_cfg).documents(split))
    if not docs:
        raise DataError(f"--data={data_spec or 'the run validation split'}: no documents to evaluate on")
    ids = tok.encode(docs)
    stream = np.concatenate([np.asarray(d + [tok.eos_id], np.int32) for d in ids])
    return Text(stream, sum(len(d.encode("utf-8")) for d in docs), len(docs))


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int]]:
    """(start, first_scored) per window: it predicts targets start+1 .. start+context and scores those
    from first_scored on (the ones no earlier window scored). Windows are always full length."""
    if stride <= 0 or stride > context:
        raise ConfigError(f"--stride must be in 1..context ({context}), got {stride}")
    last_target = n_tokens - 1
    out, scored, start = [], 0, 0
    while scored < last_target:
        start = min(start, last_target - context)
        out.append((start, scored + 1))
        scored = start + context
        start += stride
    return out


def token_nll(graphdef, params, text: Text, context: int, stride: int, batch: int = 8) -> np.ndarray:
    """The negative log-likelihood (nats) of every token of the stream after the first, in order."""
    n = len(text.tokens)
    context = min(context, n - 1)
    wins = windows(n, context, stride)
    nll = np.full(n - 1, np.nan, np.float64)
    fn = _nll_fn(graphdef)
    for i in range(0, len(wins), batch):
        chunk = wins[i:i + batch]
        x = np.stack([text.tokens[s:s + context + 1] for s, _ in chunk] +
                     [text.tokens[:context + 1]] * (batch - len(chunk)))  # pad the last batch
        out = np.asarray(fn(params, jnp.asarray(x)))
        for (s, first), row in zip(chunk, out):
            # row[j] is the NLL of token s+j+1; keep targets >= first
            lo = first - (s + 1)
            nll[first - 1: s + context] = row[lo:]
    assert not np.isnan(nll).any(), "a token was not scored"
    return nll


def _nll_fn(graphdef):
    @jax.jit
    def fn(params, x):
        logits = model_lib.apply(graphdef, params, x[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:])
    return fn


def evaluate(graphdef, params, text: Text, context: int, stride: int) -> dict[str, float]:
    nll = token_nll(graphdef, params, text, context, stride)
    loss = float(nll.mean())
    return {"loss": loss, "perplexity": telemetry.perplexity(loss),
            "bits_per_byte": float(nll.sum() / math.log(2) / text.n_bytes), "tokens": int(nll.size),
            "bytes": text.n_bytes}


# Said with every result: the training-time eval/loss is another estimate of the same quantity.
METHOD = ("every token of the text scored once, with at least context - stride tokens of context (context "
          "{context}, stride {stride}); the eval/loss logged during training is the mean over train.eval_batches "
          "batches of non-overlapping seq_len windows, so the two differ slightly")


def evaluate_run(workdir, *, step: int | None = None, all_steps: bool = False, data_spec: str | None = None,
                 context: int = 0, stride: int = 0, max_docs: int = 0, log=print) -> list[dict]:
    workdir = Path(workdir)
    cfg, trainer, state, meta, last = run_lib.load_run(workdir, step)
    context = context or cfg.train.seq_len
    if context > trainer.model_cfg.n_positions:
        raise DataError(f"--context={context} exceeds the model's n_positions={trainer.model_cfg.n_positions}")
    stride = stride or max(context // 2, 1)
    text = load_text(cfg, meta, data_spec, max_docs)
    log(f"evaluating on {text.n_documents} documents, {len(text.tokens):,} tokens, {text.n_bytes:,} bytes "
        f"(context {context}, stride {stride})")
    log(f"method: {METHOD.format(context=context, stride=stride)}")
    steps = checkpoint.saved_steps(workdir) if all_steps else [last]
    rows = []
    for s in steps:
        params = state.params if s == last else run_lib.load_run(workdir, s)[2].params
        r = {"step": s, **evaluate(trainer.graphdef, params, text, context, stride),
             "method": METHOD.format(context=context, stride=stride)}
        log(f"step {s:>8}: loss {r['loss']:.4f}  perplexity {r['perplexity']:.2f}  bits/byte {r['bits_per_byte']:.4f}")
        rows.append(r)
    if all_steps:
        write_curve(rows, workdir)
        log(f"wrote {workdir / 'eval.csv'} and {workdir / 'eval.png'}")
    return rows


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
    ax[0].plot(steps, [r["perplexity"] for r in rows], "o-")
    xlabel = "step (log scale; step 0 drawn at 1)" if rows[0]["step"] == 0 else "step (log scale)"
    ax[0].set(xscale="log", yscale="log", xlabel=xlabel, ylabel="perplexity", title="validation perplexity")
    ax[1].plot(steps, [r["bits_per_byte"] for r in rows], "o-", color="C1")
    ax[1].set(xscale="log", xlabel=xlabel, ylabel="bits per byte", title="bits per byte")
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "eval.png", dpi=110)
    plt.close(fig)


# --- CLI ----------------------------------------------------------------------------------------

def define_flags():
    flags.DEFINE_string("workdir", None, "The run directory.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_bool("all_steps", False, "Evaluate every saved checkpoint; write eval.csv and eval.png.")
    flags.DEFINE_alias("all-steps", "all_steps")
    flags.DEFINE_string("data", None, "A data.source spec (default: the run's validation split).")
    flags.DEFINE_integer("context", 0, "Window length in tokens (default: train.seq_len).")
    flags.DEFINE_integer("stride", 0, "Window stride (default: context/2; Mistral: 512).")
    flags.DEFINE_integer("max_docs", 0, "Evaluate on at most this many documents (0 = all).")


def main(argv):
    F = cli.FLAGS
    cli.require(workdir=F.workdir)
    rows = evaluate_run(F.workdir, step=F.step, all_steps=F.all_steps, data_spec=F.data, context=F.context,
                        stride=F.stride, max_docs=F.max_docs, log=lambda s: print(s, file=sys.stderr))
    print(json.dumps(rows if F.all_steps else rows[-1]))


if __name__ == "__main__":
    cli.run(main, define_flags)
