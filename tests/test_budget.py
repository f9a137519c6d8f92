"""Budgeted training (train.budget): the schedule by budget fraction, no recompilation, the stop at the
budget, resume after kill -9, bit-identical replay, the batch ramp, and clear errors for bad budgets."""

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import budget, config, sharding, telemetry, train, wandb_sink
from jaxlm import run as run_lib
from jaxlm.errors import ConfigError

from conftest import ROOT, write_word_corpus


def _tiny(**over):
    o = {"train.batch_size": 8, "train.seq_len": 32, "model.n_positions": 32, "optim.warmup_steps": 0,
         "log.wandb_mode": "disabled", "log.stats_every": 0, "train.eval_every": 0, "train.budget": "1m"}
    o.update(over)
    return config.load(ROOT / "jaxlm" / "configs" / "tiny.py", o)


def _trainer(cfg):
    return train.Trainer(cfg, sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1]), vocab_size=cfg.data.vocab_size)


def _batches(cfg, trainer):
    rng = np.random.RandomState(0)
    while True:
        b = rng.randint(0, cfg.data.vocab_size, (cfg.train.batch_size, cfg.train.seq_len + 1)).astype(np.int32)
        yield jax.device_put(b, trainer.batch_sharding)


# --- parsing and errors -------------------------------------------------------------------------

def test_budgets_parse_and_bad_ones_are_one_clear_error():
    assert budget.parse("none") is None
    assert budget.parse("15m") == budget.Budget("time", 900.0)
    assert budget.parse("2h") == budget.Budget("time", 7200.0)
    assert budget.parse("90s") == budget.Budget("time", 90.0)
    assert budget.parse("1e18flops") == budget.Budget("flops", 1e18)
    for bad, why in (("-1h", "must be positive"), ("2 parsecs", "not a budget"), ("0s", "must be positive")):
        with pytest.raises(ConfigError, match=why) as e:
            _tiny(**{"train.budget": bad})
        assert "train.budget" in str(e.value) and "\n" not in str(e.value)


def test_budget_only_keys_need_a_budget():
    with pytest.raises(ConfigError, match="optim.schedule='triangle' reads the budget fraction"):
        _tiny(**{"train.budget": "none", "optim.schedule": "triangle"})
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        _tiny(**{"train.batch_ramp": 0.6})


@pytest.mark.slow  # over 4 s: out of the fast lane (runs in CI)
def test_cli_refuses_a_bad_budget_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxlm.main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                          "--config.train.budget=2 parsecs"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode != 0
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("error: --config.train.budget=2 parsecs: not a budget"), out.stderr[-1000:]
    assert not (tmp_path / "w").exists()


# --- the schedule by budget fraction --------------------------------------------------------------

@pytest.mark.parametrize("schedule", budget.BUDGET_SCHEDULES)
@pytest.mark.parametrize("seconds_per_step", [0.013, 0.25, 3.7])
def test_schedule_reaches_its_floor_exactly_at_f_1_whatever_the_step_rate(schedule, seconds_per_step):
    o = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {"train.budget": "1m", "optim.schedule": schedule,
                                                     "optim.final_lr_ratio": 0.1, "optim.warmup_steps": 3}).optim
    clock = itertools.count(0.0, seconds_per_step)  # each step costs seconds_per_step
    meter = budget.Meter(budget.parse("1m"), clock=lambda: next(clock))
    fs, step = [], 0
    while not meter.done:
        fs.append(meter.fraction)
        t = meter.clock()
        meter.charge(meter.clock() - t, 0.0)
        step += 1
    assert abs(step - 60 / seconds_per_step) <= 1  # as many steps as fit, whatever the rate
    assert all(0 <= a < b < 1 for a, b in zip(fs, fs[1:]))  # each step trains with the f reached before it
    end = 1.0 if schedule == "constant" else 0.1
    assert float(budget.lr_factor(o, step, 1.0)) == np.float32(end)  # exactly the floor at f = 1
    lrs = np.asarray(budget.lr_factor(o, np.arange(len(fs)), np.asarray(fs)))  # vectorised over the steps
    assert lrs.max() <= 1.0 and lrs[-1] >= np.float32(end)
    assert lrs[-1] - end <= 4.5 * (1 - fs[-1]) + 1e-6  # the last step is within one step's slope of the floor


