"""XLA's compiled programs persist in the machine's cache (jaxlm.cli.compile_cache): a second run of the same
model and shapes, in another workdir, reads every program back (it writes none) and trains the same
losses bit for bit; JAXLM_XLA_CACHE=0 keeps none."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, write_word_corpus


def _train(workdir, corpus, cache, **env):
    args = [sys.executable, "-m", "jaxlm.main", "--config=configs/tiny.py", f"--workdir={workdir}",
            f"--config.data.source=files:{corpus}/*.txt", "--config.data.vocab_size=300", "--config.train.steps=6",
            "--config.train.eval_every=3", "--config.train.eval_batches=1", "--config.data.val_fraction=0.2",
            "--config.log.every=1", "--config.log.wandb_mode=disabled", "--config.checkpoint.stages=((3, 10),)"]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "JAXLM_CACHE": str(cache),
                              # every program kept, whatever it took to compile on a loaded machine (the 0.5 s
                              # threshold would make which ones are kept depend on the load)
                              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **env})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r.get("train/loss"), r.get("eval/loss")) for r in map(json.loads, lines)]


def _programs(cache):
    return sorted(p.name for p in (cache / "xla").iterdir()) if (cache / "xla").is_dir() else []


@pytest.mark.slow  # three tiny runs in subprocesses: about 40 s
def test_a_second_run_reads_its_compiled_programs_back_and_trains_the_same(tmp_path):
    corpus = write_word_corpus(tmp_path / "corpus", 20)
    cache = tmp_path / "cache"
    first = _train(tmp_path / "a", corpus, cache)
    written = _programs(cache)
    assert written, "the first run kept no compiled program"
    again = _train(tmp_path / "b", corpus, cache)
    assert _programs(cache) == written  # every program it compiled before was read back, none written
    assert again == first and any(e is not None for _, _, e in first)
    off = tmp_path / "off"
    assert _train(tmp_path / "c", corpus, off, JAXLM_XLA_CACHE="0") == first and _programs(off) == []
