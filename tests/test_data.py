"""Input pipeline: sources, tokenizer, cache, loader; determinism, resume, sharding, bad input."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from jaxlm import config, data
from jaxlm.data import cache as cache_lib
from jaxlm.data import cache_lock, sources, tokenizer_train
from jaxlm.errors import DataError

from conftest import ROOT, SHARED_DATA, write_word_corpus


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own machine cache, WORKDIR/data of the tmp_path workdir it prepares in: these tests
    count what is built, and a cache shared with the session's other tests would be found instead."""
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "data"))

SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"
WIKITEXT = SHARED_DATA / "wikitext-2" / "valid.txt"


def _cfg(source, **over):
    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py")
    cfg.data.source = source
    cfg.data.vocab_size = 400
    cfg.data.val_fraction = 0.1
    cfg.train.seq_len = 32
    cfg.train.batch_size = 8
    for k, v in over.items():
        config.set_by_path(cfg, k, v)
    return cfg


def _write_corpus(d: Path, n_docs=60, seed=0) -> Path:
    return write_word_corpus(d, n_docs, words_per_doc=0, seed=seed)


def _prepare(cfg, root):
    return data.prepare(cfg, root, log=lambda s: None)


def _files(p: Path):
    return {f.name: f.read_bytes() for f in sorted(p.iterdir())}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


# --- determinism -----------------------------------------------------------------------------

def test_two_builds_are_byte_identical_and_give_the_same_batches(corpus, tmp_path):
    cfg = _cfg(f"files:{corpus}/*.txt")
    a, b = _prepare(cfg, tmp_path / "a"), _prepare(cfg, tmp_path / "b")
    assert _files(a.path) == _files(b.path)
    assert a.manifest["splits"]["train"]["sequences"] > 40
    la = data.train_loader(a, cfg, process_index=0, process_count=1)
    lb = data.train_loader(b, cfg, process_index=0, process_count=1)
    for _ in range(12):
        np.testing.assert_array_equal(next(la), next(lb))
    # and a rebuild into the same root finds the cache instead of building it again
    assert _prepare(cfg, tmp_path / "a").path == a.path


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"shared corpus absent: {SHAKESPEARE} (tests use it when present)")
def test_shared_corpora_build_deterministically(tmp_path):
    cfg = _cfg(f"files:{SHAKESPEARE}", **{"data.doc_separator": "\n\n", "train.seq_len": 64})
    a, b = _prepare(cfg, tmp_path / "a"), _prepare(cfg, tmp_path / "b")
    assert _files(a.path) == _files(b.path)
    tok = a.tokenizer()
    text = SHAKESPEARE.read_text()[:2000]
    assert tok.decode(tok.encode([text])[0]) == text  # lossless
    m = a.manifest["splits"]
    assert m["train"]["documents"] > 5000 and m["validation"]["documents"] > 300


@pytest.mark.skipif(not WIKITEXT.exists(), reason=f"shared corpus absent: {WIKITEXT}")
def test_wikitext_builds(tmp_path):
    cache = _prepare(_cfg(f"files:{WIKITEXT}", **{"data.doc_separator": "\n \n = "}), tmp_path)
    assert cache.manifest["splits"]["train"]["tokens"] > 100_000


# --- loader -----------------------------------------------------------------------------------

def test_restored_loader_continues_exactly(corpus, tmp_path):
    cfg = _cfg(f"files:{corpus}/*.txt")
    cache = _prepare(cfg, tmp_path)
    full = data.train_loader(cache, cfg, process_index=0, process_count=1)
    reference = [next(full) for _ in range(31)]
    k = 9
    first = data.train_loader(cache, cfg, process_index=0, process_count=1)
    for _ in range(k):
        next(first)
    state = first.get_state()
    assert state["next_index"] == k
    state = json.loads(json.dumps(state))  # small and serialisable
    resumed = data.train_loader(cache, cfg, process_index=0, process_count=1)
    resumed.set_state(state)
    for i in range(k, k + 21):
        np.testing.assert_array_equal(next(resumed), reference[i])