def test_triangle_and_wsd_shapes():
    o = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {"train.budget": "1m", "optim.schedule": "triangle",
                                                     "optim.warmup_steps": 0, "optim.budget_peak": 0.25}).optim
    lr = lambda f: float(budget.lr_factor(o, 100, f))  # noqa: E731
    assert lr(0.0) == 0.0 and lr(0.125) == pytest.approx(0.5) and lr(0.25) == pytest.approx(1.0)
    assert lr(0.625) == pytest.approx(0.5) and lr(1.0) == 0.0
    o.schedule, o.budget_decay = "wsd", 0.2
    assert lr(0.0) == lr(0.79) == 1.0 and lr(0.9) == pytest.approx(0.5, abs=1e-6) and lr(1.0) == 0.0


@pytest.mark.slow  # over 4 s: out of the fast lane (runs in CI)
def test_a_new_budget_fraction_does_not_recompile():
    cfg = _tiny(**{"optim.schedule": "triangle", "train.micro_batch_size": 2, "train.batch_ramp": 0.6})
    tr = _trainer(cfg)
    state, batches = tr.init(jnp.asarray(0, jnp.uint32)), _batches(cfg, tr)
    lrs = []
    for f in (0.0, 0.1, 0.33, 0.7, 0.95):  # every f and every number of micro-batches (1 to 4)
        state, m = tr.train_step(state, next(batches), *tr.knobs(f))
        lrs.append(float(m[telemetry.LR]))
    assert tr.train_step._cache_size() == 1
    assert lrs[0] == 0.0 and lrs[3] == pytest.approx(cfg.optim.lr * 0.6, rel=1e-5)
    assert [int(tr.knobs(f)[0]["micro_batches"]) for f in (0.0, 0.1, 0.2, 0.33, 0.6, 0.9)] == [1, 1, 2, 3, 4, 4]


@pytest.mark.slow  # 5-15 s: the fast lane stays short
def test_the_batch_ramp_trains_on_the_first_micro_batches_only():
    """k active micro-batches of a full batch give the loss and update of a step on just those rows."""
    cfg = _tiny(**{"optim.schedule": "constant", "train.micro_batch_size": 2, "train.batch_ramp": 0.5,
                   "optim.eps": 1e-3})
    small = _tiny(**{"optim.schedule": "constant", "train.batch_size": 2, "optim.eps": 1e-3})
    tr, tr_small = _trainer(cfg), _trainer(small)
    batch = np.asarray(next(_batches(cfg, tr)))
    s, m = tr.train_step(tr.init(jnp.asarray(0, jnp.uint32)), jnp.asarray(batch), *tr.knobs(0.0))  # 1 of 4
    s2, m2 = tr_small.train_step(tr_small.init(jnp.asarray(0, jnp.uint32)), jnp.asarray(batch[::4]),
                                 *tr_small.knobs(0.0))
    assert float(m[telemetry.LOSS]) == pytest.approx(float(m2[telemetry.LOSS]), rel=1e-6)
    a, b = jax.tree.leaves(jax.device_get(s.params)), jax.tree.leaves(jax.device_get(s2.params))
    assert max(float(np.max(np.abs(x - y))) for x, y in zip(a, b)) < 1e-6


# --- what ends a budgeted run: the budget, or an explicit step cap ---------------------------------

SHORT_CONFIG = """
from jaxlm.configs import tiny
def get_config():
    c = tiny.get_config()
    c.train.steps = 6  # the file's own step count: the length of its step-based runs
    return c
"""


@pytest.fixture(scope="module")
def short_trainer(tmp_path_factory):
    """A trainer of a config file whose own train.steps (6) is far below what a 10 s budget runs."""
    d = tmp_path_factory.mktemp("short")
    (d / "short.py").write_text(SHORT_CONFIG)
    cfg = config.load(d / "short.py", {"train.batch_size": 8, "train.seq_len": 32, "model.n_positions": 32,
                                       "optim.warmup_steps": 0, "log.wandb_mode": "disabled", "log.stats_every": 0,
                                       "train.eval_every": 0, "log.every": 4, "train.budget": "10s",
                                       "optim.schedule": "linear"})
    return _trainer(cfg)


