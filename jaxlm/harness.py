"""jaxlm as an lm-evaluation-harness model (``jaxlm``), and the command that runs harness tasks on a run.

    python -m jaxlm.harness --workdir=RUN [--step=N] --tasks=lambada_openai,hellaswag
        [--include_path=DIR] [--limit=N] [--num_fewshot=K] [--batch_size=16] [--output=results.json]
    python -m jaxlm.harness --hf=DIR --tasks=...

From Python, importing this module registers the model with the harness:

    import jaxlm.harness, lm_eval
    lm_eval.simple_evaluate(model="jaxlm", model_args="workdir=runs/tiny,step=300", tasks=["wikitext"])

``model_args``: ``workdir=RUN[,step=N]`` (a checkpoint, through ``jaxlm.saved_run.load_run``, with the run's
own tokenizer) or ``hf=DIR`` (a Hugging Face GPT-2 directory, what ``jaxlm.eval --hf`` loads);
``batch_size`` (default 16), ``max_gen_toks`` (256), ``regime`` (``hf=`` only; fp32).

How requests are run, and how that matches the harness's ``hf`` model:

* The context/continuation split is the harness's own (``TemplateLM._encode_pair``: trailing spaces
  move to the continuation; the continuation's tokens are those of tokenize(context + continuation)
  past tokenize(context)); an empty context is the EOS token (``prefix_token_id``). Sequences longer
  than the model's ``n_positions`` + 1 lose tokens on the left, as ``hf`` does.
* loglikelihood requests are sorted by length (longest first), cut into batches of ``batch_size``
  rows (rounded up to a multiple of the local devices; the batch axis is split over them, parameters
  replicated) and padded on the right to a length bucket: 16, 32, 64, ... up to ``n_positions``, so
  a model compiles at most ``len(length_buckets(n_positions))`` scoring programs (7 for GPT-2's 1024
  positions) whatever the tasks. A request's log-likelihood is the float32 log-softmax of its
  continuation's tokens, summed; ``is_greedy`` says every one of them is the argmax.
* loglikelihood_rolling: the harness's disjoint windows (``get_rolling_token_windows`` with
  context_len 1 at ``n_positions``), all windows of all documents batched together, summed per document.
* generate_until: greedy only, with the model's KV cache; the prompt (left-truncated to
  ``n_positions - max_gen_toks`` as ``hf`` does) is prefilled padded to its length bucket, then one
  compiled decode step per token until a stop sequence appears in the text, EOS, or max_gen_toks; the
  text is cut before the first stop sequence. One request at a time: the cache keeps one fill index
  for its whole batch, so rows of different prompt lengths cannot share it.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import sys

import datasets
import jax
import jax.numpy as jnp
import lm_eval
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager
from tqdm import tqdm

from jaxlm import cli, files, paths, precision, saved_run
from jaxlm import hf as hf_lib
from jaxlm import model as model_lib
from jaxlm.data import tokenizer as tok_lib
from jaxlm.errors import ConfigError, DataError

MIN_BUCKET = 16


def length_buckets(n_positions: int) -> list[int]:
    """The padded lengths of scoring batches: powers of two from MIN_BUCKET, and n_positions itself."""
    out, b = [], MIN_BUCKET
    while b < n_positions:
        out.append(b)
        b *= 2
    return out + [n_positions]


def bucket(n: int, n_positions: int) -> int:
    return next(b for b in length_buckets(n_positions) if b >= n)


def load_model(workdir=None, step=None, hf=None, regime: str = "fp32"):
    """(GPT2Config, policy, graphdef, params, tokenizer, description) of a run's checkpoint or an HF directory."""
    if (workdir is None) == (hf is None):
        raise ConfigError("the jaxlm harness model takes workdir=RUN[,step=N] or hf=DIR (one of them)")
    if hf is not None:
        cfg, policy, graphdef, params = hf_lib.load_pretrained(hf, regime=regime)
        return cfg, policy, graphdef, params, _hf_dir_tokenizer(hf), f"hf:{hf}"
    _, trainer, state, meta, step = saved_run.load_run(workdir, None if step is None else int(step))
    spec = saved_run.tokenizer_spec(meta, workdir)
    if not tok_lib.spec_path(spec).exists():
        raise DataError(f"{workdir}: the run's tokenizer {spec!r} is gone (its token cache was deleted); the "
                        "harness needs the run's own tokenizer: rebuild the cache (python -m jaxlm.data with the "
                        "run's config) or evaluate an export that carries one (--hf=DIR)")
    return (trainer.model_cfg, trainer.policy, trainer.graphdef, state.params, tok_lib.load(spec),
            f"{workdir}@{step}")


