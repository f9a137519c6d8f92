"""The TensorBoard sink: the event files hold every scalar of metrics.jsonl at the same steps, read back
with TensorBoard's own reader; a run resumed from an earlier checkpoint shows no step twice; `tensorboard
--logdir` serves a run under its workdir's name."""

import json
import math
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT


def event_dir(directory):
    """The event directory of a run: `directory` itself, or the one under it (WORKDIR/tensorboard/NAME)."""
    from jaxlm import tensorboard_sink

    return tensorboard_sink.event_dir(directory, "")


def read_scalars(directory) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} as TensorBoard shows a run (its reader applies purge_step); a step twice fails."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir(directory)), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: steps {steps} repeat"
        out[tag] = {e.step: e.value for e in events}
    return out


def read_raw(directory, tag: str) -> dict[int, list[float]]:
    """Every value written for `tag`, by step, purged or not (the events as written: simple_value)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    out: dict[int, list[float]] = {}
    for f in sorted(event_dir(directory).glob("events.out.tfevents.*")):
        for e in LegacyEventFileLoader(str(f)).Load():
            out.setdefault(e.step, []).extend(v.simple_value for v in e.summary.value if v.tag == tag)
    return {s: v for s, v in out.items() if v}


def raw_steps(directory, tag: str) -> list[int]:
    """Every step written for `tag` in every event file, purged or not."""
    return [s for s, values in read_raw(directory, tag).items() for _ in values]


def expected_scalars(records) -> dict[str, dict[int, float]]:
    """The scalars of metrics.jsonl records as the sink maps them (the later record wins, as in TensorBoard)."""
    from jaxlm import telemetry

    out: dict[str, dict[int, float]] = {}
    for r in records:
        s = r[telemetry.STEP]
        for k, v in r.items():
            if k in (telemetry.STEP, "time") or v is None:
                continue
            if k in telemetry.PER_STEP_METRICS:
                for i, x in enumerate(v):
                    out.setdefault(k, {})[s - len(v) + 1 + i] = float(x)
            elif isinstance(v, list):
                for i, x in enumerate(v):
                    out.setdefault(f"{k}/{i}", {})[s] = float(x)
            else:
                out.setdefault(k, {})[s] = float(v)
    return out


def assert_same(tb, want):
    assert sorted(tb) == sorted(want)
    for tag, steps in want.items():
        assert sorted(tb[tag]) == sorted(steps), tag
        for s, v in steps.items():
            got = tb[tag][s]
            assert (math.isnan(got) and math.isnan(v)) or got == pytest.approx(v, rel=1e-6, abs=1e-30), (tag, s)


def test_a_resumed_sink_purges_the_steps_it_writes_again(tmp_path, caplog, capsys):
    """Records at steps 2, 4, 6, then a resume from step 2 writing 4, 6, 8 with other values: TensorBoard
    shows each step once, the resumed values after step 2; the old file still holds the purged events.
    The infinite gradient norm is written as such, counted in one line, not warned about."""
    from jaxlm import config, telemetry

    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {"log.wandb_mode": "disabled"})
    meta = {"config": config.to_dict(cfg)}

    def record(step, run):  # logged every 2 steps
        return {telemetry.LOSS: step + run, telemetry.STEP_LOSSES: [step + run - 0.5, step + run],
                telemetry.RESID_RMS: [1.0 * run, 2.0], telemetry.GRAD_NORM: float("inf") if step + run == 6 else 1.0}

    tele = telemetry.Telemetry(tmp_path, cfg, total_steps=8, start_step=0, run_metadata=meta, is_main=True)
    for step in (2, 4, 6):
        tele.log(step, record(step, 0))
    tele.close()
    tele = telemetry.Telemetry(tmp_path, cfg, total_steps=8, start_step=2, run_metadata=meta, is_main=True)
    for step in (4, 6, 8):
        tele.log(step, record(step, 10))
    tele.close()
    assert not [r for r in caplog.records if r.levelno >= 30], caplog.records  # (reading below warns of the purge)

    tb = read_scalars(tmp_path / "tensorboard")
    records, _ = telemetry.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert_same(tb, expected_scalars(records))
    assert tb[telemetry.LOSS] == {2: 2, 4: 14, 6: 16, 8: 18}
    assert tb[telemetry.STEP_LOSSES] == {1: 1.5, 2: 2, 3: 13.5, 4: 14, 5: 15.5, 6: 16, 7: 17.5, 8: 18}  # per step
    assert tb[f"{telemetry.RESID_RMS}/0"] == {2: 0.0, 4: 10.0, 6: 10.0, 8: 10.0} and tb[telemetry.GRAD_NORM][6] == 1.0
    assert sorted(raw_steps(tmp_path / "tensorboard", telemetry.LOSS)) == [2, 4, 4, 6, 6, 8]  # purged, not erased
    assert [p.name for p in (tmp_path / "tensorboard").iterdir()] == [tmp_path.name]  # named after the workdir
    assert math.isinf(read_raw(tmp_path / "tensorboard", telemetry.GRAD_NORM)[6][0])
    assert capsys.readouterr().err.count("tensorboard: 1 non-finite value logged (shown as NaN/Inf)") == 1


def test_a_run_resumes_in_the_event_directory_it_started_in(tmp_path):
    """A run whose events are in WORKDIR/tensorboard itself (before runs had their own directory), and a
    workdir renamed since its run started, resume into the directory that holds the earlier events, so
    that purge_step still hides the steps written again."""
    from jaxlm import config, telemetry, tensorboard_sink

    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {"log.wandb_mode": "disabled"})
    old = tensorboard_sink.TensorBoard(tmp_path / "old" / "tensorboard", 0, ())
    old.log(2, {telemetry.LOSS: 2.0})
    old.log(4, {telemetry.LOSS: 4.0})
    old.close()
    tele = telemetry.Telemetry(tmp_path / "first", cfg, total_steps=4, is_main=True)
    tele.log(2, {telemetry.LOSS: 2.0})
    tele.log(4, {telemetry.LOSS: 4.0})
    tele.close()
    (tmp_path / "first").rename(tmp_path / "renamed")
    for name, where in (("old", tmp_path / "old" / "tensorboard"), ("renamed", tmp_path / "renamed" / "tensorboard" / "first")):
        tele = telemetry.Telemetry(tmp_path / name, cfg, total_steps=4, start_step=2, is_main=True)
        assert tele.tensorboard_dir == where and f"--logdir {where.parent}  (this run, as {where.name};" in tele.dashboard
        tele.log(4, {telemetry.LOSS: 40.0})
        tele.close()
        assert read_scalars(where)[telemetry.LOSS] == {2: 2.0, 4: 40.0}, name
        assert [p for p in where.iterdir() if p.is_dir()] == [], name  # no run directory beside the events


def test_the_config_is_written_as_text_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from jaxlm import config, telemetry

    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {"log.wandb_mode": "disabled"})
    tele = telemetry.Telemetry(tmp_path, cfg, total_steps=1, run_metadata={"config": config.to_dict(cfg)}, is_main=True)
    tele.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard" / tmp_path.name))  # the run's own directory
    acc.Reload()
    text = acc.Tensors("config")[0].tensor_proto.string_val[0].decode()
    assert '"n_layer": 2' in text
    plugins = acc.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in plugins and b"model.n_layer" in plugins["_hparams_/session_start_info"]


def test_the_sink_can_be_turned_off(tmp_path):
    from jaxlm import config, telemetry

    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {"log.wandb_mode": "disabled", "log.tensorboard": False})
    tele = telemetry.Telemetry(tmp_path, cfg, total_steps=1, is_main=True)
    tele.log(1, {telemetry.LOSS: 1.0})
    tele.close()
    assert (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step tiny run with evaluation, layer stats and a profile of steps 2-3: (its config, its
    directory, the lines it said)."""
    from jaxlm import config
    from jaxlm import run as run_lib

    from conftest import write_word_corpus

    root = tmp_path_factory.mktemp("tb")
    corpus = write_word_corpus(root / "corpus", 30)
    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {
        "data.source": f"files:{corpus}/*.txt", "data.vocab_size": 300, "data.val_fraction": 0.2, "train.steps": 4,
        "train.batch_size": 4, "train.seq_len": 32,  # the sink's logic, not the model: small steps
        "train.eval_every": 2, "train.eval_batches": 1, "log.every": 1, "log.stats_every": 2,
        "log.wandb_mode": "disabled", "checkpoint.stages": ((2, 10),), "log.profile_start": 1, "log.profile_steps": 2})
    said = []
    run_lib.run(cfg, root / "run", log=said.append)
    return cfg, root / "run", said