def _fake_clock_run(tmp_path, tr, max_steps, capsys):
    """train.loop on a fake clock (four readings per step: each step charges 0.5 s), with the
    Telemetry's plain progress lines (stderr is no terminal here). -> (result, meter, records, lines)"""
    ticks = itertools.count(0.0, 0.25)
    meter = budget.Meter(tr.budget, clock=lambda: next(ticks), max_steps=max_steps)
    tele = telemetry.Telemetry(tmp_path, tr.cfg, total_steps=max_steps)
    capsys.readouterr()
    res = train.loop(tr, tr.init(jnp.asarray(0, jnp.uint32)), _batches(tr.cfg, tr), tele, meter=meter)
    tele.close()
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("step ")]
    recs = [r for r in telemetry.read_metrics(tmp_path / "metrics.jsonl")[0] if telemetry.STEP_FRACTIONS in r]
    return res, meter, recs, lines


@pytest.mark.slow  # 5-15 s: the fast lane stays short
def test_a_budget_runs_past_the_config_files_own_steps_to_f_1_the_schedules_floor(short_trainer, tmp_path, capsys):
    cfg = short_trainer.cfg
    assert cfg.train.steps == 6 and cfg.train.max_steps == 0  # the file's steps: no cap
    res, meter, recs, lines = _fake_clock_run(tmp_path / "run", short_trainer, cfg.train.max_steps, capsys)
    assert res.budget_spent and res.step == 20 and meter.spent == 10.0  # the budget, not train.steps, ended it
    assert meter.fraction == 1.0 and recs[-1][telemetry.RUN_FRACTION] == 1.0
    fs = [f for r in recs for f in r[telemetry.STEP_FRACTIONS]]
    assert fs == [np.float32(i / 20) for i in range(20)]  # each step trains with the f reached before it
    lrs = [x for r in recs for x in r[telemetry.STEP_LRS]]
    assert lrs[-1] == pytest.approx(cfg.optim.lr / 20, rel=1e-5)  # one step's worth above the floor (0)
    assert float(budget.lr_factor(cfg.optim, 20, meter.fraction)) == 0.0  # the schedule at the end: its floor
    # the progress line: budget spent and left, and an ETA within 10% of the budget left
    assert lines[0].startswith("step 4  loss ") and "f 0.20 · 8 s left" in lines[0], lines
    for line, r in zip(lines, [r for r in recs if telemetry.RUN_FRACTION in r]):
        eta = float(line.rsplit("eta ", 1)[1].rstrip("s"))
        left = 10.0 - r[telemetry.BUDGET_SPENT]
        assert abs(eta - left) <= 0.1 * left + 0.5, (line, left)  # (+0.5: the line rounds to whole seconds)


@pytest.mark.slow  # 5-15 s: the fast lane stays short
def test_an_explicit_smaller_train_steps_ends_a_budgeted_run_there_at_the_schedules_floor(short_trainer, tmp_path,
                                                                                         capsys):
    cfg = config.with_overrides(short_trainer.cfg, {"train.steps": 8})
    assert cfg.train.max_steps == 8  # an explicit train.steps is the cap
    note = budget.cap_note(budget.parse("10s"), 8, 0, 0.0, 0.5)  # the startup line, at the step cost measured
    assert "train.max_steps=8 ends the run first" in note and "budget f 0.40 (40% of 10.0 s spent)" in note
    res, meter, recs, lines = _fake_clock_run(tmp_path / "run", short_trainer, cfg.train.max_steps, capsys)
    assert res.budget_spent and res.step == 8 and meter.spent == 4.0 and meter.budget_fraction == 0.4
    fs = [f for r in recs for f in r[telemetry.STEP_FRACTIONS]]
    assert fs == [np.float32(i / 8) for i in range(8)]  # f by steps: the nearer limit
    lrs = [x for r in recs for x in r[telemetry.STEP_LRS]]
    assert lrs[-1] == pytest.approx(cfg.optim.lr / 8, rel=1e-5)  # one step's worth above the floor
    assert recs[-1][telemetry.RUN_FRACTION] == 1.0
    eta = float(lines[0].rsplit("eta ", 1)[1].rstrip("s"))  # after 4 of 8 steps at 0.5 s: 2 s left to the cap
    assert lines[0].startswith("step 4  ") and "f 0.50 · 8 s left" in lines[0] and eta == pytest.approx(2.0, abs=0.5)