def _hf_dir_tokenizer(directory):
    """An HF directory's tokenizer: its Hugging Face files (as jaxlm.eval --hf reads them), or the
    SentencePiece tokenizer.model that jaxlm.export writes beside a SentencePiece run's weights."""
    d = paths.path(directory)
    if not (d / "tokenizer.json").exists() and not (d / "vocab.json").exists() and (d / "tokenizer.model").exists():
        return tok_lib.load(str(d / "tokenizer.model"))
    if not (d / "tokenizer.json").exists() and not (d / "vocab.json").exists():
        raise DataError(f"{directory}: no tokenizer (tokenizer.json, vocab.json + merges.txt or tokenizer.model); "
                        "the harness needs the model's own tokenizer: export with python -m jaxlm.export, which "
                        "writes it")
    return tok_lib.load(f"hf:{directory}")


@functools.cache
def _score_fn(graphdef):
    """(log-probability of each target, target is the argmax) per position, float32 / bool (B, T)."""
    @jax.jit
    def fn(params, x_BT, y_BT):
        logp = jax.nn.log_softmax(model_lib.apply(graphdef, params, x_BT).astype(precision.FP32), axis=-1)
        ll = jnp.take_along_axis(logp, y_BT[..., None], axis=-1)[..., 0]
        return ll, jnp.argmax(logp, axis=-1) == y_BT
    return fn


@functools.cache
def _decode_fns(graphdef):
    """(prefill, step): greedy next token after a right-padded prompt of `n` real tokens (the cache
    then holds n positions), and after one more token."""
    @jax.jit
    def prefill(params, x_1L, n, cache):
        logits, cache = model_lib.apply(graphdef, params, x_1L, cache=cache)
        cache = tuple(type(c)(c.k_BSHK, c.v_BSHK, n.astype(c.index.dtype)) for c in cache)  # the padding is unread
        return jnp.argmax(logits[0, n - 1]), cache

    @jax.jit
    def step(params, token, cache):
        logits, cache = model_lib.apply(graphdef, params, token.reshape(1, 1), cache=cache)
        return jnp.argmax(logits[0, -1]), cache

    return prefill, step


def _register(cls):
    """Registered as ``jaxlm`` when imported; not when run as ``python -m jaxlm.harness``, whose main
    imports the module (which registers it) -- the harness refuses a second class under one name."""
    return register_model("jaxlm")(cls) if __name__ != "__main__" else cls


