"""One cache per machine: runs in fresh workdirs over the same corpus find the tokenizer and token cache
built by the first (``paths.machine_cache``), ``python -m jaxlm.data --cache`` lists what it holds and
who uses it, ``--prune`` deletes what no run directory uses, and a damaged shared cache is never used."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxlm import config, data, paths, saved_run
from jaxlm import run as run_lib
from jaxlm.data import cache_index
from jaxlm.data import tokenizer as tok_lib

from conftest import ROOT, write_word_corpus


def test_the_machine_cache_is_jaxlm_cache_else_xdg_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.machine_cache() == tmp_path / "mine"
    monkeypatch.delenv("JAXLM_CACHE")
    assert paths.machine_cache() == tmp_path / "xdg" / "jaxlm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.machine_cache() == tmp_path / "home" / ".cache" / "jaxlm"
    assert paths.mirror("gs://b/run").parent == tmp_path / "home" / ".cache" / "jaxlm" / "mirror"


def _cfg(corpus: Path, **over):
    return config.load(ROOT / "configs" / "tiny.py", {
        "data.source": f"files:{corpus}/*.txt", "data.vocab_size": 300, "data.val_fraction": 0.2, "train.steps": 2,
        "train.eval_every": 0, "log.wandb_mode": "disabled", "log.stats_every": 0, "checkpoint.stages": ((1, 10),),
        **over})


@pytest.fixture
def two_runs(tmp_path, monkeypatch):
    """Two runs in fresh workdirs over one corpus, the machine's cache in tmp_path/cache: their logs."""
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "cache"))
    corpus = write_word_corpus(tmp_path / "corpus", 24)
    logs = {}
    for name in ("a", "b"):
        logs[name] = []
        run_lib.run(_cfg(corpus), tmp_path / name, log=logs[name].append)
    return tmp_path, logs


@pytest.mark.slow  # two tiny runs and the CLI: 20 s
def test_a_second_workdir_builds_nothing_and_prune_deletes_only_what_no_run_uses(two_runs):
    """The second run finds the first's cache and says where; `--cache` lists who uses what; `--prune`
    deletes only what no run directory uses (and nothing young); what it keeps is still found."""
    tmp_path, logs = two_runs
    built = lambda lines: [s for s in lines if s.startswith(("training a", "tokenizing"))]  # noqa: E731
    assert len(built(logs["a"])) == 2 and built(logs["b"]) == [], (logs["a"], logs["b"])
    hit = [s for s in logs["b"] if "cache hit" in s]
    assert len(hit) == 1 and str(tmp_path / "cache" / "tokens") in hit[0], logs["b"]
    meta = [json.loads((tmp_path / n / "run.json").read_text())["data"] for n in "ab"]
    assert meta[0]["cache"] == meta[1]["cache"] and meta[0]["cache"].startswith(str(tmp_path / "cache"))
    assert not (tmp_path / "a" / "data").exists()  # nothing of the cache in a workdir any more
    root = tmp_path / "cache"
    listing = {e["name"]: e for e in cache_index.entries(root)}
    tokens = [e for e in listing.values() if e["kind"] == "token"]
    assert len(tokens) == 1 and sorted(tokens[0]["runs"]) == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert [e["needed"] for e in listing.values() if e["kind"] == "tokenizer"] == [True]
    # an unused cache (another seq_len) and a damaged one set aside: what prune takes
    data.prepare(_cfg(tmp_path / "corpus", **{"train.seq_len": 32}), None, log=lambda s: None)
    aside = root / "tokens" / (tokens[0]["path"].name + ".corrupt-20261207-000000")
    shutil.copytree(tokens[0]["path"], aside)
    shutil.rmtree(tmp_path / "a")
    young = cache_index.prune(root)  # everything was made or used within the grace period: kept
    assert young == [] and {e["name"] for e in cache_index.entries(root)} >= set(listing)
    for e in cache_index.entries(root):  # an hour and a minute later
        os.utime(e["path"], (e["path"].stat().st_atime, e["path"].stat().st_mtime - cache_index.GRACE_S - 60))
    res = subprocess.run([sys.executable, "-m", "jaxlm.data", "--prune"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAXLM_CACHE": str(root)})
    assert res.returncode == 0, res.stderr[-2000:]
    after = {e["name"]: e for e in cache_index.entries(root)}
    assert tokens[0]["name"] in after and after[tokens[0]["name"]]["runs"] == [str(tmp_path / "b")]
    assert [e["kind"] for e in after.values()] == ["token", "tokenizer"], after  # the tokenizer it needs stays
    assert "deleted tokens/" in res.stderr and "pruned 2 entries" in res.stderr, res.stderr
    assert f"{tokens[0]['name']}" in res.stdout and str(tmp_path / "b") in res.stdout, res.stdout
    # the kept cache is still found: a third workdir builds nothing
    logs = []
    data.prepare(_cfg(tmp_path / "corpus"), tmp_path / "c", log=logs.append)
    assert any("cache hit" in s for s in logs) and not any(s.startswith(("training", "tokenizing")) for s in logs)


def test_a_damaged_shared_cache_is_set_aside_and_rebuilt_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "cache"))
    corpus = write_word_corpus(tmp_path / "corpus", 12)
    first = data.prepare(_cfg(corpus), tmp_path / "a", log=lambda s: None)
    rows = first.path / "train.bin"
    size = rows.stat().st_size
    rows.write_bytes(rows.read_bytes()[:-2])  # a half-written copy
    logs = []
    again = data.prepare(_cfg(corpus), tmp_path / "b", log=logs.append)
    assert any("set aside" in s for s in logs) and any(s.startswith("tokenizing") for s in logs), logs
    assert again.path == first.path and (again.path / "train.bin").stat().st_size == size


@pytest.mark.slow  # a tiny run: 8 s
def test_a_run_keeps_its_tokenizer_so_it_decodes_without_the_cache(tmp_path, monkeypatch):
    """The run directory's own copy (WORKDIR/tokenizer): with the machine's cache gone (pruned, another
    machine), the run's tokenizer is still found, the very one it trained with."""
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "cache"))
    run_lib.run(_cfg(write_word_corpus(tmp_path / "corpus", 24)), tmp_path / "b", log=lambda s: None)
    meta = json.loads((tmp_path / "b" / "run.json").read_text())
    shutil.rmtree(tmp_path / "cache")
    spec = saved_run.tokenizer_spec(meta, tmp_path / "b")
    assert spec.startswith(str(tmp_path / "b" / "tokenizer"))
    assert tok_lib.load(spec).sha256 == meta["data"]["tokenizer_sha256"]