def test_an_explicit_train_steps_caps_only_a_budgeted_run_and_step_based_runs_resume_either_way():
    tiny = ROOT / "jaxlm" / "configs" / "tiny.py"
    file_steps = config.load(tiny).train.steps
    assert config.load(tiny, {"train.steps": 7}).train.max_steps == 0  # no budget: no cap derived
    assert config.load(tiny, {"train.steps": 7, "train.budget": "1m"}).train.max_steps == 7
    explicit = config.to_dict(config.load(tiny, {"train.steps": file_steps}))
    plain = config.to_dict(config.load(tiny))
    # started with --config.train.steps=N (the file's N), resumed without it, and the other way round
    assert config.config_differences(explicit, plain) == [] and config.config_differences(plain, explicit) == []
    older = config.to_dict(config.load(tiny))
    del older["train"]["max_steps"]  # saved before train.max_steps existed, resumed with an explicit train.steps
    assert config.config_differences(older, explicit) == []
    capped = {**explicit, "train": {**explicit["train"], "max_steps": file_steps}}  # as a step-based run saved it
    assert config.config_differences(capped, plain) == []  # (a cap only a budget reads)
    budgeted = config.to_dict(config.load(tiny, {"train.steps": file_steps, "train.budget": "1m"}))
    unbudgeted_cap = config.to_dict(config.load(tiny, {"train.budget": "1m"}))
    assert config.config_differences(budgeted, unbudgeted_cap) == [f"train.max_steps: {file_steps} -> 0"]


def test_a_budgeted_run_gets_a_wandb_group_by_its_budget_unless_one_is_set():
    assert wandb_sink.grouping(_tiny(**{"train.budget": "90s", "precision.regime": "bf16"})) == ("budget-90s", "bf16")
    assert wandb_sink.grouping(_tiny(**{"log.wandb_group": "study", "log.wandb_job_type": "fp32"})) == \
        ("study", "fp32")  # (jaxlm.ablate's cells set both)
    assert wandb_sink.grouping(_tiny(**{"train.budget": "none"})) == (None, None)  # a step-based run: none


def test_the_eta_under_a_flop_budget_is_by_wall_clock_not_by_dispatch_seconds():
    """A FLOP budget's loop does not wait for steps: each charges ~1 ms of dispatch while the wall clock
    (the fake clock here) moves 1 s per step; after 4 of 10 steps the ETA is the 6 s the run still takes."""
    now = [0.0]
    meter = budget.Meter(budget.parse("100flops"), clock=lambda: now[0])
    assert not meter.waits and meter.eta() is None
    for _ in range(4):
        now[0] += 1.0  # the step's wall time, the dispatch of the next ones overlapping it
        meter.charge(seconds=0.001, flops=10.0)
    assert meter.fraction == pytest.approx(0.4)
    assert meter.eta() == pytest.approx(6.0)  # 0.3 of f in the 3 s since the first step: 6 s for the 0.6 left
    timed = budget.Meter(budget.parse("10s"), clock=lambda: now[0])
    timed.charge(seconds=1.0, flops=0.0)
    timed.charge(seconds=1.0, flops=0.0)
    assert timed.eta() == pytest.approx(8.0)  # a wall-clock budget: exactly the budget left


def test_the_startup_line_says_what_ends_a_budgeted_run():
    b = budget.parse("90s")
    assert "ends when 90.0 s are spent (about 300 steps at 0.3 s/step); no step cap" in budget.cap_note(b, 0, 0, 0.0, 0.3)
    assert "before its step cap train.max_steps=1,000" in budget.cap_note(b, 1000, 0, 0.0, 0.3)
    # resumed at step 100 with 30 s spent: 100 more steps at 0.3 s bring the budget to f 0.67
    assert "budget f 0.67" in budget.cap_note(b, 200, 100, 30.0, 0.3)
    with pytest.raises(ConfigError, match="train.max_steps"):
        _tiny(**{"train.max_steps": -1})