@_register
class JaxlmLM(TemplateLM):
    """A jaxlm checkpoint or Hugging Face GPT-2 as an lm-evaluation-harness model (see the module docstring)."""

    def __init__(self, workdir=None, step=None, hf=None, batch_size=16, max_gen_toks: int = 256,
                 regime: str = "fp32", max_batch_size=None, device=None, **unused):
        super().__init__()
        if unused:
            raise ConfigError(f"jaxlm harness model: unknown model_args {sorted(unused)}; it takes workdir, step, "
                              "hf, batch_size, max_gen_toks, regime")
        self.cfg, self.policy, self.graphdef, params, self.tok, self.name = load_model(workdir, step, hf, regime)
        devices = jax.local_devices()
        self.mesh = Mesh(np.asarray(devices), ("data",))
        self._rows = NamedSharding(self.mesh, PartitionSpec("data"))
        self.params = jax.device_put(params, NamedSharding(self.mesh, PartitionSpec()))
        bs = 16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.batch_size = -(-bs // len(devices)) * len(devices)
        self.max_gen_toks = int(max_gen_toks)

    # --- the harness's tokenizer interface ---------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return int(self.tok.eos_id)

    @property
    def max_length(self) -> int:
        return int(self.cfg.n_positions)

    @property
    def tokenizer_name(self) -> str:
        return f"jaxlm-{self.tok.kind}-{self.tok.sha256[:12]}"

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return list(self.tok.encode([string], num_threads=1)[0])

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(int(t) for t in tokens if int(t) != self.eot_token_id)

    # --- scoring ------------------------------------------------------------------------------------

    def _score(self, rows: list[tuple[list[int], list[int]]]):
        """(per-position log-probabilities, greedy matches) of right-padded (inputs, targets) rows."""
        width = bucket(max(len(x) for x, _ in rows), self.max_length)
        x = np.zeros((self.batch_size, width), np.int32)
        y = np.zeros((self.batch_size, width), np.int32)
        for i, (inp, tgt) in enumerate(rows):
            x[i, :len(inp)], y[i, :len(tgt)] = inp, tgt
        ll, greedy = _score_fn(self.graphdef)(self.params, jax.device_put(x, self._rows), jax.device_put(y, self._rows))
        return np.asarray(ll), np.asarray(greedy)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of each (key, context tokens, continuation tokens)."""
        model_lib.check_token_ids(np.concatenate([np.asarray(c + k, np.int64) for _, c, k in requests]),
                                  self.cfg.vocab_size)
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        out = []
        bar = tqdm(total=len(requests), disable=disable_tqdm or None, desc=f"loglikelihood ({self.name})")
        for chunk in order.get_batched(n=self.batch_size):
            rows, n_cont = [], []
            for _, ctx, cont in chunk:
                whole = (ctx + cont)[-(self.max_length + 1):]
                rows.append((whole[:-1], whole[1:]))
                n_cont.append(len(cont))
            ll, greedy = self._score(rows)
            for i, ((inp, _), n) in enumerate(zip(rows, n_cont)):
                span = slice(len(inp) - n, len(inp))
                out.append((float(ll[i, span].astype(np.float64).sum()), bool(greedy[i, span].all())))
            bar.update(len(chunk))
        bar.close()
        return order.get_original(out)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = np.zeros(len(requests), np.float64)
        if windows:
            for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
                totals[i] += ll
        return [float(t) for t in totals]

    # --- generation ---------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prefill, step = _decode_fns(self.graphdef)
        eos_text = self.tok.decode([self.eot_token_id])
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm or None,
                                        desc=f"generate_until ({self.name})"):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise ConfigError(f"generate_until: the jaxlm harness model decodes greedily only; the task asks "
                                  f"for sampling ({gen_kwargs}); set do_sample: false in its generation_kwargs")
            until = handle_stop_sequences(kwargs.get("until"), eos=eos_text)
            max_new = int(kwargs["max_gen_toks"])
            if max_new >= self.max_length:
                raise ConfigError(f"generate_until: max_gen_toks={max_new} leaves no room for a prompt in the "
                                  f"model's {self.max_length} positions")
            prompt = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
            x = np.zeros((1, bucket(len(prompt), self.max_length)), np.int32)
            x[0, :len(prompt)] = prompt
            cache = model_lib.empty_cache(self.cfg, 1, self.policy.compute_dtype)
            token, cache = prefill(self.params, jnp.asarray(x), jnp.int32(len(prompt)), cache)
            new: list[int] = []
            for i in range(max_new):
                t = int(token)
                if t == self.eot_token_id:
                    break
                new.append(t)
                if any(s in self.tok_decode(new) for s in until) or i == max_new - 1:
                    break
                token, cache = step(self.params, jnp.int32(t), cache)
            out.append(postprocess_generated_text(self.tok_decode(new), until, None))
        return out


# --- the command --------------------------------------------------------------------------------

def define_flags():
    flags.DEFINE_string("workdir", None, "The run directory (or --hf).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_string("hf", None, "A Hugging Face GPT-2 directory (weights and tokenizer) instead of a run.")
    flags.DEFINE_string("regime", "fp32", "--hf: the precision regime to evaluate in.")
    flags.DEFINE_list("tasks", None, "Harness task or group names, comma-separated (lm_eval ls tasks lists them).")
    flags.DEFINE_string("include_path", None, "A directory of task YAML files to add to the harness's own.")
    flags.DEFINE_float("limit", None, "At most this many documents per task (a number < 1: that fraction).")
    flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per prompt (default: the task's).")
    flags.DEFINE_integer("batch_size", 16, "Rows per scoring batch.")
    flags.DEFINE_integer("max_gen_toks", 256, "generate_until: tokens at most (unless the task says).")
    flags.DEFINE_string("output", None, "Write the harness's results JSON here (and the table to FILE.md).")
    flags.DEFINE_bool("log_samples", False, "Also write every request and response to FILE.samples.jsonl.")


def task_manager(tasks: list[str], include_path=None) -> TaskManager:
    """The harness's tasks (and those of `include_path`); an unknown name in `tasks` is a ConfigError."""
    if include_path is not None and not os.path.isdir(include_path):
        raise ConfigError(f"--include_path={include_path}: no such directory")
    manager = TaskManager(include_path=include_path)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not os.path.isfile(t)]
    if unknown:
        near = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
        raise ConfigError("--tasks: unknown task(s) " + "; ".join(
            f"{t!r}" + (f" (did you mean {', '.join(near[t])}?)" if near[t] else "") for t in unknown)
            + "; python -m lm_eval ls tasks lists the harness's tasks, --include_path=DIR adds YAML files")
    return manager