@pytest.mark.slow  # trains 4 steps (the fixture), then 2 again
def test_a_training_run_logs_every_jsonl_scalar_and_resumes_without_duplicates(trained):
    """... and log.profile_steps puts a profiler trace where TensorBoard's profile plugin (XProf) finds it."""
    from jaxlm import run as run_lib
    from jaxlm import telemetry

    cfg, run, _ = trained
    assert list((run / "tensorboard" / "run" / "plugins" / "profile").glob("*/*.xplane.pb"))  # steps 2-3: the run's
    records, _ = telemetry.read_metrics(run / "metrics.jsonl")
    tb = read_scalars(run / "tensorboard")
    assert {telemetry.LOSS, telemetry.EVAL_LOSS, f"{telemetry.RESID_RMS}/1", telemetry.COMPILE_TIME} <= set(tb)
    assert_same(tb, expected_scalars(records))

    shutil.rmtree(run / "checkpoints" / "4")  # resume from the earlier checkpoint: steps 3 and 4 again
    (run / "done.json").unlink()
    run_lib.run(cfg, run, log=lambda s: None)
    records, _ = telemetry.read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if telemetry.LOSS in r] == [1, 2, 3, 4]
    assert_same(read_scalars(run / "tensorboard"), expected_scalars(records))
    assert sorted(raw_steps(run / "tensorboard", telemetry.LOSS)) == [1, 2, 3, 3, 4, 4]
    assert [p.name for p in (run / "tensorboard").iterdir()] == ["run"]  # the resumed run wrote where it started