# --- whole runs ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("budgetcorpus"), 30)


def _run_over(corpus, cache, **over):
    o = {"data.source": f"files:{corpus}/*.txt", "data.vocab_size": 300, "data.cache_dir": str(cache),
         "data.val_fraction": 0.2, "train.batch_size": 8, "train.seq_len": 32, "model.n_positions": 32,
         "train.steps": 100_000, "optim.schedule": "triangle", "optim.warmup_steps": 0, "log.every": 5,
         "log.stats_every": 0, "log.wandb_mode": "disabled", "train.eval_every": 50, "train.eval_batches": 2,
         "checkpoint.stages": ((200, 100_000),), "checkpoint.latest_every_minutes": 0.0, "train.budget": "3s"}
    o.update(over)
    return o


def _fractions(workdir):
    recs = telemetry.read_metrics(workdir / "metrics.jsonl")[0]
    return ([f for r in recs for f in r.get(telemetry.STEP_FRACTIONS, [])],
            [x for r in recs for x in r.get(telemetry.STEP_LOSSES, [])], recs)


@pytest.fixture(scope="module")
def budgeted(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("budgetrun")
    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", _run_over(corpus, root / "cache"))
    res = run_lib.run(cfg, root / "run", log=lambda s: None)
    return root, res


@pytest.mark.slow  # over 4 s: out of the fast lane (runs in CI)
def test_a_budgeted_run_stops_at_the_budget_with_a_final_checkpoint_and_eval(budgeted):
    root, res = budgeted
    done = json.loads((root / "run" / "done.json").read_text())
    assert res.budget_spent and done["step"] == res.step and done["budget"]["seconds"] >= 3.0
    from jaxlm import checkpoint
    assert checkpoint.saved_steps(root / "run")[-1] == res.step
    fs, _, recs = _fractions(root / "run")
    assert len(fs) == res.step and fs[0] == 0.0 and fs[-1] < 1.0 and fs == sorted(fs)
    assert recs[-1]["step"] == res.step and telemetry.EVAL_LOSS in recs[-1]
    assert recs[-1][telemetry.BUDGET_SPENT] >= 3.0


@pytest.mark.slow  # 5-15 s: the fast lane stays short
def test_a_replay_is_bit_identical_to_the_logged_losses(budgeted, corpus):
    root, res = budgeted
    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py",
                      _run_over(corpus, root / "cache", **{"train.budget_replay": str(root / "run")}))
    again = run_lib.run(cfg, root / "replay", log=lambda s: None)
    assert again.step == res.step
    fs, losses, _ = _fractions(root / "run")
    fs2, losses2, _ = _fractions(root / "replay")
    assert fs2 == fs and losses2 == losses


@pytest.mark.slow  # 5-15 s: the fast lane stays short
def test_a_budget_shorter_than_the_warmup_is_refused_before_training(corpus, tmp_path):
    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", _run_over(
        corpus, tmp_path / "cache", **{"optim.schedule": "linear", "optim.warmup_steps": 100_000}))
    with pytest.raises(ConfigError, match=r"shorter than the warmup: optim.warmup_steps=100000 at the measured"):
        run_lib.run(cfg, tmp_path / "run", log=lambda s: None)
    assert not [r for r in telemetry.read_metrics(tmp_path / "run" / "metrics.jsonl")[0] if telemetry.LOSS in r]
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.slow  # a real tiny run of 2 s and its saves
def test_a_budget_past_the_files_train_steps_keeps_its_stage_checkpoints(corpus, tmp_path):
    """The checkpoint schedule's horizon is the run's real end: under a budget without a step cap no
    stage save past the file's train.steps (6) is deleted by the next one, and step 6 is no final step."""
    from jaxlm import checkpoint

    (tmp_path / "short.py").write_text(SHORT_CONFIG)
    over = _run_over(corpus, tmp_path / "cache", **{"train.budget": "2s", "checkpoint.stages": ((5, 100_000),),
                                                    "optim.schedule": "linear", "train.eval_every": 0})
    del over["train.steps"]  # the file's 6 steps: no cap
    cfg = config.load(tmp_path / "short.py", over)
    assert cfg.train.steps == 6 and cfg.train.max_steps == 0
    assert run_lib.last_step(cfg, budget.parse("2s"), None) == float("inf")
    res = run_lib.run(cfg, tmp_path / "run", log=lambda s: None)
    assert res.budget_spent and res.step > 10, res.step  # (well past the file's steps on any machine)
    assert checkpoint.saved_steps(tmp_path / "run") == sorted({*range(0, res.step + 1, 5), res.step})


