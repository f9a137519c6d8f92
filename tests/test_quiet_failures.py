"""Quiet failures: a full disk is one error line, last, and nothing saved before it is lost; input read
as its format says (JSON Lines on "\\n" only, non-UTF-8 counted per document, a binary file named as
such); run.json rewritten when it no longer says the run's config; errors name what the user set."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import test_faults
from test_faults import _cfg, _flat_overrides, _records

from jaxlm import config, data, telemetry
from jaxlm import run as run_lib
from jaxlm.data import sources
from jaxlm.errors import DataError

from conftest import ROOT, write_word_corpus

TINY = ROOT / "jaxlm" / "configs" / "tiny.py"
corpus, reference = test_faults.corpus, test_faults.reference  # the fault tests' fixtures


def _source(spec, **over):
    return sources.open_source(config.load(TINY, {"data.source": spec, "data.val_fraction": 0.0, **over}).data)


def test_jsonl_records_are_split_on_newlines_only(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one\u2028line"}, ensure_ascii=False) + "\n"
                                      + json.dumps({"text": "two\x85\x0c"}, ensure_ascii=False) + "\r\n")
    assert list(_source(f"jsonl:{tmp_path}/*.jsonl").documents("train")) == ["one\u2028line", "two\x85\x0c"]


def test_non_utf8_bytes_are_counted_per_document(tmp_path):
    docs = [b"fine words", b"caf\xe9 au lait", b"more fine words", b"\xff\xfe broken", b"the end"]
    (tmp_path / "all.txt").write_bytes(b"\n===\n".join(docs))
    src = _source(f"files:{tmp_path}/*.txt", **{"data.doc_separator": "\n===\n"})
    got = list(src.documents("train"))
    assert len(got) == 5 and got[0] == "fine words" and src.counters.replaced_bytes_documents == 2


def test_a_binary_file_in_a_files_glob_is_named_as_not_text(tmp_path):
    write_word_corpus(tmp_path, 3)
    (tmp_path / "photo.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200))
    with pytest.raises(DataError, match=r"photo.txt is not a text file \(NUL bytes"):
        list(_source(f"files:{tmp_path}/*.txt").documents("train"))


def test_run_json_is_rewritten_when_it_is_not_the_runs_config(tmp_path):
    path, meta = tmp_path / "run.json", {"config": {"train": {"steps": 5, "seed": 21}}, "versions": {"jax": "x"}}
    assert telemetry.write_run_json(path, meta) is None and json.loads(path.read_text()) == meta
    assert telemetry.write_run_json(path, {**meta, "versions": {"jax": "y"}}) is None  # same config: kept
    assert json.loads(path.read_text())["versions"] == {"jax": "x"}
    changed = {"config": {"train": {"steps": 9, "seed": 21}}, "versions": {}}
    assert telemetry.write_run_json(path, changed) == "differed from this run's config in train.steps"
    assert json.loads(path.read_text()) == changed
    path.write_text("{ edited by hand")
    assert telemetry.write_run_json(path, meta) == "could not be read as a run's record"
    assert json.loads(path.read_text()) == meta


def test_a_broken_trained_tokenizer_names_its_directory_not_a_flag_never_set(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path / "cache")
    data.prepare(cfg, tmp_path / "w", log=lambda s: None)
    (model,) = (tmp_path / "cache" / "tokenizers").glob("*/tokenizer.model")
    model.write_bytes(b"not a sentencepiece model")
    shutil.rmtree(tmp_path / "cache" / "tokens")
    with pytest.raises(DataError) as e:
        data.prepare(cfg, tmp_path / "w", log=lambda s: None)
    assert "data.tokenizer=" not in str(e.value) and str(model.parent) in str(e.value)
    assert "delete that directory to train it again" in str(e.value)


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB file system (tmpfs): room for the first checkpoints only."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.slow  # trains in a subprocess
def test_a_full_disk_is_one_error_line_last_and_the_run_resumes_from_what_was_saved(corpus, reference, small_disk,
                                                                                    tmp_path):
    root, ref = reference
    args = ["--config=configs/tiny.py", f"--workdir={small_disk / 'w'}", "--config.train.steps=12"] + [
        f"--config.{k}={v}" for k, v in _flat_overrides(corpus, root / "cache").items()]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "jaxlm.main", *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**env, "PYTHONFAULTHANDLER": "1"})
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # a hang: its threads' stacks (faulthandler) in the failure
        proc.send_signal(signal.SIGABRT)
        raise AssertionError(f"the run hung on a full disk:\n{proc.communicate(timeout=60)[1][-6000:]}") from None
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.returncode == 1 and lines[-1].startswith("error: no space left on the device writing "), lines[-5:]
    assert "Traceback" not in res.stderr and sum(x.startswith("error:") for x in lines) == 1, res.stderr[-3000:]
    saved = [int(p.name) for p in (small_disk / "w" / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved and max(saved) >= 3
    moved = tmp_path / "w"  # space freed (the run moved to a disk with room): it resumes, bit for bit
    shutil.copytree(small_disk / "w", moved)
    run_lib.run(_cfg(corpus, root / "cache"), moved, log=lambda s: None)
    got = _records(moved)
    assert [r[telemetry.STEP_LOSSES] for r in got] == [r[telemetry.STEP_LOSSES] for r in ref]


def test_a_library_traceback_whose_log_is_full_neither_hangs_nor_reaches_the_console(monkeypatch):
    """A full disk: the log file's handler fails as a library thread's traceback is routed to it, and
    logging reports that failure on stderr, which is the filter itself. It used to wait there for its
    own lock, so Orbax's thread never ended and the run hung in its save."""
    import errno
    import io
    import logging
    import threading

    from jaxlm import cli

    class FullDisk(logging.Handler):
        def emit(self, record):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                self.handleError(record)  # what a FileHandler does: "--- Logging error ---" and a traceback

    out = io.StringIO()
    f = cli.LibraryTracebacks(out)
    monkeypatch.setattr(sys, "stderr", f)
    log = logging.getLogger("jaxlm")
    monkeypatch.setattr(log, "handlers", [FullDisk()])
    monkeypatch.setattr(log, "level", logging.INFO)
    writer = threading.Thread(target=f.write, daemon=True, args=(
        "Traceback (most recent call last):\n  File \"/x/orbax/future.py\", line 1\nOSError: disk full\n",))
    writer.start()
    writer.join(10)
    assert not writer.is_alive(), "the filter waited on itself"
    f.write("step 9\n")
    assert out.getvalue() == "step 9\n"


