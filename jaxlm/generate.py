"""Sampling from a checkpoint with a KV cache: temperature, top-k, top-p; deterministic with a seed.

    python -m jaxlm.generate --workdir=DIR --prompt="def main(" [--max_new_tokens=64] \
        [--temperature=0.8] [--top_k=40] [--top_p=0.95] [--seed=0] [--step=N]

The prompt is run once (prefill) into a cache of keys and values (``model.empty_cache``: per
layer batch × n_positions × heads × head size), which the model takes and returns; each new token
then attends to the cache (one jitted decode step per token). ``temperature=0`` is greedy. Prompt
plus new tokens must fit in ``n_positions``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from jaxlm import cli, saved_run
from jaxlm import model as model_lib
from jaxlm.data import tokenizer as tok_lib
from jaxlm.errors import ConfigError


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Fails naming the sampling flag whose value has no meaning."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"--temperature={temperature}: must be >= 0 (0 = greedy; 1 = the model's distribution)")
    if top_k < 0:
        raise ConfigError(f"--top_k={top_k}: must be >= 0 (0 = all tokens)")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top_p={top_p}: must be in (0, 1] (1 = all tokens; 0.95 keeps the most likely up to 95% "
                          "of the probability)")


def sample(logits_V, key, temperature: float, top_k: int, top_p: float):
    """One token id from float32 logits; greedy when temperature is 0."""
    if temperature <= 0:
        return jnp.argmax(logits_V, axis=-1)
    logits = logits_V / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if 0 < top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        sorted_logits = jnp.where(before >= top_p, -jnp.inf, sorted_logits)  # the top token always stays
        logits = jnp.take_along_axis(sorted_logits, jnp.argsort(order, axis=-1), axis=-1)  # unsort
    return jax.random.categorical(key, logits, axis=-1)


@functools.partial(jax.jit, static_argnums=(0,))
def _forward_cached(graphdef, params, tokens_BT, cache):
    """The next-token logits after `tokens_BT`, which follow the cache's positions, and the cache with them."""
    logits, cache = model_lib.apply(graphdef, params, tokens_BT, cache=cache)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _pick(logits, key, step, temperature, top_k, top_p):
    return sample(logits, jax.random.fold_in(key, step), temperature, top_k, top_p)


def generate(graphdef, params, cfg: model_lib.GPT2Config, policy, prompt_ids, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None, use_cache: bool = True) -> list[int]:
    """New token ids after `prompt_ids` (stops early at `eos_id`). `use_cache=False` recomputes the
    whole sequence each step (the reference the cache must agree with)."""
    check_sampling(temperature, top_k, top_p)
    prompt = list(int(t) for t in prompt_ids)
    model_lib.check_token_ids(prompt, cfg.vocab_size)
    if not prompt:
        raise ConfigError("--prompt: empty after tokenization; give at least one token of text")
    if len(prompt) + max_new_tokens > cfg.n_positions:
        raise ConfigError(f"prompt ({len(prompt)} tokens) + --max_new_tokens={max_new_tokens} exceeds "
                          f"model.n_positions={cfg.n_positions}; shorten one of them")
    key = jax.random.PRNGKey(seed)
    out: list[int] = []
    if use_cache:
        cache = model_lib.empty_cache(cfg, 1, policy.compute_dtype)
        logits, cache = _forward_cached(graphdef, params, jnp.asarray([prompt], jnp.int32), cache)
    else:
        seq = np.zeros((1, cfg.n_positions), np.int32)
        seq[0, : len(prompt)] = prompt
        logits = model_lib.logits(graphdef, params, seq)[:, len(prompt) - 1]
    for i in range(max_new_tokens):
        tok = int(_pick(logits, key, i, float(temperature), int(top_k), float(top_p))[0])
        out.append(tok)
        if eos_id is not None and tok == eos_id:
            break
        if i == max_new_tokens - 1:
            break
        if use_cache:
            logits, cache = _forward_cached(graphdef, params, jnp.asarray([[tok]], jnp.int32), cache)
        else:
            n = len(prompt) + len(out)
            seq[0, n - 1] = tok
            logits = model_lib.logits(graphdef, params, seq)[:, n - 1]
    return out


def define_flags():
    flags.DEFINE_string("workdir", None, "The run directory.")
    flags.DEFINE_string("prompt", None, "Text to continue.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
    flags.DEFINE_float("temperature", 0.8, "0 = greedy.")
    flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: keep the most likely tokens up to this mass.")
    flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same text.")


def main(argv):
    F = cli.FLAGS
    cli.require(workdir=F.workdir, prompt=F.prompt)
    check_sampling(F.temperature, F.top_k, F.top_p)  # before the checkpoint is read
    _, trainer, state, meta, step = saved_run.load_run(F.workdir, F.step)
    tok = tok_lib.load(saved_run.tokenizer_spec(meta, F.workdir))
    ids = generate(trainer.graphdef, state.params, trainer.model_cfg, trainer.policy, tok.encode([F.prompt])[0],
                   F.max_new_tokens, temperature=F.temperature, top_k=F.top_k, top_p=F.top_p,
                   seed=F.seed, eos_id=tok.eos_id)
    print(F.prompt + tok.decode(i for i in ids if i != tok.eos_id))


if __name__ == "__main__":
    cli.run(main, define_flags)