def test_two_hosts_are_disjoint_and_cover_the_global_batch(corpus, tmp_path):
    cfg = _cfg(f"files:{corpus}/*.txt")
    cache = _prepare(cfg, tmp_path)
    one = data.train_loader(cache, cfg, process_index=0, process_count=1)
    hosts = [data.train_loader(cache, cfg, process_index=h, process_count=2) for h in (0, 1)]
    for _ in range(10):
        g = next(one)
        h0, h1 = next(hosts[0]), next(hosts[1])
        assert h0.shape == h1.shape == (cfg.train.batch_size // 2, cfg.train.seq_len + 1)
        rows = lambda a: {r.tobytes() for r in a}
        assert not rows(h0) & rows(h1)
        assert rows(h0) | rows(h1) == rows(g)


def test_every_sequence_once_per_epoch_and_a_new_order_each_epoch(tmp_path):
    rows = np.arange(48 * 5, dtype=np.uint16).reshape(48, 5)  # row i holds distinct tokens
    loader = data.Loader(rows, global_batch=8, seed=3, process_index=0, process_count=1)
    epochs = [np.concatenate([next(loader) for _ in range(6)]) for _ in range(2)]
    for e in epochs:
        assert sorted(e[:, 0].tolist()) == list(range(0, 240, 5))  # each row exactly once
        assert sorted(e.ravel().tolist()) == list(range(240))  # so every token exactly once
    assert not np.array_equal(epochs[0], epochs[1])
    assert loader.get_state() == {"next_index": 12, "epoch": 2}


def test_validation_is_in_order_without_shuffle(corpus, tmp_path):
    cfg = _cfg(f"files:{corpus}/*.txt", **{"data.val_fraction": 0.3})
    cache = _prepare(cfg, tmp_path)
    val = list(data.eval_loader(cache, cfg, batch_size=2, process_index=0, process_count=1))
    expect = np.asarray(cache.split("validation"))[: len(val) * 2].astype(np.int32)
    np.testing.assert_array_equal(np.concatenate(val), expect)


def test_held_out_split_is_deterministic_and_disjoint(corpus):
    docs = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    val = [i for i, d in enumerate(docs) if sources.held_out(d, 0.25)]
    assert 0 < len(val) < len(docs)
    # pinned (the corpus is seeded): the same split in every process and on every machine, which
    # calling held_out twice in one process could not show (a salted hash() would pass that)
    assert val == [6, 7, 11, 18, 21, 24, 26, 27, 29, 31, 33, 35, 43, 44, 46, 47, 49, 51, 53, 55, 56]


def test_packing_keeps_documents_in_order_with_eos(corpus, tmp_path):
    cfg = _cfg(f"files:{corpus}/*.txt", **{"data.val_fraction": 0.0})
    cache = _prepare(cfg, tmp_path)
    tok = cache.tokenizer()
    flat = np.asarray(cache.split("train")).ravel()
    docs = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    expect = np.concatenate([np.asarray(tok.encode([d])[0] + [tok.eos_id]) for d in docs])
    np.testing.assert_array_equal(flat, expect[: flat.size])
    assert cache.manifest["splits"]["train"]["dropped_tail_tokens"] == expect.size - flat.size < 33


# --- sources ---------------------------------------------------------------------------------

def test_stdlib_corpus_builds_offline(tmp_path):
    cfg = _cfg("stdlib", **{"data.max_docs": 120, "data.tokenizer_max_docs": 120})
    cache = _prepare(cfg, tmp_path)
    s = cache.manifest["splits"]["train"]
    assert s["documents"] >= 100 and s["tokens"] > 100_000
    assert cache.tokenizer().decode(cache.split("train")[0][:20])  # decodes to text


def test_jsonl_gzip_missing_fields_and_bad_bytes(tmp_path, corpus):
    d = tmp_path / "j"
    d.mkdir()
    words = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    lines = [json.dumps({"body": w}) for w in words[:40]] + [json.dumps({"title": "no body"})]
    with gzip.open(d / "a.jsonl.gz", "wt") as f:
        f.write("\n".join(lines))
    cfg = _cfg(f"jsonl:{d}/*.jsonl.gz", **{"data.text_field": "body"})
    with pytest.raises(DataError, match=r"a.jsonl.gz:41: no string field data.text_field='body'.*on_missing_field=skip"):
        _prepare(cfg, tmp_path / "c1")
    cfg.data.on_missing_field = "skip"
    cache = _prepare(cfg, tmp_path / "c2")
    assert cache.manifest["counters"]["missing_field"] == 1
    (d / "b.jsonl").write_bytes(json.dumps({"body": "caf\u00e9 " * 40}).encode().replace(b"\\u00e9", b"\xe9") + b"\n")
    cfg.data.source = f"jsonl:{d}/*"
    cache = _prepare(cfg, tmp_path / "c3")
    assert cache.manifest["counters"]["replaced_bytes_documents"] == 1


def test_tfds_source_reads_a_locally_built_dataset(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class JaxlmTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 50), "validation": self._generate_examples(50, 60)}

        def _generate_examples(self, lo, hi):
            for i in range(lo, hi):
                yield i, {"text": f"example number {i} says hello to the loader. " * 20}

    JaxlmTinyText(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    cfg = _cfg("tfds:jaxlm_tiny_text", **{"data.tfds_data_dir": str(tmp_path / "tfds"), "data.vocab_size": 300})
    cache = _prepare(cfg, tmp_path / "c")
    s = cache.manifest["splits"]
    assert (s["train"]["documents"], s["validation"]["documents"]) == (50, 10)  # the dataset's own split
    with pytest.raises(DataError, match=r"no split 'test'.*\['train', 'validation'\]"):
        _prepare(_cfg("tfds:jaxlm_tiny_text:test", **{"data.tfds_data_dir": str(tmp_path / "tfds")}), tmp_path / "d")
    with pytest.raises(DataError, match=r"not prepared in data.tfds_data_dir.*tfds build jaxlm_tiny_text"):
        _prepare(_cfg("tfds:jaxlm_tiny_text", **{"data.tfds_data_dir": str(tmp_path / "empty")}), tmp_path / "e")


# --- bad input ---------------------------------------------------------------------------------

def test_bad_inputs_fail_early_and_say_how_to_fix(tmp_path, corpus):
    cases = [
        (_cfg(f"files:{tmp_path}/nothing/*.txt"), r"matched no files.*check the pattern"),
        (_cfg("tfds:definitely_not_a_dataset_xyz"), r"unknown TFDS dataset"),
        (_cfg("s3://bucket/x"), r"not understood; use one of stdlib, files:GLOB"),
        (_cfg(f"files:{corpus}/*.txt", **{"data.vocab_size": 60000}),
         r"data.vocab_size=60000 is more than the corpus can support"),
    ]
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("   \n\n\t  ")
    (blank / "b.txt").write_text("")
    cases.append((_cfg(f"files:{blank}/*.txt"), r"empty|no text"))
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text("tiny corpus " * 3)
    cfg = _cfg(f"files:{small}/*.txt", **{"data.vocab_size": 300, "data.val_fraction": 0.0})
    cfg.data.tokenizer = str(_prepare(_cfg(f"files:{corpus}/*.txt"), tmp_path / "tk").tokenizer_path)
    cases.append((cfg, r"make no sequence of train.seq_len\+1=33 tokens"))
    cases.append((_cfg("files:x", **{"data.tokenizer": str(tmp_path / "missing.model")}), r"matched no files"))
    for i, (cfg, pattern) in enumerate(cases):
        with pytest.raises(DataError, match=pattern):
            _prepare(cfg, tmp_path / f"bad{i}")
        # nothing half-written is left where a later run would look
        assert not list((tmp_path / f"bad{i}").glob("data/tokens/*/manifest.json"))


def test_corpus_smaller_than_a_batch(corpus, tmp_path):
    cfg = _cfg(f"files:{corpus}/*.txt")
    cache = _prepare(cfg, tmp_path)
    n = len(cache.split("train"))
    cfg.train.batch_size = n + 1
    with pytest.raises(DataError, match=rf"has {n} sequences, fewer than one batch of {n + 1}"):
        data.train_loader(cache, cfg, process_index=0, process_count=1)


def test_interrupted_build_is_never_used(corpus, tmp_path, monkeypatch):
    cfg = _cfg(f"files:{corpus}/*.txt")
    calls = {"n": 0}
    real = cache_lib._write_split

    def dies_on_validation(docs, tok, seq_len, out, desc):
        calls["n"] += 1
        if desc == "validation":
            raise KeyboardInterrupt  # the user pressed ^C half-way
        return real(docs, tok, seq_len, out, desc)

    monkeypatch.setattr(cache_lib, "_write_split", dies_on_validation)
    with pytest.raises(KeyboardInterrupt):
        _prepare(cfg, tmp_path)
    assert not list(tmp_path.glob("data/tokens/*/manifest.json"))
    monkeypatch.setattr(cache_lib, "_write_split", real)
    cache = _prepare(cfg, tmp_path)
    assert cache.split("train").shape[0] > 0 and not cache.path.name.startswith(".tmp")


def test_missing_tokenizer_file_is_named(tmp_path, corpus):
    cfg = _cfg(f"files:{corpus}/*.txt", **{"data.tokenizer": str(tmp_path / "nope.model")})
    with pytest.raises(DataError, match=r"data.tokenizer=.*nope.model.*no such file"):
        _prepare(cfg, tmp_path)


def test_tokenizer_is_lossless_on_code_and_whitespace():
    docs = ["def f(x):\n    return x  +  1\n\n\tprint('héllo ✓')\n" * 30, "plain text, more text. " * 50]
    tok = tokenizer_train.train(docs, vocab_size=300, max_docs=10)
    for d in docs + ["unseen: 日本語 ≠ 🙂\n  indented"]:
        assert tok.decode(tok.encode([d])[0]) == d


def test_tokenizer_does_not_depend_on_the_machine(monkeypatch, corpus):
    """The same corpus gives the same model bytes (whose sha256 keys the token cache) whatever the
    machine's core count. SentencePiece records its thread count in the model (its vocabulary came out
    the same for 1-16 threads on the corpora tried), so a count read from the machine would change the
    bytes, as the control shows."""
    import os

    from sentencepiece import sentencepiece_model_pb2

    docs = [p.read_text() for p in sorted(corpus.glob("*.txt"))]

    def train():
        return tokenizer_train.train(docs, vocab_size=350, max_docs=60)

    reference = train()
    for cores in (1, 16):
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        monkeypatch.setattr(os, "process_cpu_count", lambda: cores, raising=False)
        assert train().sha256 == reference.sha256, f"the model changed with {cores} cores"
    monkeypatch.undo()
    monkeypatch.setattr(tokenizer_train, "TRAIN_THREADS", tokenizer_train.TRAIN_THREADS + 1)
    assert train().sha256 != reference.sha256  # control: a thread count is visible in the model's bytes
    monkeypatch.undo()
    spec = sentencepiece_model_pb2.ModelProto.FromString(reference.proto).trainer_spec
    assert spec.num_threads == tokenizer_train.TRAIN_THREADS
    # encoding in parallel is the same as encoding on one thread
    assert reference.encode(docs[:20], num_threads=1) == reference.encode(docs[:20], num_threads=16)


def test_a_malformed_line_met_while_training_the_tokenizer_arrives_unchanged():
    """The corpus is read inside SentencePiece's C++ trainer; the error must not come back wrapped."""

    def docs():
        yield "some text to learn from " * 50
        raise DataError("corpus.jsonl:2: not valid JSON (Expecting value); fix or remove the line")

    with pytest.raises(DataError) as e:
        tokenizer_train.train(docs(), 300)
    assert str(e.value) == "corpus.jsonl:2: not valid JSON (Expecting value); fix or remove the line"


def test_stale_build_directories_of_dead_processes_are_removed(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".tmp-key-{socket.gethostname()}-{dead}-abcd1234"
    live = tmp_path / f".tmp-key-{socket.gethostname()}-1-abcd1234"  # pid 1 is alive
    other_host = tmp_path / f".tmp-key-elsewhere-{dead}-abcd1234"
    for d in (stale, live, other_host):
        d.mkdir()
        (d / "partial.bin").write_bytes(b"x" * 100)
    fresh = cache_lock.tmp_dir(tmp_path, "key")
    assert fresh.exists() and not stale.exists() and live.exists() and other_host.exists()