def _tensorboard_command() -> str:
    """The `tensorboard` program that pip installs with jaxlm (beside this Python, else on PATH)."""
    exe = Path(sys.executable).parent / "tensorboard"
    found = str(exe) if exe.exists() else shutil.which("tensorboard")
    assert found, "no tensorboard command: it is a dependency of jaxlm (pyproject.toml)"
    return found


def _served_scalars(logdirs: list[str], run_names: list[str], tag: str, n_steps: int, log_dir) -> list[dict]:
    """Starts `tensorboard --logdir D` for each of `logdirs` on a free port; waits until the run of that name
    serves `n_steps` values of `tag` through the scalars HTTP API; {step: value} per logdir. Stops them."""
    procs = []
    try:
        for i, d in enumerate(logdirs):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            out = open(log_dir / f"tensorboard{i}.log", "w")
            procs.append((port, subprocess.Popen([_tensorboard_command(), "--logdir", d, "--host", "127.0.0.1",
                                                  "--port", str(port)], stdout=out, stderr=subprocess.STDOUT), out))
        got = [None] * len(logdirs)
        deadline = time.monotonic() + 120
        while None in got and time.monotonic() < deadline:
            for i, ((port, proc, _), name) in enumerate(zip(procs, run_names)):
                assert proc.poll() is None, (log_dir / f"tensorboard{i}.log").read_text()[-2000:]
                try:
                    tags = _get(port, "/data/plugin/scalars/tags")
                    if tag in tags.get(name, {}):
                        q = urllib.parse.urlencode({"run": name, "tag": tag})
                        values = {step: v for _, step, v in _get(port, f"/data/plugin/scalars/scalars?{q}")}
                        got[i] = values if len(values) == n_steps else None
                except OSError:  # not listening yet
                    pass
            time.sleep(0.5)
        assert None not in got, [(log_dir / f"tensorboard{i}.log").read_text()[-1000:] for i in range(len(logdirs))]
        return got
    finally:
        for _, proc, out in procs:
            proc.terminate()
            proc.wait(timeout=30)
            out.close()


