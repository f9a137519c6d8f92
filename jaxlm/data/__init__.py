"""Input pipeline: source -> tokenizer -> tokenized cache -> grain loader.

    cache = data.prepare(cfg, workdir)                       # builds once, then finds it
    train = data.train_loader(cache, cfg)                    # shuffled, per host, resumable
    val = data.eval_loader(cache, cfg)                       # fixed order, once
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm import files, paths
from jaxlm.data import cache_index, chars, mixture, remote, token_source, val_source  # noqa: F401  (chars,

# token_source and val_source register their tokenizer and source kinds with tokenizer.py and sources.py)
from jaxlm.data.cache import TokenCache, build, build_share, complete_directories
from jaxlm.data.loader import Loader, device_prefetch, to_global
from jaxlm.data.mixture import MixtureCache
from jaxlm.errors import DataError


def data_seed(cfg) -> int:
    """The seed of the training data's order: data.seed, or train.seed where data.seed is -1 (the
    default: a seed sweep sweeps data order too, as Mistral's seeds did)."""
    return int(cfg.train.seed) if int(cfg.data.seed) < 0 else int(cfg.data.seed)


def _data_cfg(cfg):
    """cfg.data with its seed resolved (a mixture's schedule reads it)."""
    d = cfg.data.copy_and_resolve_references()
    d.seed = data_seed(cfg)
    return d


def cache_root(cfg, workdir=None):
    """Where the tokenizers and token caches live: data.cache_dir (a path or a URL); else, for a run in an
    object store, beside it (``WORKDIR/data``: every host, and an eval or export anywhere, finds it there);
    else this machine's cache (``paths.machine_cache()``: per host on a pod), which every run and workdir
    on the machine shares. Entries are keyed by content and built under a lock."""
    if cfg.data.cache_dir:
        return paths.path(cfg.data.cache_dir)
    if workdir is not None and paths.is_remote(workdir):
        return paths.path(workdir) / "data"
    return paths.machine_cache()


def prepare(cfg, workdir, log=print) -> TokenCache | MixtureCache:
    """The tokenizer and token cache for this config (built if missing; atomic).

    On a multi-process run without data.cache_dir (and a local workdir), each host has its own machine
    cache: each finds or builds the cache there by itself, and the hosts then check that they hold the
    same one (the same key). With a data.cache_dir (or a run in a bucket), every host first tokenizes
    its share of the cache's shards (``cache.build_share``: shard i on host i mod P); once all have,
    process 0 builds the cache from the
    finished shards (tokenizing any that are missing) while the others wait at a barrier, and they
    find it (a shared data.cache_dir) or, where each host has its own directory, build their own
    copy. The shards reach process 0 through the shared directory or, for a cache root on an object
    store, through the store (uploaded by each host, downloaded by process 0, removed once the
    cache is published). Where the tokenizer is still to be trained, process 0 does all the work.

    A cache root on an object store (``gs://``) is mirrored in a local directory (``paths.mirror``):
    the rows are memory-mapped, which needs a local file. A directory found committed in the store
    is downloaded; one built here is uploaded by process 0, its commit object last (``paths.publish``),
    so a build or an upload cut short is never taken for a complete cache.
    """
    root = cache_root(cfg, workdir)
    local, fetch = root, None
    if paths.is_remote(root):
        local = paths.mirror(root)

        def fetch(directory: Path) -> None:  # a directory of the local mirror, from the store if committed
            url = root / directory.relative_to(local).as_posix()
            if directory.parent.name == "tokens" and _stream(cfg.data, url, local):  # rows stay in the store
                if paths.pull(url, directory, exclude=remote.ROW_FILES):
                    files.atomic_write(directory / remote.MARK, str(url))
            else:
                paths.pull(url, directory)

    def find_or_build() -> TokenCache:
        builder = mixture.build if mixture.is_mixture(cfg.data.source) else build
        cache = builder(_data_cfg(cfg), cfg.train.seq_len, local, log=log, fetch=fetch)
        if fetch is not None and jax.process_index() == 0:
            for directory in complete_directories(local):
                url = root / directory.relative_to(local).as_posix()
                if paths.committed(url) is None:
                    log(f"uploading {directory.relative_to(local)} to {url}")
                    paths.publish(directory, url)
        return cache

    if jax.process_count() == 1:
        return _recorded(find_or_build(), root, workdir)
    if not cfg.data.cache_dir and not paths.is_remote(root):  # each host's own machine cache: each builds its own
        return _same_on_every_host(_recorded(find_or_build(), root, workdir))
    shards = _tokenize_share(cfg, root, local, fetch, log)  # every host: its share of the shards
    multihost_utils.sync_global_devices("jaxlm.data.prepare.shares")  # all shares finished (and uploaded)
    cache, error = None, None
    if jax.process_index() == 0:
        try:
            _gather_shards(shards, root, local)
            cache = find_or_build()
            _drop_shards(shards, root, local)
        except Exception as e:  # reach the barrier anyway, so the others are not left waiting
            error = e
    multihost_utils.sync_global_devices("jaxlm.data.prepare")
    if error is not None:
        raise error
    return _recorded(cache or find_or_build(), root, workdir)