def test_a_log_file_on_a_full_disk_drops_records_without_a_word_on_the_console(tmp_path, capsys):
    import errno
    import logging

    from jaxlm import distributed

    path = distributed.process_log(tmp_path)
    root = logging.getLogger()
    (handler,) = [h for h in root.handlers if getattr(h, "baseFilename", None) == str(path.resolve())]

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    try:
        handler.stream = Full()
        logging.getLogger("jaxlm").warning("a record the disk has no room for")
    finally:
        root.removeHandler(handler)
    assert capsys.readouterr().err == ""


def test_an_exception_that_ends_a_library_thread_goes_to_the_log_and_jaxlms_own_to_the_console(monkeypatch, capsys,
                                                                                               caplog):
    import logging
    import threading

    from jaxlm import cli

    monkeypatch.setattr(threading, "excepthook", cli._library_thread_exception)

    def fail():
        raise OSError(28, "No space left on device")

    with caplog.at_level(logging.INFO, logger="jaxlm"):
        for name in ("EventFileWriter", "jaxlm-lease"):
            t = threading.Thread(target=fail, name=name)
            t.start()
            t.join()
    err = capsys.readouterr().err
    assert "EventFileWriter" not in err and "in thread jaxlm-lease" in err and "No space left" in err
    assert [r.getMessage() for r in caplog.records] == ["an exception ended the thread EventFileWriter (--verbose shows them)"]


def test_library_tracebacks_leave_the_console_and_jaxlms_stay():
    import io

    from jaxlm import cli

    out = io.StringIO()
    f = cli.LibraryTracebacks(out)
    f.write("step 1\n")
    f.write("Traceback (most recent call last):\n  File \"/usr/lib/python3/asyncio/base_events.py\", line 1\n")
    f.write("RuntimeError: Event loop is closed\n")
    f.write("Traceback (most recent call last):\n  File \"/x/jaxlm/run.py\", line 2, in run\nValueError: ours\n")
    f.write("\rprogress 50%")
    f.flush()
    assert out.getvalue() == ("step 1\nTraceback (most recent call last):\n  File \"/x/jaxlm/run.py\", line 2, in run\n"
                              "ValueError: ours\n\rprogress 50%")
