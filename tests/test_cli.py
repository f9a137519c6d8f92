"""Every CLI answers a bad input of its own kind with one `error:` line and a non-zero exit, never a
traceback; `--help` lists the tool's flags."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, once_per_session, train_tiny_run

pytestmark = pytest.mark.slow  # each case starts a python process


def _cli(args, cwd=ROOT, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", WANDB_MODE="disabled")
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _assert_one_error(res, *fragments):
    err = res.stderr
    assert res.returncode != 0, res.stdout + err
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A two-step tiny run with a checkpoint at step 2, trained once per session: read-only here (a test
    that damages a run damages a copy)."""
    return once_per_session(tmp_path_factory, "cli-run", train_tiny_run)


@pytest.mark.parametrize("args, fragment", [
    (["--config=configs/tiny.py", "--workdir=W", "--bogus=1"], "Unknown command line flag 'bogus'"),
    (["--config=configs/tiny.py"], "--workdir is required"),
    (["--config=configs/tiny.py", "--workdir=W", "--config.train.stepz=5"], "did you mean 'steps'?"),
    (["--config=configs/tiny.py", "--workdir=W", "--config.train.steps=1.5"], "--config.train.steps=1.5"),
    (["--config=configs/nope.py", "--workdir=W"], "no such file"),
    (["--config=configs/tiny.py", "--workdir=W", "--config.checkpoint.stages=((0, 100),)"], "checkpoint.stages"),
    # refused once the run has begun (its log file opened): no logs/process-0.log left behind either
    (["--config=configs/tiny.py", "--workdir=W", "--config.data.source=files:/nonexistent/*.txt"], "matched no files"),
])
def test_main_bad_flags_and_config(tmp_path, args, fragment):
    res = _cli(["jaxlm.main", *[a.replace("=W", f"={tmp_path / 'w'}") for a in args]])
    _assert_one_error(res, fragment)
    assert not (tmp_path / "w").exists()  # nothing written for a run that never started


@pytest.mark.parametrize("override, rest", [
    ("train.stepz=5", "unknown config key 'stepz'; did you mean 'steps'?"),
    ("bogus.x=1", "unknown config key 'bogus'; known: checkpoint, data"),
    ("train.steps=ten", "not a whole number; give one, e.g. --config.train.steps="),
    ("optim.lr=x", "not a number; give one, e.g. --config.optim.lr="),
    ("train.steps=-3", "must be a number >= 1"),
    ("precision.regime=fp17", "unknown regime 'fp17'; allowed: fp32"),
    ("mesh.data=0", "a positive size or -1"),
    ("checkpoint.stages=((0, 100),)", "each stage is (every, until)"),
])
def test_every_config_error_has_one_shape(tmp_path, override, rest):
    """`error: --config.KEY=VALUE: what is wrong; what to do`, whichever layer found it (absl's parser,
    ml_collections' keys, the ranges table, a check of its own)."""
    res = _cli(["jaxlm.main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}", f"--config.{override}"])
    _assert_one_error(res, f"error: --config.{override}: {rest}")


