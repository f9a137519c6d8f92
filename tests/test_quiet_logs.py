"""The README's main commands print no third-party warning line: the quickstart's training run, and a
budgeted fp16 ablation cell whose values go non-finite, with its report (each a subprocess at tiny size,
its console as a user sees it). jaxlm's own one-line messages (``warning: ...``) are allowed."""

import json
import math
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, write_word_corpus

# what a third-party warning looks like on the console: Python's warnings (UserWarning, ...), logging's
# and absl's (W1207 12:00:00.0 ...) warning lines, a writer's line for every non-finite scalar
THIRD_PARTY = re.compile(r"warn|^W\d{4} |NaN or Inf found", re.I)
OURS = re.compile(r"^(\[\d+/\d+\] )?(\S+: )?warning: ")  # a jaxlm line, maybe a grid cell's


def third_party_warnings(text: str) -> list[str]:
    """The console lines (progress bars' carriage returns split too) that are warnings not of jaxlm's."""
    lines = (line.strip() for line in re.split(r"[\r\n]", text))
    return [line for line in lines if THIRD_PARTY.search(line) and not OURS.match(line)]


def test_the_filter_finds_third_party_warnings_and_lets_ours_through():
    console = ("step 1/4  loss 5.0\rgrid: 50%|#####| 1/2\n"
               "/x/plots.py:144: UserWarning: Attempting to set identical low and high xlims\n"
               "W1207 15:44:43.967977 140188917926784 task.py:734] [Task: my_mc] metric acc is defined\n"
               "NaN or Inf found in input tensor.\n"
               "warning: data: 4 steps x 4 rows = 2 epochs\n  fp16-s21: warning: train.steps is ignored\n")
    assert third_party_warnings(console) == [
        "/x/plots.py:144: UserWarning: Attempting to set identical low and high xlims",
        "W1207 15:44:43.967977 140188917926784 task.py:734] [Task: my_mc] metric acc is defined",
        "NaN or Inf found in input tensor."]


def _readme_command(section: str, tool: str) -> list[str]:
    """The README section's first command that runs `python -m <tool>` (continuation lines joined)."""
    text = (ROOT / "README.md").read_text().split(f"## {section}", 1)[1]
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    for line in block.splitlines():
        line = line.split("  #", 1)[0].split("&& ")[-1]
        if line.startswith(f"python -m {tool} "):
            return shlex.split(line)
    raise AssertionError(f"no python -m {tool} in the README's {section}")


@pytest.mark.slow  # two subprocesses: a 4-step run, a budgeted fp16 cell and its report (~40 s)
def test_the_readmes_commands_print_no_third_party_warning(tmp_path):
    corpus = write_word_corpus(tmp_path / "corpus", 30)
    small = [f"--config.data.source=files:{corpus}/*.txt", "--config.data.vocab_size=300",
             "--config.data.val_fraction=0.2", "--config.train.batch_size=4", "--config.train.seq_len=32",
             "--config.log.wandb_mode=disabled", "--config.optim.warmup_steps=0", "--config.log.every=1"]
    quickstart = _readme_command("Quickstart", "jaxlm.main") + ["--config.train.steps=4", "--config.train.eval_every=2",
                                                                  "--config.log.stats_every=2", *small]
    # the budget section's study by time, as one fp16 cell whose lr overflows at once (every value non-finite
    # from step 2; fp16's loss scaler keeps it running), capped at 6 steps, layer stats at step 5 only
    ablate = _readme_command("Budgeted training", "jaxlm.ablate")
    assert "--budget=90s" in ablate and "--regimes=fp32,bf16" in ablate
    ablate = [{"--budget=90s": "--budget=60s", "--regimes=fp32,bf16": "--regimes=fp16"}.get(a, a) for a in ablate]
    ablate += ["--steps=6", "--config.optim.lr=1e30", "--config.log.stats_every=5", *small]
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # the console as a user has it
    for cmd in (quickstart, ablate):
        res = subprocess.run([sys.executable, *cmd[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                             env={**env, "JAX_PLATFORMS": "cpu"})
        assert res.returncode == 0, (cmd, res.stderr[-3000:])
        assert not third_party_warnings(res.stdout + res.stderr), (cmd, third_party_warnings(res.stdout + res.stderr))
    cell = tmp_path / "runs" / "by-time" / "cells" / "fp16-s21"
    losses = [r["train/loss"] for r in map(json.loads, (cell / "metrics.jsonl").read_text().splitlines())
              if "train/loss" in r]
    assert len(losses) == 6 and not math.isfinite(float(losses[-1]))  # the values went non-finite ...
    assert re.search(r"tensorboard: \d+ non-finite values logged", res.stderr)  # ... counted in one line
    assert (tmp_path / "runs" / "by-time" / "report" / "resid_rms_heatmap.png").is_file()
