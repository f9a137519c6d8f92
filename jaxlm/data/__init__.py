"""Input pipeline: source -> tokenizer -> tokenized cache -> grain loader.

    cache = data.prepare(cfg, workdir)                       # builds once, then finds it
    train = data.train_loader(cache, cfg)                    # shuffled, per host, resumable
    val = data.eval_loader(cache, cfg)                       # fixed order, once
"""

from __future__ import annotations

from pathlib import Path

import jax
from jax.experimental import multihost_utils

from jaxlm.data.cache import TokenCache, build
from jaxlm.data.loader import Loader, device_prefetch, to_global


def cache_root(cfg, workdir: str | Path) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(workdir) / "data"


def prepare(cfg, workdir: str | Path, log=print) -> TokenCache:
    """The tokenizer and token cache for this config (built if missing; atomic).

    On a multi-process run process 0 trains the tokenizer and builds the cache while the others
    wait at a barrier; then they find it (a shared data.cache_dir) or, where each host has its own
    directory, build their own copy.
    """
    root = cache_root(cfg, workdir)
    if jax.process_count() == 1:
        return build(cfg.data, cfg.train.seq_len, root, log=log)
    cache, error = None, None
    if jax.process_index() == 0:
        try:
            cache = build(cfg.data, cfg.train.seq_len, root, log=log)
        except Exception as e:  # reach the barrier anyway, so the others are not left waiting
            error = e
    multihost_utils.sync_global_devices("jaxlm.data.prepare")
    if error is not None:
        raise error
    return cache or build(cfg.data, cfg.train.seq_len, root, log=log)


def train_loader(cache: TokenCache, cfg, **kw) -> Loader:
    return Loader(cache.split("train"), global_batch=cfg.train.batch_size, seed=cfg.data.seed,
                  shuffle=True, repeat=True, prefetch=cfg.data.prefetch, split="train", **kw)


def eval_loader(cache: TokenCache, cfg, batch_size: int | None = None, **kw) -> Loader:
    return Loader(cache.split("validation"), global_batch=batch_size or cfg.train.batch_size, shuffle=False,
                  repeat=False, prefetch=cfg.data.prefetch, split="validation", **kw)


__all__ = ["TokenCache", "Loader", "prepare", "train_loader", "eval_loader", "to_global", "device_prefetch",
           "cache_root"]
