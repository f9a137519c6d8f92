"""Input pipeline: source -> tokenizer -> tokenized cache -> grain loader.

    cache = data.prepare(cfg, workdir)                       # builds once, then finds it
    train = data.train_loader(cache, cfg)                    # shuffled, per host, resumable
    val = data.eval_loader(cache, cfg)                       # fixed order, once
"""

from __future__ import annotations

from pathlib import Path

from jaxlm.data.cache import TokenCache, build
from jaxlm.data.loader import Loader, device_prefetch, to_global


def cache_root(cfg, workdir: str | Path) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(workdir) / "data"


def prepare(cfg, workdir: str | Path, log=print) -> TokenCache:
    """The tokenizer and token cache for this config (built if missing; atomic)."""
    return build(cfg.data, cfg.train.seq_len, cache_root(cfg, workdir), log=log)


def train_loader(cache: TokenCache, cfg, **kw) -> Loader:
    return Loader(cache.split("train"), global_batch=cfg.train.batch_size, seed=cfg.data.seed,
                  shuffle=True, repeat=True, prefetch=cfg.data.prefetch, split="train", **kw)


def eval_loader(cache: TokenCache, cfg, batch_size: int | None = None, **kw) -> Loader:
    return Loader(cache.split("validation"), global_batch=batch_size or cfg.train.batch_size, shuffle=False,
                  repeat=False, prefetch=cfg.data.prefetch, split="validation", **kw)


__all__ = ["TokenCache", "Loader", "prepare", "train_loader", "eval_loader", "to_global", "device_prefetch",
           "cache_root"]
