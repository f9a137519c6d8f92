"""Probe a run's checkpoints (or a Hugging Face GPT-2) layer by layer; compare seeds.

    python -m jaxlm.probe --workdir=RUN [--step=N | --all-steps | --steps=0,100,1000] [--tasks=position,bm25]
    python -m jaxlm.probe --hf=DIR --data=SPEC --workdir=W [--tokenizer=hf:DIR|PATH.model] [--val_fraction=0.1]
        [--max_docs=2000] [--tasks=...]
    python -m jaxlm.probe report RUN_A RUN_B ... --out=DIR

Writes ``RUN/probe/<task>.json``, ``.csv`` and ``.png`` (``W/probe/`` with ``--hf``; nothing goes into
the model's directory) (see ``jaxlm.probe.study`` and
``jaxlm.probe.report``; the tasks and labels are defined in ``jaxlm.probe.tasks``, the probes and
codelengths in ``jaxlm.probe.mdl``). Every task's control runs with it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

from jaxlm import cli
from jaxlm.errors import ConfigError
from jaxlm.probe import mdl, report, study
from jaxlm.probe import tasks as tasks_lib


def define_flags():
    flags.DEFINE_string("workdir", None, "The run directory; with --hf, where the results go (WORKDIR/probe).")
    flags.DEFINE_string("hf", None, "A Hugging Face GPT-2 directory to probe instead of a run.")
    flags.DEFINE_string("tokenizer", None, "With --hf: the model's tokenizer, hf:DIR or PATH.model (default: the "
                        "directory's own).")
    flags.DEFINE_string("data", None, "With --hf: a data.source spec (its held-out documents probed, the others "
                        "counted for the corpus statistics).")
    flags.DEFINE_float("val_fraction", study.HF_VAL_FRACTION, "With --hf: the share of --data's documents held out "
                       "and probed.")
    flags.DEFINE_integer("max_docs", study.HF_MAX_DOCS, "With --hf: at most this many documents per split (0 = all).")
    flags.DEFINE_integer("step", None, "One checkpoint step (default: the newest).")
    flags.DEFINE_bool("all_steps", False, "Probe every saved checkpoint.")
    flags.DEFINE_alias("all-steps", "all_steps")
    flags.DEFINE_list("steps", None, "Checkpoint steps, e.g. 0,100,1000.")
    flags.DEFINE_list("tasks", ["position", "token_frequency", "bm25"],
                      f"Tasks, of: {', '.join(tasks_lib.TASKS)} (each task's control comes with it).")
    flags.DEFINE_string("out", None, "Output directory (default: RUN/probe; for report: required).")
    flags.DEFINE_integer("seed", 0, "Examples, controls and probe training.")
    flags.DEFINE_integer("window", 128, "Tokens per window of text (at most the model's n_positions).")
    flags.DEFINE_integer("rows", 256, "Windows of validation text (the last fifth are the test examples).")
    flags.DEFINE_integer("max_steps", mdl.ProbeSettings.max_steps, "Most Adam steps per probe.")


def main(argv):
    F = cli.FLAGS
    if len(argv) > 1:
        if argv[1] != "report":
            raise ConfigError(f"unknown command {argv[1]!r}; the only command is 'report' (python -m jaxlm.probe "
                              "report RUN_A RUN_B ... --out=DIR)")
        cli.require(out=F.out)
        if len(argv) < 3:
            raise ConfigError("report: give the run directories (python -m jaxlm.probe report RUN_A RUN_B --out=DIR)")
        written = report.seeds(argv[2:], F.out)
        for path in written:
            print(path)
        print(f"wrote {len(written)} report(s) to {Path(F.out).resolve()}", file=sys.stderr)
        return
    if not F.workdir and not F.hf:
        raise ConfigError("give --workdir (a run) or --hf (a Hugging Face GPT-2 directory)")
    if sum([F.step is not None, bool(F.steps), F.all_steps]) > 1:
        raise ConfigError("give at most one of --step, --steps, --all-steps")
    names = tasks_lib.check_tasks(F.tasks)
    try:
        steps = [int(s) for s in F.steps] if F.steps else None
    except ValueError:
        raise ConfigError(f"--steps: integers separated by commas, got {','.join(F.steps)!r}") from None
    if F.hf:
        src = study.hf_source(F.hf, tokenizer=F.tokenizer, data=F.data, out=F.out, workdir=F.workdir,
                              val_fraction=F.val_fraction, max_docs=F.max_docs)
    else:
        src = study.run_source(F.workdir, step=F.step, steps=steps, all_steps=F.all_steps, out=F.out)
    settings = tasks_lib.TaskSettings(window=F.window, rows=F.rows, seed=F.seed)
    hp = mdl.ProbeSettings(max_steps=F.max_steps)
    study.probe_source(src, names, settings=settings, hp=hp, log=lambda s: print(s, file=sys.stderr, flush=True))


if __name__ == "__main__":
    cli.run(main, define_flags)