def evaluate(lm, tasks: list[str], *, include_path=None, manager=None, limit=None, num_fewshot=None,
             log_samples=False) -> dict:
    """simple_evaluate over `lm` with the named tasks; an unknown task or a dataset that cannot be loaded
    is a ConfigError / DataError naming it."""
    manager = manager or task_manager(tasks, include_path)
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                       num_fewshot=num_fewshot, log_samples=log_samples)
    except (datasets.exceptions.DatasetsError, FileNotFoundError, ConnectionError) as e:
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        raise DataError(f"--tasks={','.join(tasks)}: a task's dataset cannot be loaded ({_one_line(e)}); "
                        + ("offline, a hub task needs its dataset in the Hugging Face cache (run it once online) "
                           if offline else "a hub task needs the network or its dataset in the Hugging Face cache ")
                        + "and a local task's data_files must exist") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def main(argv):
    F = cli.FLAGS
    if not F.tasks:
        raise ConfigError("--tasks is required (see --help)")
    if F.hf and (F.workdir or F.step is not None):
        raise ConfigError("--hf evaluates one model: it takes no --workdir or --step")
    if not F.hf:
        cli.require(workdir=F.workdir)
    manager = task_manager(F.tasks, F.include_path)  # (before the model loads: a typo fails at once)
    lm = JaxlmLM(workdir=F.workdir, step=F.step, hf=F.hf, regime=F.regime, batch_size=F.batch_size,
                 max_gen_toks=F.max_gen_toks)
    limit = None if F.limit is None else (int(F.limit) if F.limit >= 1 else F.limit)
    results = evaluate(lm, F.tasks, manager=manager, limit=limit, num_fewshot=F.num_fewshot,
                       log_samples=F.log_samples)
    samples = results.pop("samples", None)
    table = lm_utils.make_table(results) + (lm_utils.make_table(results, "groups") if results.get("groups") else "")
    print(f"jaxlm ({lm.name})\n{table}")
    if F.output:
        files.atomic_write(F.output, json.dumps(results, indent=2, default=lm_utils.handle_non_serializable) + "\n")
        files.atomic_write(F.output + ".md", table)
        if samples is not None:
            files.atomic_write(F.output + ".samples.jsonl", "".join(
                json.dumps(s, default=lm_utils.handle_non_serializable) + "\n" for task in samples.values()
                for s in task))
        print(f"wrote {F.output}", file=sys.stderr)


if __name__ == "__main__":
    from jaxlm import harness  # the registered module (this __main__ copy of it is not registered twice)

    cli.run(harness.main, define_flags)  # (flags defined here, by __main__, so that --help lists them)