def test_the_ramps_average_step_cost_is_the_harmonic_mean_over_f():
    # 4 micro-batches, full from f = 0.5: 1, 2, 3, 4 of them over f's eighths up to 0.5, then 4
    first, avg = budget.ramp_step_cost(1.0, 4, 0.5)
    assert first == 0.25 and avg == pytest.approx(1 / (0.125 * (4 + 2 + 4 / 3 + 1) + 0.5), rel=1e-3)
    assert budget.ramp_step_cost(1.0, 4, 0.5, f0=0.5) == (1.0, 1.0)  # resumed past the ramp: full batches


@pytest.mark.slow  # two real tiny runs of 10 and ~31 steps
def test_a_real_runs_startup_line_under_an_explicit_cap_and_under_a_batch_ramp(corpus, tmp_path):
    """FLOP budgets make both lines exact: an explicit train.steps=10 stops a 40-step budget at f 0.25;
    under train.batch_ramp the line's step count (the ramp's average step) is the steps the run takes."""
    from jaxlm import data

    over = _run_over(corpus, tmp_path / "cache", **{"optim.schedule": "linear", "train.eval_every": 0})
    del over["train.steps"]
    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", over)
    vocab = data.prepare(cfg, tmp_path / "probe", log=lambda s: None).manifest["vocab_size"]
    full = 8 * 32 * train.Trainer(cfg, sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1]), vocab).flops_per_token
    said = []
    capped = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {**over, "train.budget": f"{40 * full:.17g}flops",
                                                        "train.steps": 10})
    res = run_lib.run(capped, tmp_path / "cap", log=said.append)
    note = next(x for x in said if x.startswith("budget:"))
    assert res.step == 10 and "the step cap train.max_steps=10 ends the run first" in note, note
    assert "it stops at budget f 0.25 (25% of" in note, note
    said.clear()
    ramped = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {**over, "train.budget": f"{20 * full:.17g}flops",
                                                        "train.micro_batch_size": 2, "train.batch_ramp": 0.5})
    res = run_lib.run(ramped, tmp_path / "ramp", log=said.append)
    note = next(x for x in said if x.startswith("budget:"))
    about = int(re.search(r"about ([0-9,]+) steps", note).group(1).replace(",", ""))
    assert abs(about - res.step) <= 2 and res.step > 25, (note, res.step)  # (knobs(0)'s cost: ~80 steps)
    assert "under train.batch_ramp=0.5 a step is taken to cost its micro-batches' share" in note, note


KILL_AT_STEP = str(ROOT / "tests" / "helpers" / "kill_at_step.py")  # at step 45: after the checkpoints at 20, 40