def test_the_error_names_the_override_at_fault_among_several(tmp_path):
    res = _cli(["jaxlm.main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                "--config.data.source=files:x", "--config.dat.val=1"])
    _assert_one_error(res, "error: --config.dat.val=1: unknown config key 'dat'")


def test_main_finds_packaged_configs_from_another_directory(tmp_path):
    res = _cli(["jaxlm.main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}", "--config.train.stepz=1"],
               cwd=tmp_path)
    _assert_one_error(res, "stepz")  # the config file was found (the override is what failed)


def test_top_level_configs_is_the_packaged_directory():
    """The design card's layout: configs/ at the top of the checkout, the same files the package ships."""
    assert (ROOT / "configs").is_symlink() and (ROOT / "configs").resolve() == (ROOT / "jaxlm" / "configs").resolve()
    assert (ROOT / "configs" / "tiny.py").read_text() == (ROOT / "jaxlm" / "configs" / "tiny.py").read_text()


@pytest.mark.slow  # builds a wheel: about 10 s
def test_a_wheel_ships_the_configs_inside_the_package_only(tmp_path):
    """Built from a copy of the tracked files, the wheel has jaxlm/configs/*.py and no top-level configs
    package, and a --target install of it finds configs/tiny.py from any directory."""
    import zipfile

    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    src = tmp_path / "src"
    for name in filter(None, (t.decode() for t in tracked)):
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_symlink():
            target.symlink_to(os.readlink(ROOT / name))
        else:
            shutil.copy2(ROOT / name, target)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("jaxlm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "jaxlm/configs/tiny.py" in names and "jaxlm/configs/gpt2_small.py" in names
    assert not [n for n in names if n.startswith("configs/")], names
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    probe = ("from jaxlm import config; c = config.load('configs/tiny.py'); "
             "print(c.model.n_layer, config.CONFIGS_DIR)")
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[1] == str(tmp_path / "site" / "jaxlm" / "configs"), res.stdout


def test_main_workdir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    res = _cli(["jaxlm.main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'file'}"])
    _assert_one_error(res, "--workdir")


def test_eval_missing_workdir(tmp_path):
    _assert_one_error(_cli(["jaxlm.eval", f"--workdir={tmp_path / 'none'}"]), "no checkpoints directory")


def test_eval_bad_stride(run_dir):
    _assert_one_error(_cli(["jaxlm.eval", f"--workdir={run_dir}", "--context=16", "--stride=99"]), "--stride")


def test_export_corrupt_checkpoint(run_dir, tmp_path):
    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    newest = max((p for p in (bad / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    biggest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    res = _cli(["jaxlm.export", f"--workdir={bad}", f"--to-hf={tmp_path / 'hf'}"])
    _assert_one_error(res, "cannot be read", str(newest))


def test_export_unknown_step(run_dir, tmp_path):
    res = _cli(["jaxlm.export", f"--workdir={run_dir}", "--step=7", f"--to-hf={tmp_path / 'hf'}"])
    _assert_one_error(res, "no checkpoint for step 7")


def test_generate_bad_tokenizer_file(tmp_path, monkeypatch):
    """A run whose tokenizer file is damaged: its own run and machine cache (the session's is shared)."""
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "cache"))
    run = train_tiny_run(tmp_path)
    Path(json.loads((run / "run.json").read_text())["data"]["tokenizer"]).write_bytes(b"not a sentencepiece model")
    res = _cli(["jaxlm.generate", f"--workdir={run}", "--prompt=abc", "--max_new_tokens=2"])
    _assert_one_error(res, "not a SentencePiece model")


def test_data_bad_source(tmp_path):
    res = _cli(["jaxlm.data", "--config=configs/tiny.py", f"--workdir={tmp_path}",
                f"--config.data.source=files:{tmp_path}/none/*.txt"])
    _assert_one_error(res, "data.source")


def test_data_bench_unknown_flag():
    _assert_one_error(_cli(["jaxlm.data.bench", "--batchez=3"]), "batchez")


def test_bench_bad_flag_value():
    _assert_one_error(_cli(["jaxlm.bench", "--config=configs/tiny.py", "--steps=many"]), "--steps")


def test_ablate_report_of_a_missing_directory(run_dir, tmp_path):
    res = _cli(["jaxlm.ablate", "report", str(run_dir), str(tmp_path / "none"), f"--out={tmp_path / 'rep'}"])
    _assert_one_error(res, "no such directory")


@pytest.mark.parametrize("tool, flag", [("jaxlm.main", ("--workdir", "--config: A config file", "configs/base.py")),
                                        ("jaxlm.eval", "--all_steps"),
                                        ("jaxlm.generate", "--top_p"), ("jaxlm.export", "--to_hf"),
                                        ("jaxlm.bench", "--batch_per_device"), ("jaxlm.ablate", "--layer_scaling"),
                                        ("jaxlm.data", "--workdir"), ("jaxlm.data.bench", "--batches")])
def test_help_lists_the_flags(tool, flag):
    res = _cli([tool, "--help"])
    assert res.returncode == 0, res.stderr[-2000:]
    for f in (flag,) if isinstance(flag, str) else flag:
        assert f in res.stdout + res.stderr, f


def test_main_resume_with_another_config(run_dir):
    res = _cli(["jaxlm.main", "--config=configs/tiny.py", f"--workdir={run_dir}", "--config.log.wandb_mode=disabled"])
    _assert_one_error(res, "the config differs from the one this run was started with")
    assert "cannot schedule new futures" not in res.stderr


@pytest.mark.parametrize("flag, fragment", [("--top_p=2", "--top_p=2.0: must be in (0, 1]"),
                                            ("--temperature=-1", "--temperature=-1.0: must be >= 0")])
def test_generate_refuses_meaningless_sampling_flags(tmp_path, flag, fragment):
    res = _cli(["jaxlm.generate", f"--workdir={tmp_path}", "--prompt=abc", flag])
    _assert_one_error(res, fragment)


@pytest.mark.parametrize("source, fragment", [
    ("def get_config(:\n    pass\n", "bad.py:1: invalid syntax (a Python syntax error in the config file)"),
    ("from jaxlm.configs import tiny\n\n\ndef get_config():\n    return tiny_config\n",
     "bad.py:5: NameError: name 'tiny_config' is not defined"),
    ("from jaxlm.configs import tiny\n\nconfig = tiny.get_config()\n", "bad.py: defines no get_config(); a config file"),
])
def test_a_config_file_that_does_not_run_is_one_error_line_with_file_and_line(tmp_path, source, fragment):
    (tmp_path / "bad.py").write_text(source)
    res = _cli(["jaxlm.main", f"--config={tmp_path / 'bad.py'}", f"--workdir={tmp_path / 'w'}"])
    _assert_one_error(res, fragment, str(tmp_path / "bad.py"))
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_run_json_records_the_jaxlm_version(run_dir):
    import json
    import re

    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert json.loads((run_dir / "run.json").read_text())["versions"]["jaxlm"] == version


def test_load_run_logs_no_warnings(run_dir, caplog):
    import logging

    from jaxlm import saved_run

    with caplog.at_level(logging.INFO):
        step = saved_run.load_run(run_dir)[-1]
    assert step == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_eval_hf_on_the_export_of_a_sentencepiece_run(run_dir, tmp_path):
    import json

    from jaxlm import export

    out = export.export(run_dir, tmp_path / "hf")
    corpus = tmp_path / "text.txt"
    corpus.write_text("end of document 3. " * 40)
    res = _cli(["jaxlm.eval", f"--hf={out}", f"--data=files:{corpus}", "--context=16"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["tokens"] > 0


@pytest.mark.slow
def test_the_wheel_installs_jaxlm_alone_with_its_configs_inside(tmp_path):
    """No top-level `configs` package beside jaxlm in site-packages: the configs ship as jaxlm/configs."""
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("jaxlm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"jaxlm"}, top
    assert "jaxlm/configs/tiny.py" in names and "jaxlm/configs/base.py" in names
