"""Test setup: CPU only, deterministic; jaxlm is imported as installed (pip install -e .). The machine's
cache (paths.machine_cache) is one directory of the session's own, shared by its tests and their
subprocesses as a machine's is by its runs, and never the user's: tests damage caches on purpose."""

import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
SESSION_CACHE = tempfile.mkdtemp(prefix="jaxlm-test-cache-")
os.environ["JAXLM_CACHE"] = SESSION_CACHE
ROOT = Path(__file__).resolve().parent.parent

SHARED_DATA = ROOT.parent / "shared" / "data"


def train_tiny_run(root: Path, **overrides) -> Path:
    """A two-step tiny run (checkpoints at steps 0, 1 and 2) on a made-up corpus, trained in-process."""
    from jaxlm import config
    from jaxlm import run as run_lib

    corpus = write_word_corpus(root / "corpus", 30)
    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {
        "data.source": f"files:{corpus}/*.txt", "data.vocab_size": 300, "data.val_fraction": 0.2, "train.steps": 2,
        "train.eval_every": 0, "log.wandb_mode": "disabled", "log.stats_every": 0, "checkpoint.stages": ((1, 10),),
        **overrides})
    run_lib.run(cfg, root / "run", log=lambda s: None)
    return root / "run"


def once_per_session(tmp_path_factory, name: str, build):
    """`build(directory)`'s value, built once per test session: the suite runs on pytest-xdist workers
    (-n 2), and a module fixture runs once on every worker that runs one of its module's tests, so an
    expensive one built this way is built by the first worker to need it while the other waits, then
    read back (pickled). The directory and the value are read-only to the tests that use them."""
    import pickle

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    base = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's, above the workers'
    directory, value = base / f"once-{name}", base / f"once-{name}.pickle"
    with FileLock(f"{directory}.lock"):
        if value.exists():
            return pickle.loads(value.read_bytes())
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        result = build(directory)
        value.write_bytes(pickle.dumps(result))
        return result


def write_word_corpus(d: Path, n_docs: int, words_per_doc: int = 400, seed: int = 0) -> Path:
    """Text files of random made-up words: a small corpus a tokenizer can learn quickly."""
    import numpy as np

    rng = np.random.RandomState(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, size=rng.randint(2, 8))) for _ in range(400)]
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        n = words_per_doc or rng.randint(80, 300)
        (d / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(words, size=n)) + f"\nend of document {i}.\n")
    return d


def pytest_xdist_auto_num_workers(config):
    """Workers for ``-n auto`` (addopts): one per core plus one for the whole suite, whose end-to-end tests
    wait on subprocesses, polls and timeouts; one per core for the in-process fast lane (``-m "not slow"``).
    Measured in PERFORMANCE.md (the suite on three workers). ``PYTEST_XDIST_AUTO_NUM_WORKERS`` (xdist's
    own hook reads it) or ``-n N`` decide instead."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores if "not slow" in (config.getoption("markexpr") or "") else cores + 1


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)
