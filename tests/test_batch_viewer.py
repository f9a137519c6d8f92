"""The batch viewer (jaxlm.data.viewer, python -m jaxlm.data --batches/--find) gives exactly the rows the
train step consumed: recorded inside a real run (tests/helpers/record_batches.py), in one process and
gathered across two, step for step; the data order follows its seed; --find's hits hold the text."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import train
from jaxlm.data import viewer
from jaxlm.errors import ConfigError

from conftest import ROOT, once_per_session, train_tiny_run, write_word_corpus
from helpers import pods, record_batches

STEPS = 6
# the tiny run's shape (conftest.train_tiny_run sets the corpus, vocabulary and logging)
OVERRIDES = {"train.steps": STEPS, "train.batch_size": 4, "train.seq_len": 32, "model.n_positions": 32}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A six-step tiny run trained in this process, with every batch its train step consumed."""
    def build(root):
        seen: dict[int, np.ndarray] = {}
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train.Trainer, "__init__", record_batches.recording_init(lambda s, b: seen.setdefault(s, b)))
            run = train_tiny_run(root, **OVERRIDES)
        assert sorted(seen) == list(range(1, STEPS + 1))
        return run, np.stack([seen[s] for s in range(1, STEPS + 1)])

    return once_per_session(tmp_path_factory, "viewer-tiny", build)


