"""Evaluation of checkpoints and Hugging Face GPT-2s on texts and benchmarks: library and CLI.

    python -m jaxlm.eval --workdir=RUN [--step=N | --all-steps] [--data=SPEC] [--context=N] [--stride=N]
    python -m jaxlm.eval --hf=DIR --data=SPEC [--tokenizer=hf:DIR|PATH.model] [--regime=fp32]

What is evaluated (``--data``; a run's own validation split by default):

a ``data.source`` spec (every kind: ``jaxlm.data.sources.KINDS``, ``tokens:`` included)
    every document of it, tokenized and joined by EOS into one stream.
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
import io
import json
import sys
from pathlib import Path

from absl import flags

from jaxlm import checkpoint, cli, evalsets, files, hf, paths, saved_run
from jaxlm import config as config_lib
from jaxlm.data import sources as sources_lib
from jaxlm.data import tokenizer as tok_lib
from jaxlm.data import tokenizer_export
from jaxlm.errors import ConfigError

# The texts and scorers live in jaxlm.evalsets (a run evaluates its train.eval_sets with them); their
# names stay reachable here, as the CLI's library.
from jaxlm.evalsets import (  # noqa: F401
    METHOD,
    MISTRAL_CONTEXT,
    MISTRAL_STRIDE,
    WIKITEXT_RULES,
    Text,
    documents,
    encode_stream,
    evaluate,
    lambada,
    lambada_examples,
    token_nll,
    wikitext_detokenize,
    windows,
)


def _say(r: dict) -> str:
    if r.get("task") == "lambada":
        return f"accuracy {r['accuracy']:.4f}  final-word perplexity {r['perplexity']:.2f}"
    return f"loss {r['loss']:.4f}  perplexity {r['perplexity']:.2f}  bits/byte {r['bits_per_byte']:.4f}"


def evaluate_run(workdir, *, step: int | None = None, all_steps: bool = False, data_spec: str | None = None,
                 context: int = 0, stride: int = 0, max_docs: int = 0, log=print) -> list[dict]:
    """Evaluates checkpoint `step` (the newest by default) or every checkpoint of a run."""
    workdir = paths.path(workdir)
    cfg, trainer, state, meta, last = saved_run.load_run(workdir, step, params_only=True)
    tok = tok_lib.load(saved_run.tokenizer_spec(meta, workdir))
    ev = evalsets.evaluator(data_spec, cfg.data, tok, trainer.model_cfg.n_positions, context, stride, max_docs,
                    min(cfg.train.seq_len, trainer.model_cfg.n_positions), log)
    steps = checkpoint.saved_steps(workdir) if all_steps else [last]
    rows = []
    for s in steps:
        params = state.params if s == last else saved_run.load_params(workdir, s, trainer)
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
    ev = evalsets.evaluator(data_spec, config_lib.schema().data, tok, model_cfg.n_positions, context, stride, max_docs,
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
    is_lambada = rows[0].get("task") == "lambada"
    ax[0].plot(steps, [r["perplexity"] for r in rows], "o-")
    ax[0].set(xscale="log", yscale="log", xlabel=xlabel, ylabel="perplexity",
              title="LAMBADA final-word perplexity" if is_lambada else "perplexity")
    second = "accuracy" if is_lambada else "bits_per_byte"
    ax[1].plot(steps, [r[second] for r in rows], "o-", color="C1")
    ax[1].set(xscale="log", xlabel=xlabel, ylabel=second.replace("_", " "),
              title="LAMBADA last-word accuracy" if is_lambada else "bits per byte")
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
    flags.DEFINE_string("tokenizer", None, "--hf: the model's tokenizer, hf:DIR, PATH.model or char:PATH (default: its own).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_bool("all_steps", False, "Evaluate every saved checkpoint; write eval.csv and eval.png.")
    flags.DEFINE_alias("all-steps", "all_steps")
    flags.DEFINE_string("data", None, f"What to evaluate on: every document of a source ({sources_lib.KINDS}), "
                        "wikitext:PATH or lambada:PATH (default: the run's validation split).")
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
