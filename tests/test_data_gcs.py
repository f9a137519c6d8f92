"""Every corpus source and the data.tokenizer read from gs:// (the local fake GCS server of
tests/test_gcs.py): the same documents, tokens and tokenizer as the local files."""

import numpy as np
import pytest
from test_gcs import BUCKET, gcs  # noqa: F401  (the emulator fixture)

from jaxlm import data, paths
from jaxlm.data import remote, sources, tokenizer, tokenizer_train

from conftest import write_word_corpus
from helpers.corpora import cfg_for, docs_of, token_stream, write_datasets_dir, write_jsonl, write_llmc, write_parquet


@pytest.mark.slow
def test_sources_and_tokenizers_on_gs_read_what_the_local_files_hold(gcs, tmp_path):  # noqa: F811
    local = tmp_path / "corpora"
    corpus = write_word_corpus(local / "files", 12, words_per_doc=0)
    docs = docs_of(corpus)
    tok = tokenizer_train.train_byte_bpe(iter(docs), 300)
    tok_dir = local / "tok"
    tok.save(tok_dir)
    specs = {"files": f"files:{corpus}/*.txt", "jsonl": write_jsonl(local / "jl", docs),
             "parquet": write_parquet(local / "pq", docs), "hf": write_datasets_dir(local / "ds", docs)}
    (local / "shards").mkdir()
    ids = token_stream(tok, docs)
    ids[:100].tofile(local / "shards" / "a.bin")
    write_llmc(local / "shards" / "b.bin", ids[100:])
    specs["tokens"] = f"tokens:{local}/shards/*.bin"
    url = f"gs://{BUCKET}/corpora"
    paths.publish(local, url)
    remote_tok = f"hf:{url}/tok"
    assert tokenizer.load(data.cache.local_tokenizer_spec(remote_tok)).sha256 == tok.sha256

    for kind, spec in specs.items():
        remote = spec.replace(str(local), url)
        over = {"data.tokenizer": f"hf:{tok_dir}"}
        if kind == "tokens":
            a = data.prepare(cfg_for(spec, **over), tmp_path / "a", log=lambda s: None)
            b = data.prepare(cfg_for(remote, **{"data.tokenizer": remote_tok}), tmp_path / "b", log=lambda s: None)
            for split in sources.SPLITS:
                np.testing.assert_array_equal(np.asarray(a.split(split)), np.asarray(b.split(split)))
            continue
        want = {s: list(sources.open_source(cfg_for(spec, **over).data).documents(s)) for s in sources.SPLITS}
        got = {s: list(sources.open_source(cfg_for(remote, **over).data).documents(s)) for s in sources.SPLITS}
        assert got == want and want["train"], kind
    fp = sources.open_source(cfg_for(specs["parquet"].replace(str(local), url)).data).fingerprint()
    part = paths.path(f"{url}/pq/part-00000.parquet")  # a rewrite of a file in the bucket changes the fingerprint
    part.write_bytes(part.read_bytes())
    assert sources.open_source(cfg_for(specs["parquet"].replace(str(local), url)).data).fingerprint() != fp


@pytest.mark.slow
def test_a_streamed_cache_on_gs_gives_the_batches_of_a_local_copy_without_downloading_rows(gcs, tmp_path,  # noqa: F811
                                                                                             monkeypatch):
    corpus = write_word_corpus(tmp_path / "c", 30, words_per_doc=0)
    over = {"data.cache_dir": f"gs://{BUCKET}/streamed", "data.vocab_size": 300}
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "host-a"))
    built = data.prepare(cfg_for(f"files:{corpus}/*.txt", **over), tmp_path / "w", log=lambda s: None)  # uploads
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "host-b"))  # another host, rows left in the bucket
    cfg = cfg_for(f"files:{corpus}/*.txt", **over, **{"data.remote_reads": "stream"})
    streamed = data.prepare(cfg, tmp_path / "w", log=lambda s: None)
    assert isinstance(streamed.split("train"), remote.RemoteRows)
    assert not list((tmp_path / "host-b").rglob("*.bin"))  # nothing but the manifest and tokenizer came down
    local, far = data.train_loader(built, cfg), data.train_loader(streamed, cfg)
    for _ in range(12):  # more than an epoch of this small corpus
        np.testing.assert_array_equal(next(far), next(local))
    far.set_state({"next_index": 3})
    np.testing.assert_array_equal(next(far), local.batch(3))
    v_local, v_far = data.eval_loader(built, cfg), data.eval_loader(streamed, cfg)
    for i in range(len(v_local)):
        np.testing.assert_array_equal(v_far.batch(i), v_local.batch(i))
    rows = streamed.split("validation")
    np.testing.assert_array_equal(np.stack([rows[i] for i in range(len(rows))]), built.split("validation"))