def _cli(*args, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "jaxlm.data", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow  # the module's fixture trains a tiny run (about 11 s)
def test_the_viewer_gives_the_batches_the_train_step_consumed(tiny):
    run, recorded = tiny
    cfg = viewer.run_config(run)
    got = viewer.batches(cfg, run, 1, STEPS, log=lambda s: None)
    assert got.dtype == np.int32 and got.shape == (STEPS, 4, 33)
    np.testing.assert_array_equal(got, recorded)
    np.testing.assert_array_equal(viewer.batches(cfg, run, 3, 5, log=lambda s: None), recorded[2:5])


@pytest.mark.slow  # a subprocess
def test_the_cli_writes_the_same_rows(tiny, tmp_path):
    run, recorded = tiny
    saved = json.loads((run / "run.json").read_text())["config"]
    data_flags = [f"--config.data.{k}={saved['data'][k]}" for k in ("source", "vocab_size", "val_fraction")]
    out = tmp_path / "b.npy"
    p = _cli("--config=configs/tiny.py", f"--workdir={run}", *data_flags,
             *(f"--config.{k}={v}" for k, v in OVERRIDES.items()), "--batches=2:4", f"--out={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "warning" not in p.stderr, p.stderr  # the same data fields as the run's run.json
    got = np.load(out)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, recorded[1:4])
    assert f"wrote {out}: int32 (3, 4, 33), steps 2 to 4" in p.stderr
    assert not (tmp_path / "b.npy.partial").exists()


@pytest.mark.slow  # the module's fixture trains a tiny run (about 11 s)
def test_a_different_config_is_named_in_one_warning(tiny):
    run, _ = tiny
    cfg = config_lib.with_overrides(viewer.run_config(run), {"data.seed": 5, "optim.lr": 1e-4})
    said: list[str] = []
    viewer.run_config(run, cfg, log=said.append)
    assert len(said) == 1 and said[0].startswith("warning: ") and "data.seed: -1 -> 5" in said[0], said
    assert "optim.lr" not in said[0]  # it does not change the batches


@pytest.mark.slow  # the module's fixture trains a tiny run (about 11 s)
def test_the_data_order_follows_its_seed(tiny):
    run, _ = tiny
    cfg = viewer.run_config(run)
    quiet = lambda s: None  # noqa: E731

    def first_batch(**o):
        return viewer.batches(config_lib.with_overrides(cfg, o), run, 1, 2, log=quiet)

    a, b = first_batch(**{"data.seed": -1, "train.seed": 21}), first_batch(**{"data.seed": -1, "train.seed": 49})
    assert not np.array_equal(a[0], b[0])  # data.seed -1: train.seed orders the data
    np.testing.assert_array_equal(first_batch(**{"data.seed": 5, "train.seed": 21}),
                                  first_batch(**{"data.seed": 5, "train.seed": 49}))


def _word_in(tok, row: np.ndarray) -> str:
    """A word of `row` (not its first or last, which the row may cut) whose ids after a space are in it."""
    for word in tok.decode(row).split(" ")[1:-1]:
        ids = tok.encode([" " + word])[0]
        if len(word) >= 4 and word.isalpha() and len(viewer.rows_containing(row[None], ids)):
            return word
    raise AssertionError(f"no whole word in {tok.decode(row)!r}")


@pytest.mark.slow  # the module's fixture trains a tiny run (about 11 s)
def test_find_reports_the_steps_whose_rows_hold_the_text(tiny):
    run, recorded = tiny
    cfg = viewer.run_config(run)
    cache, loader = viewer.open_loader(cfg, run, log=lambda s: None)
    tok = cache.tokenizer()
    word = _word_in(tok, recorded[2][1])  # step 3, row 1
    said: list[str] = []
    hits = viewer.find(cfg, run, word, log=said.append)
    assert (3, 1) in hits
    epoch = viewer.epoch_steps(loader)
    assert all(1 <= s <= epoch for s, _ in hits)
    assert any(line.startswith(f"searching the first epoch: steps 1 to {epoch} ") for line in said), said
    patterns = viewer.token_patterns(tok, word)
    for s, r in hits:  # every hit really holds the text's ids
        row = loader.batch(s - 1)[r][None]
        assert any(len(viewer.rows_containing(row, p)) for p in patterns), (s, r)
    assert viewer.find(cfg, run, word, 2, 4, log=said.append) == [(s, r) for s, r in hits if 2 <= s <= 4]
    assert viewer.find(cfg, run, "QUUX-9 ZZ", log=said.append) == []  # upper case: never in the corpus


@pytest.mark.slow  # a subprocess
def test_the_cli_says_when_a_text_is_in_no_row(tiny):
    run, _ = tiny
    p = _cli(f"--workdir={run}", "--find=QUUX-9 ZZ")  # the run's own config (run.json)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout == ""
    assert "'QUUX-9 ZZ': in no row of the first epoch" in p.stderr
    assert "searching the first epoch: steps 1 to" in p.stderr


@pytest.mark.parametrize("text,message", [
    ("0:3", "--batches=0:3: FIRST must be >= 1"), ("5:2", "--batches=5:2: LAST must be >= FIRST"),
    ("x", "--batches=x: not FIRST:LAST"), ("1:2:3", "--batches=1:2:3: not FIRST:LAST")])
def test_a_bad_range_is_one_error_naming_batches(text, message):
    with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.")):
        viewer.parse_range(text)


def test_a_range_parses():
    assert viewer.parse_range("3:5") == (3, 5) and viewer.parse_range("7") == (7, 7)


@pytest.mark.slow  # subprocesses
@pytest.mark.parametrize("args,message", [
    (["--batches=0:3", "--out=x.npy"], "error: --batches=0:3: FIRST must be >= 1"),
    (["--batches=5:2", "--out=x.npy"], "error: --batches=5:2: LAST must be >= FIRST"),
    (["--batches=x", "--out=x.npy"], "error: --batches=x: not FIRST:LAST"),
    (["--batches=1:3"], "error: --batches needs --out=FILE.npy"),
    (["--out=x.npy"], "error: --out needs --batches"),
])
def test_the_cli_refuses_bad_flags_in_one_line(args, message, tmp_path):
    p = _cli("--config=configs/tiny.py", f"--workdir={tmp_path}", *args, timeout=120)
    assert p.returncode == 1, p.stderr[-3000:]
    assert len(_error_lines(p.stderr)) == 1 and _error_lines(p.stderr)[0].startswith(message), p.stderr[-3000:]
    assert "Traceback" not in p.stderr and not any(tmp_path.iterdir())  # refused before anything was built


@pytest.mark.slow  # two jax.distributed processes
def test_two_processes_train_on_the_global_batches_one_process_views(tmp_path):
    """Each process loads its block of every global batch; the viewer reads the global batch in one."""
    steps, corpus, run, recorded = 4, write_word_corpus(tmp_path / "corpus", 30), tmp_path / "run", tmp_path / "rec"
    port = pods.free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "JAXLM_TEST_BATCHES": str(recorded),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_COMPILATION_CACHE_DIR": str(pods.compile_cache()),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    args = pods.tiny_args(run, corpus, tmp_path / "cache", steps)
    logs = [open(tmp_path / f"p{i}.txt", "w") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "helpers" / "record_batches.py"), *args,
                               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                              cwd=ROOT, env=env, stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p, f in zip(procs, logs):
            if p.poll() is None:
                p.kill()
            f.close()
    assert codes == [0, 0], (tmp_path / "p0.txt").read_text()[-3000:] + (tmp_path / "p1.txt").read_text()[-3000:]
    got = viewer.batches(viewer.run_config(run), run, 1, steps, log=lambda s: None)
    assert got.shape == (steps, 8, 33)
    for s in range(1, steps + 1):
        np.testing.assert_array_equal(got[s - 1], np.load(recorded / f"step-{s:04d}.npy"), err_msg=f"step {s}")