@pytest.mark.slow
def test_kill_9_and_resume_ends_at_the_same_total_budget_with_f_continuing(corpus, tmp_path):
    over = _run_over(corpus, tmp_path / "cache", **{"train.budget": "4s", "checkpoint.async_save": False,
                                                             "checkpoint.stages": ((20, 100_000),)})
    work = tmp_path / "run"
    killed = subprocess.run([sys.executable, KILL_AT_STEP, str(ROOT / "jaxlm" / "configs" / "tiny.py"), repr(over),
                             str(work), "45"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (work / "done.json").exists()
    fs_before, _, _ = _fractions(work)
    assert len(fs_before) == 45
    from jaxlm import checkpoint
    saved = checkpoint.Checkpointer(work, config.load(ROOT / "jaxlm" / "configs" / "tiny.py", over), read_only=True)
    spent_at_40 = saved.manager.restore(40, args=checkpoint.ocp.args.Composite(
        data=checkpoint.ocp.args.JsonRestore()))["data"]["budget"]["seconds"]
    saved.close()
    res = run_lib.run(config.load(ROOT / "jaxlm" / "configs" / "tiny.py", over), work, log=lambda s: None)
    assert res.budget_spent
    done = json.loads((work / "done.json").read_text())
    assert 4.0 <= done["budget"]["seconds"] < 4.0 + 1.0  # the same total budget (plus at most one step)
    fs, _, _ = _fractions(work)
    assert len(fs) == res.step and fs[:40] == fs_before[:40]  # the history up to the checkpoint is kept
    assert fs[40] == np.float32(spent_at_40 / 4.0)  # and f continues from the saved budget
    assert fs == sorted(fs) and fs[-1] < 1.0


# --- studies by time: jaxlm.ablate --budget and the report's time panels ---------------------------

def _fake_run(d, device, seed, evals, budget_="10m"):
    """A run directory as jaxlm.main writes it, with periodic evaluations at (training seconds, val loss)."""
    d.mkdir(parents=True)
    meta = {"environment": {"device_kind": device}, "precision": {"name": "fp32"},
            "config": {"model": {"scale_attn_by_inverse_layer_idx": False}, "optim": {"lr": 1e-3},
                       "train": {"seed": seed, "budget": budget_}}}
    (d / "run.json").write_text(json.dumps(meta))
    recs = [{"step": 100 * (i + 1), telemetry.LOSS: v, telemetry.EVAL_LOSS: v, telemetry.TRAIN_TIME: t}
            for i, (t, v) in enumerate(evals)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "done.json").write_text(json.dumps({"step": 100 * len(evals), "stopped": None, "budget": {"seconds": 600}}))


def test_report_by_time_ranks_within_each_accelerator_only(tmp_path):
    from jaxlm.ablate import report
    cells = tmp_path / "cells"
    for seed, shift in ((21, 0.0), (49, 0.1)):
        _fake_run(cells / f"crammed-s{seed}", "cpu", seed, [(60, 4.0 + shift), (300, 3.0 + shift), (600, 2.5 + shift)])
        _fake_run(cells / f"mistral-s{seed}", "cpu", seed, [(60, 3.8 + shift), (300, 3.2 + shift), (600, 2.9 + shift)])
    _fake_run(cells / "mistral-s81", "NVIDIA H100 80GB HBM3", 81, [(60, 2.0), (600, 1.0)], "20m")
    md = report.build([cells], tmp_path / "report", target_loss=3.1).read_text()
    assert (tmp_path / "report" / "loss_vs_time.png").read_bytes().startswith(b"\x89PNG")
    rows = [line for line in md.splitlines() if line.startswith("| cpu |") or line.startswith("| NVIDIA")]
    at_budget = [r for r in rows if "10m" in r or "20m" in r]
    assert at_budget[0].startswith("| NVIDIA") and "| 1 | 20m |" in at_budget[0]  # ranked alone on its machine
    assert "fp32 crammed | 1 | 10m | 2 | 300 ± 0 | 2.550 ± 0.050" in at_budget[1]
    assert "fp32 mistral | 2 | 10m | 2 | 300 ± 0 | 2.950 ± 0.050" in at_budget[2]
    to_target = [r for r in rows if r not in at_budget]
    assert "fp32 crammed | 2/2 | 5.00 ± 0.00" in "".join(to_target)  # both seeds below 3.1 at 300 s
    assert "fp32 mistral | 2/2 | 10.00 ± 0.00" in "".join(to_target)  # both only at 600 s
    assert "NVIDIA H100 80GB HBM3 | fp32 mistral | 1/1 | 1.00" in "".join(to_target)
    md = report.build([cells], tmp_path / "report2", target_loss=2.55).read_text()
    assert "fp32 crammed | 1/2 | 10.00" in md  # seed 49 never gets there


def _readme_budget_commands() -> list[list[str]]:
    """The commands of the README's budget section, as written (continuation lines joined, comments cut)."""
    import shlex

    text = (ROOT / "README.md").read_text().split("## Budgeted training", 1)[1]
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line.split("  #", 1)[0]) for line in lines if line.strip()]