def _same_on_every_host(cache):
    """`cache`, once every host has found or built one of the same key (the same corpus, tokenizer and
    settings): a host whose tokenizer training came out otherwise would train on other ids."""
    key = np.frombuffer(cache.path.name.encode().ljust(64)[:64], dtype=np.uint8)
    keys = np.asarray(multihost_utils.process_allgather(key))
    if (keys != keys[0]).any():
        names = sorted({bytes(k).decode().strip() for k in keys})
        raise DataError(f"the hosts built different token caches ({', '.join(names)}) in their own machine caches: "
                        "their corpora or trained tokenizers differ; set data.cache_dir to a directory every host "
                        "shares (or a gs:// URL), so that one host builds it for all")
    return cache


def _recorded(cache, root, workdir):
    """`cache`, once the cache index notes that `workdir` uses it (``--prune`` keeps it while it does)."""
    if workdir is not None:
        dirs = [c.path for c in cache.components] if isinstance(cache, MixtureCache) else [cache.path]
        cache_index.record(root, workdir, dirs)
    return cache


def _tokenize_share(cfg, root, local: Path, fetch, log) -> Path | None:
    """This host's share of the shards tokenized into the build's shard directory (uploaded to the
    store for a remote root); None where there is nothing to share. A failure here is only logged:
    process 0 tokenizes whatever is missing, and meets the same error itself if it is the data's."""
    if mixture.is_mixture(cfg.data.source):
        return None
    try:
        shards = build_share(cfg.data, cfg.train.seq_len, local, jax.process_index(), jax.process_count(),
                             log=log, fetch=fetch)
        if shards is not None and fetch is not None:
            url = root / shards.relative_to(local).as_posix()
            for f in sorted(shards.glob("*/[!.]*.bin")):
                target = url / f.relative_to(shards).as_posix()
                if not target.exists():
                    files.atomic_write(target, f.read_bytes())
        return shards
    except Exception as e:
        log(f"warning: process {jax.process_index()} could not tokenize its share of the cache "
            f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); process 0 tokenizes it")
        return None


def _gather_shards(shards: Path | None, root, local: Path) -> None:
    """Process 0, for a remote root: the other hosts' finished shards, from the store."""
    if shards is None or not paths.is_remote(root):
        return
    url = root / shards.relative_to(local).as_posix()
    for split_url in (url.iterdir() if url.exists() else ()):
        for f in split_url.iterdir():
            target = shards / split_url.name / f.name
            if not f.name.startswith(".") and not target.exists():
                files.atomic_write(target, f.read_bytes())


def _drop_shards(shards: Path | None, root, local: Path) -> None:
    """Process 0, for a remote root, once the cache is published: the shards left in the store."""
    if shards is not None and paths.is_remote(root):
        url = root / shards.parent.relative_to(local).as_posix()
        if url.exists():
            url.rmtree()


def _stream(data_cfg, url, local: Path) -> bool:
    """Whether a committed token directory's rows are read from the store (data.remote_reads) rather
    than downloaded: always, never, or (auto) when they would not fit in half the free local disk."""
    mode = data_cfg.get("remote_reads", "auto")
    if mode != "auto":
        return mode == "stream"
    record = paths.committed(url)
    if record is None:
        return False
    need = sum(record["files"].get(f, 0) for f in remote.ROW_FILES)
    local.mkdir(parents=True, exist_ok=True)
    return need > shutil.disk_usage(local).free // 2


def train_loader(cache: TokenCache | MixtureCache, cfg, **kw) -> Loader:
    if isinstance(cache, MixtureCache):  # rows: the components' (for the epoch count), order: the schedule
        rows = _Rows(sum(len(c.split("train")) for c in cache.components))
        return Loader(rows, global_batch=cfg.train.batch_size, seed=data_seed(cfg), prefetch=cfg.data.prefetch,
                      split="train", order=cache.order(data_seed(cfg)), **kw)
    return Loader(cache.split("train"), global_batch=cfg.train.batch_size, seed=data_seed(cfg),
                  shuffle=True, repeat=True, prefetch=cfg.data.prefetch, split="train", **kw)


def component_eval_loaders(cache, cfg, batch_size: int | None = None, **kw) -> dict[int, Loader]:
    """{component index: its validation loader} of a mixture (empty for a single source); a
    component whose validation split is smaller than a batch is left out."""
    if not isinstance(cache, MixtureCache):
        return {}
    out = {}
    for i, c in enumerate(cache.components):
        if len(c.split("validation")) >= (batch_size or cfg.train.batch_size):
            out[i] = eval_loader(c, cfg, batch_size=batch_size, **kw)
    return out


class _Rows:
    """Stands for a mixture's rows where only their number is read."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def eval_loader(cache: TokenCache, cfg, batch_size: int | None = None, **kw) -> Loader:
    return Loader(cache.split("validation"), global_batch=batch_size or cfg.train.batch_size, shuffle=False,
                  repeat=False, prefetch=cfg.data.prefetch, split="validation", **kw)


__all__ = ["TokenCache", "MixtureCache", "Loader", "prepare", "train_loader", "eval_loader",
           "component_eval_loaders", "to_global", "device_prefetch", "cache_root", "data_seed"]
