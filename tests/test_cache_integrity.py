"""Nothing trains on damaged data: a token cache is verified against its manifest's sizes and chunk
checksums (jaxlm/data/integrity.py); a damaged one is set aside and rebuilt to the same bytes, and a
run that resumes on it continues bit for bit; an export never goes without its tokenizer."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import test_faults
from test_faults import _cfg, _records

from jaxlm import data, export, telemetry
from jaxlm import run as run_lib
from jaxlm.data import cache as cache_lib
from jaxlm.data import integrity
from jaxlm.errors import CheckpointError, DataError

corpus, reference = test_faults.corpus, test_faults.reference  # the fault tests' fixtures


def _build(corpus, root, **over):
    cfg = _cfg(corpus, root / "cache", **over)
    said = []
    return data.prepare(cfg, root / "w", log=said.append), said, cfg


def _damage(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    elif how == "random ids":  # in the vocabulary, the same size: what a checksum alone can tell
        ids = np.random.default_rng(0).integers(0, 300, len(raw) // 2, dtype=np.uint16)
        path.write_bytes(ids.tobytes())
    else:  # one flipped byte
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(bytes(raw))


def test_the_manifest_records_every_file_in_chunks(corpus, tmp_path):
    cache, _, _ = _build(corpus, tmp_path)
    files = cache.manifest["files"]
    assert {"train.bin", "validation.bin"} <= set(files) and any(n.startswith(("hf/", "tokenizer")) for n in files)
    train = files["train.bin"]
    assert train["size"] == (cache.path / "train.bin").stat().st_size
    assert len(train["xxh3_128"]) == max(1, -(-train["size"] // train["chunk_bytes"]))


@pytest.mark.parametrize("what, how", [("train.bin", "random ids"), ("train.bin", "truncate"),
                                       ("train.bin", "flip"), ("tokenizer", "truncate")])
def test_a_damaged_cache_is_set_aside_with_one_warning_and_rebuilt_to_the_same_bytes(corpus, tmp_path, what, how):
    cache, _, _ = _build(corpus, tmp_path)
    original = {p.relative_to(cache.path): p.read_bytes() for p in cache.path.rglob("*") if p.is_file()}
    target = cache.path / "train.bin" if what == "train.bin" else cache.tokenizer_path
    target = target if target.is_file() else target / "tokenizer.json"
    _damage(target, how)
    again, said, _ = _build(corpus, tmp_path)
    warnings = [s for s in said if s.startswith("warning:")]
    assert len(warnings) == 1 and str(target) in warnings[0] and "set aside" in warnings[0], said
    assert ("chunk 0" in warnings[0]) if how != "truncate" else ("bytes" in warnings[0])
    assert len(list(cache.path.parent.glob(f"{cache.path.name}.corrupt-*"))) == 1
    rebuilt = {p.relative_to(again.path): p.read_bytes() for p in again.path.rglob("*") if p.is_file()}
    assert again.path == cache.path and rebuilt == original


def test_ids_beyond_the_vocabulary_are_found_as_a_chunk_is_verified(tmp_path):
    path = tmp_path / "train.bin"
    np.array([1, 2, 300, 4], np.uint16).tofile(path)
    with pytest.raises(integrity.Damage, match="chunk 0 of 1 holds token id 300, beyond the vocabulary of 300"):
        integrity.check_file(path, integrity.record(path), 300, np.uint16)


def test_a_large_cache_is_verified_as_its_rows_are_read_and_set_aside_when_damaged(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "OPEN_BOUND", 0)
    monkeypatch.setattr(integrity, "CHUNK_BYTES", 4096)  # several chunks
    cache, _, cfg = _build(corpus, tmp_path)
    rows = cache.split("train")
    assert isinstance(rows, integrity.VerifiedRows) and len(rows._done) == 0
    np.testing.assert_array_equal(rows[3], np.asarray(np.memmap(cache.path / "train.bin", rows.dtype, "r",
                                                                shape=rows.shape))[3])
    assert rows._done == {3 * rows._row_bytes // 4096}  # only the chunk of row 3 was read
    _damage(cache.path / "train.bin", "flip")
    fresh = cache_lib.TokenCache.open(cache.path)  # sizes fine: opens, the chunks are checked as read
    with pytest.raises(DataError, match="does not match its checksum; the cache was set aside as .*run the same "
                                        "command again to rebuild it"):
        np.asarray(fresh.split("train"))
    assert not cache.path.exists() and list(cache.path.parent.glob(f"{cache.path.name}.corrupt-*"))


def test_a_cache_that_cannot_be_set_aside_is_one_error_saying_how_to_rebuild(corpus, tmp_path, monkeypatch):
    cache, _, _ = _build(corpus, tmp_path)
    _damage(cache.path / "train.bin", "truncate")

    def read_only(self, target):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(Path, "rename", read_only)
    with pytest.raises(DataError) as e:
        _build(corpus, tmp_path)
    message = str(e.value)
    assert "\n" not in message and "cannot be set aside (Read-only file system)" in message
    assert f"delete {cache.path}" in message and "data.cache_dir" in message


@pytest.mark.slow  # trains
def test_a_resume_on_a_damaged_cache_rebuilds_it_and_continues_bit_for_bit(corpus, reference, tmp_path):
    root, ref = reference
    cache_dir = tmp_path / "cache"
    work = tmp_path / "w"
    run_lib.run(_cfg(corpus, cache_dir, **{"train.steps": 6}), work, log=lambda s: None)
    (tokens,) = [p for p in (cache_dir / "tokens").iterdir() if not p.name.startswith(".")]
    _damage(tokens / "train.bin", "random ids")
    said = []
    result = run_lib.run(_cfg(corpus, cache_dir, **{"train.steps": 12, "checkpoint.allow_config_change": True}),
                         work, log=said.append)
    assert result.step == 12 and any("set aside" in s for s in said)
    got = _records(work)
    assert [r[telemetry.STEP_LOSSES] for r in got] == [r[telemetry.STEP_LOSSES] for r in ref]


@pytest.mark.slow  # trains, then the CLI
def test_export_refuses_without_the_runs_tokenizer_in_one_line(corpus, tmp_path):
    from conftest import train_tiny_run

    run = train_tiny_run(tmp_path)
    meta = json.loads((run / "run.json").read_text())
    tok = Path(meta["data"]["tokenizer"].removeprefix("hf:"))
    victim = tok if tok.is_file() else tok / "tokenizer.json"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="does not match|bytes, the manifest recorded"):
        export.export(run, tmp_path / "hf")
    victim.unlink()  # the cache's tokenizer gone: the run's own copy (WORKDIR/tokenizer) is exported
    assert (export.export(run, tmp_path / "hf1") / "tokenizer.json").is_file()
    shutil.rmtree(run / "tokenizer")  # and the copy gone too: refused
    res = subprocess.run([sys.executable, "-m", "jaxlm.export", f"--workdir={run}", f"--to_hf={tmp_path / 'hf2'}"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:") and "is gone" in lines[0], lines
    assert not (tmp_path / "hf2").exists()