def _get(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.slow  # starts two TensorBoard servers (and the fixture's run)
def test_tensorboard_serves_the_run_by_its_workdir_name(trained, tmp_path):
    """The startup line's command shows the run as its workdir's name; `tensorboard --logdir runs/` as
    NAME/tensorboard/NAME; both serve the loss of metrics.jsonl at its steps."""
    from jaxlm import telemetry

    _, run, said = trained
    [line] = [s for s in said if s.startswith("dashboard: tensorboard --logdir ")]
    logdir = line.split()[3]
    assert logdir == str(run / "tensorboard") and f"every run beside it: tensorboard --logdir {run.parent})" in line
    records, _ = telemetry.read_metrics(run / "metrics.jsonl")
    want = {r["step"]: r[telemetry.LOSS] for r in records if telemetry.LOSS in r}
    alone, beside = _served_scalars([logdir, str(run.parent)], [run.name, f"{run.name}/tensorboard/{run.name}"],
                                    telemetry.LOSS, len(want), tmp_path)
    for served in (alone, beside):
        assert sorted(served) == sorted(want)
        assert all(served[s] == pytest.approx(v, rel=1e-6) for s, v in want.items()), (served, want)


@pytest.mark.slow  # a profiler trace and XProf's C++ converters: several seconds
def test_a_profile_is_read_through_xprof_as_through_the_trace_json(tmp_path):
    """profiling.summarize reads the xplane.pb with XProf's converter; on a real CPU trace it finds the same
    ops, times and model parts as from the Chrome JSON that jax.profiler writes beside it."""
    import jax
    import jax.numpy as jnp

    from jaxlm import profiling

    def f(x, w):
        with jax.named_scope("mlp"):
            y = jnp.tanh(x @ w)
        with jax.named_scope("attn"):
            return jnp.sum(y @ w.T)

    g = jax.jit(jax.grad(f, argnums=1))
    x = w = jnp.ones((32, 32))
    compiled = g.lower(x, w).compile()
    compiled(x, w).block_until_ready()
    with jax.profiler.trace(str(tmp_path / "tb")):
        for _ in range(2):
            compiled(x, w).block_until_ready()
    [chrome] = (tmp_path / "tb").rglob("*.trace.json.gz")
    (tmp_path / "json").mkdir()
    shutil.copy(chrome, tmp_path / "json" / chrome.name)
    ours = profiling.summarize(tmp_path / "tb", compiled.as_text(), steps=2)  # the xplane, through XProf
    ref = profiling.summarize(tmp_path / "json", compiled.as_text(), steps=2)
    assert ours["ops"] and {o["op"]: o["ms"] for o in ours["ops"]} == pytest.approx({o["op"]: o["ms"] for o in ref["ops"]})
    assert ours["parts"] == pytest.approx(ref["parts"]) and "mlp fwd" in ours["parts"]


def test_wandb_records_wait_in_order_for_a_slow_start_and_never_block_the_loop(tmp_path, monkeypatch):
    """W&B starts on a thread (seconds: its import and service). A record logged before it has started is
    kept, not waited for; at the end every record reaches the run once, in step order; an error in the
    start is raised at the end."""
    import threading

    from jaxlm import wandb_sink

    started, sent = threading.Event(), []

    class Run:
        def log(self, flat, step):
            sent.append((step, flat))

        def finish(self):
            sent.append("finished")

    def slow_start(*args):
        assert started.wait(30)
        return Run()

    monkeypatch.setattr(wandb_sink, "_start", slow_start)
    sink = wandb_sink.WandB(tmp_path, None, {})
    t0 = time.monotonic()
    for step in (1, 2, 3):
        sink.log(step, {"train/loss": 4.0 - step, "eval/per_layer": [0.5, 0.25], "note": "text"})
    assert time.monotonic() - t0 < 5 and sent == []  # nothing waited for the start
    started.set()
    sink.finish()
    assert sent == [(s, {"train/loss": 4.0 - s, "eval/per_layer/0": 0.5, "eval/per_layer/1": 0.25}) for s in (1, 2, 3)
                    ] + ["finished"]

    started.clear()

    def failing_start(*args):
        assert started.wait(30)
        raise RuntimeError("wandb: network unreachable")

    monkeypatch.setattr(wandb_sink, "_start", failing_start)
    sink = wandb_sink.WandB(tmp_path, None, {})
    sink.log(1, {"train/loss": 1.0})
    started.set()
    with pytest.raises(RuntimeError, match="network unreachable"):
        sink.finish()
