"""The multi-host cache build: two local processes joined by jax.distributed each tokenize their
share of the shards, and process 0's cache has the same bytes as a one-process build -- with a
shared local data.cache_dir, and with one on gs:// (the local fake GCS server of tests/test_gcs.py)
where each host has its own local directory, so the shards can only meet through the bucket."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_gcs import BUCKET, gcs  # noqa: F401  (the emulator fixture)

from jaxlm import config, data, paths
from jaxlm.data import cache_shards

from conftest import ROOT, write_word_corpus

SHARD_DOCS = 4

HOST = """
import json, sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from jaxlm import config, data
from jaxlm.data import cache_shards
cache_shards.SHARD_DOCS = int(sys.argv[4])
real, done = cache_shards._tokenize_shard, []
def recorded(docs, path, tok=None, threads=1, eos=None):  # data.workers=0: tokenized in this process
    done.append(f"{path.parent.name}/{path.name}")
    return real(docs, path, tok, threads, eos)
cache_shards._tokenize_shard = recorded
o = json.loads(sys.argv[3])
log = []
cache = data.prepare(config.load("configs/tiny.py", o), o["data.cache_dir"], log=log.append)
print(json.dumps({"tokenized": done, "log": log, "path": str(cache.path)}))
"""


def _overrides(corpus, root, tokenizer=""):
    return {"data.source": f"files:{corpus}/*.txt", "data.vocab_size": 300, "data.val_fraction": 0.1,
            "data.cache_dir": str(root), "data.workers": 0, "data.tokenizer": tokenizer,
            "train.seq_len": 32, "train.batch_size": 8}


def _files(p):
    return {f.name: f.read_bytes() for f in sorted(p.iterdir())}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two jax.distributed processes
@pytest.mark.parametrize("where", ["shared directory", "bucket"])
def test_two_hosts_tokenize_their_shares_and_build_the_same_bytes(where, tmp_path, monkeypatch, request):
    corpus = write_word_corpus(tmp_path / "corpus", 60, words_per_doc=0)
    monkeypatch.setattr(cache_shards, "SHARD_DOCS", SHARD_DOCS)
    log: list[str] = []
    ref = data.prepare(config.load(ROOT / "jaxlm" / "configs" / "tiny.py", _overrides(corpus, tmp_path / "one")),
                       tmp_path / "one", log=log.append)
    total = int(re.search(r"(\d+) shards tokenized", log[-1]).group(1))
    root = tmp_path / "two"
    if where == "bucket":
        request.getfixturevalue("gcs")  # the emulator, and the environment pointing at it (inherited)
        root = f"gs://{BUCKET}/multihost-{tmp_path.name}"
    o = _overrides(corpus, root, tokenizer=ref.tokenizer_spec)  # the same tokenizer: the same key
    addr = f"127.0.0.1:{_free_port()}"
    envs = [{**os.environ, "JAX_PLATFORMS": "cpu", "JAXLM_CACHE": str(tmp_path / f"host-{i}")} for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", HOST, addr, str(i), json.dumps(o), str(SHARD_DOCS)], cwd=ROOT,
                              env=envs[i], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    hosts = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    for h, host in enumerate(hosts):
        names = host["tokenized"]
        # its share only: shard i on host i mod 2, each once, in both splits
        assert names and all(int(n.split("/")[1][:7]) % 2 == h for n in names), (h, names, host["log"])
        assert len(set(names)) == len(names), names
        assert f"process {h} of 2: tokenized {len(names)} shards" in "\n".join(host["log"]), host["log"]
    assert len(hosts[0]["tokenized"]) + len(hosts[1]["tokenized"]) == total
    assert {n.split("/")[0] for n in hosts[0]["tokenized"]} == {"train", "validation"}
    # process 0 assembled the rows from the finished shards: nothing tokenized twice
    assert re.search(r"0 shards tokenized, \d+ reused", "\n".join(hosts[0]["log"])), hosts[0]["log"]
    for host in hosts:
        assert host["path"].endswith(ref.path.name)
        assert _files(ref.path) == {k: v for k, v in _files(Path(host["path"])).items() if k != paths.COMMIT}
    if where == "bucket":  # process 1's copy came from the bucket; the shards left there are gone
        assert hosts[0]["path"] != hosts[1]["path"]
        assert sorted(p.name for p in (paths.path(root) / "tokens").iterdir()) == [ref.path.name]