@pytest.mark.slow
def test_the_readme_budget_examples_do_what_they_say(corpus, tmp_path):
    """Each command as the README writes it, run from a fresh directory, with the budget cut to 2 s and a
    small corpus and model (the same overrides for every command)."""
    cmds = _readme_budget_commands()
    assert [c[2] for c in cmds] == ["jaxlm.main", "jaxlm.main", "jaxlm.main", "jaxlm.ablate"]
    small = {k: v for k, v in _run_over(corpus, tmp_path / "cache").items()
             if k not in ("train.budget", "train.steps", "optim.schedule", "checkpoint.stages")}
    small["optim.warmup_steps"] = 0
    outs = []
    for cmd in cmds:
        cmd = [a.replace("=90s", "=2s") for a in cmd] + [f"--config.{k}={v}" for k, v in small.items()]
        if "configs/crammed.py" in cmd[3]:  # its 10 minutes shortened; its batch ramp over 4 micro-batches of 2
            cmd += ["--config.train.budget=2s", "--config.train.micro_batch_size=2"]
        res = subprocess.run([sys.executable, *cmd[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert res.returncode == 0, (cmd, res.stderr[-3000:])
        outs.append(res)
    runs = tmp_path / "runs"
    # 1. tiny by a budget: the startup line, the progress by the budget, the end at the budget
    assert "budget: the run ends when 2.0 s are spent" in outs[0].stdout and "no step cap" in outs[0].stdout
    assert re.search(r"^step \d+  loss \S+  f 0\.\d\d · \d s left", outs[0].stderr, re.M), outs[0].stderr[-2000:]
    assert re.search(r"done: budget 2\.\d s of 2\.0 s spent at step \d+", outs[0].stderr + outs[0].stdout)
    fs, losses, recs = _fractions(runs / "b")
    assert json.loads((runs / "b" / "done.json").read_text())["budget"]["seconds"] >= 2.0
    assert recs[-1][telemetry.RUN_FRACTION] == 1.0 and len(fs) == recs[-1]["step"]
    # 2. Cramming's recipe to its budget
    assert json.loads((runs / "crammed" / "done.json").read_text())["budget"]["seconds"] >= 2.0
    # 3. the replay: the same steps, the same losses bit for bit
    fs2, losses2, _ = _fractions(runs / "b-replay")
    assert fs2 == fs and losses2 == losses
    # 4. the study by time: every cell the same budget, the report's time sections, where it was written
    for cell in ("fp32-s21", "bf16-s21"):
        done = json.loads((runs / "by-time" / "cells" / cell / "done.json").read_text())
        assert 2.0 <= done["budget"]["seconds"] < 3.0
        assert f"{cell}: budget: the run ends when 2.0 s are spent" in outs[3].stderr
    md = (runs / "by-time" / "report" / "report.md").read_text()
    assert "At equal time" in md and "Time to validation loss 5" in md and "loss_vs_time.png" in md
    assert f"report: wrote {(runs / 'by-time' / 'report' / 'report.md').resolve()}" in outs[3].stdout


@pytest.mark.slow  # two short budgeted runs in this process
@pytest.mark.parametrize("clock", ["wall", "process"])
def test_a_process_clock_budget_does_not_charge_time_the_cpu_spent_elsewhere(clock, corpus, tmp_path, monkeypatch):
    """Every step waits 0.3 s off the CPU (as when other jobs hold the cores): a 2 s wall-clock budget
    ends after a few steps; train.budget_clock=process charges only this process's CPU seconds, so
    the same budget runs to the 15-step cap."""
    init = train.Trainer.__init__

    def slowed(self, *args, **kwargs):
        init(self, *args, **kwargs)
        step = self.train_step

        class Waiting:  # the jitted step, then a wait; `lower` stays the step's own
            lower = staticmethod(step.lower)

            def __call__(self, *a):
                out = jax.block_until_ready(step(*a))
                time.sleep(0.3)
                return out

        self.train_step = Waiting()

    monkeypatch.setattr(train.Trainer, "__init__", slowed)
    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", _run_over(
        corpus, tmp_path / "cache", **{"train.budget": "2s", "train.budget_clock": clock, "train.max_steps": 15,
                                       "train.eval_every": 0}))
    res = run_lib.run(cfg, tmp_path / "run", log=lambda s: None)
    assert (res.step < 10) if clock == "wall" else (res.step == 15), res.step
