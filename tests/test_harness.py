"""jaxlm as an lm-evaluation-harness model: the same answers as the harness's own ``hf`` model on the
same weights, on tasks defined by YAML over local files (no network: HF_*_OFFLINE)."""

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from conftest import ROOT, once_per_session, write_word_corpus  # noqa: E402

MC, ROLLING = "jaxlm_test_mc", "jaxlm_test_rolling"


def write_tasks(d, corpus, n_mc: int = 12, n_docs: int = 4):
    """A multiple-choice task and a rolling-loglikelihood task, YAML over jsonl files in `d`."""
    rng = np.random.RandomState(1)
    words = sorted({w for f in sorted(corpus.glob("*.txt")) for w in f.read_text().split()})
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "mc.jsonl", "w") as f:
        for _ in range(n_mc):
            question = " ".join(rng.choice(words, size=rng.randint(3, 30)))
            choices = [" ".join(rng.choice(words, size=rng.randint(1, 4))) for _ in range(4)]
            f.write(json.dumps({"question": question, "choices": choices, "answer": int(rng.randint(4))}) + "\n")
    with open(d / "docs.jsonl", "w") as f:
        for i in range(n_docs):  # longer than the model's 128 positions: several rolling windows
            f.write(json.dumps({"page": " ".join(rng.choice(words, size=40 + 90 * i)) + "."}) + "\n")
    (d / "mc.yaml").write_text(f"""task: {MC}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (d / "rolling.yaml").write_text(f"""task: {ROLLING}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'docs.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{page}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    return d


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 3-step tiny run (small batches) with a GPT-2-style byte-level BPE (n_positions 128), its HF export,
    and task YAMLs."""
    from jaxlm import config, export
    from jaxlm import run as run_lib

    def build(root):
        corpus = write_word_corpus(root / "corpus", 30)
        cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {
            "data.source": f"files:{corpus}/*.txt", "data.tokenizer_kind": "byte_bpe", "data.vocab_size": 400,
            "train.steps": 3, "train.batch_size": 4, "train.seq_len": 32, "train.eval_every": 0,
            "log.wandb_mode": "disabled", "log.stats_every": 0,
            "checkpoint.stages": ((3, 10),)})
        run_lib.run(cfg, root / "run", log=lambda s: None)
        out = export.export(root / "run", root / "hf")
        return root / "run", out, write_tasks(root / "tasks", corpus)

    return once_per_session(tmp_path_factory, "harness-export", build)


@pytest.mark.slow  # imports lm-eval, loads the task's dataset
def test_the_readme_task_yaml_loads_without_a_warning(tmp_path, caplog):
    """The README's task over local files as written (its data file made here): lm-eval loads it and warns
    about nothing (a metric without its aggregation or higher_is_better is one warning each)."""
    import logging

    from lm_eval.tasks import TaskManager

    text = (ROOT / "README.md").read_text().split("**A task over local files**", 1)[1]
    yaml = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert "/data/my_mc.jsonl" in yaml
    data = tmp_path / "my_mc.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "choices": ["a", "b"], "answer": i % 2}) + "\n"
                            for i in range(3)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "my_mc.yaml").write_text(yaml.replace("/data/my_mc.jsonl", str(data)))
    with caplog.at_level(logging.INFO):
        tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False).load(["my_mc"])["tasks"]
    assert list(tasks) == ["my_mc"] and len(list(tasks["my_mc"].test_docs())) == 3
    assert [m["metric"] for m in tasks["my_mc"].config.metric_list] == ["acc", "acc_norm"]
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warned, warned


@functools.cache
def _task_manager(tasks_dir):
    """The test tasks only: indexing lm-eval's thousands of built-in YAMLs is most of an evaluation's cost."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir), include_defaults=False)


def _evaluate(lm, tasks_dir):
    import lm_eval

    r = lm_eval.simple_evaluate(model=lm, tasks=[MC, ROLLING], task_manager=_task_manager(tasks_dir),
                                log_samples=True)
    lls = {t: [resp[0] for s in sorted(r["samples"][t], key=lambda s: s["doc_id"]) for resp in s["resps"]]
           for t in (MC, ROLLING)}  # each request's one response
    return r["results"], lls


@pytest.mark.slow  # trains and exports a run (the fixture), loads torch, 3 harness evaluations
def test_jaxlm_and_the_harness_hf_model_agree(exported):
    """Every request's log-likelihood (fp32) within 1e-4, the same is_greedy, acc/acc_norm/word_perplexity
    to 4 digits, on the export (hf=DIR) and the run directory (workdir=RUN); greedy generation equal."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from jaxlm import harness

    run, hf_dir, tasks = exported
    theirs = get_model("hf").create_from_arg_string(f"pretrained={hf_dir},dtype=float32",
                                                    {"batch_size": 8, "device": "cpu"})
    ref_results, ref = _evaluate(theirs, tasks)
    assert len(ref[MC]) == 12 * 4 and len(ref[ROLLING]) == 4
    for args in (f"hf={hf_dir}", f"workdir={run},step=3"):
        ours = get_model("jaxlm").create_from_arg_string(args, {"batch_size": 4})
        assert isinstance(ours, harness.JaxlmLM)
        results, got = _evaluate(ours, tasks)
        for (ll, greedy), (ref_ll, ref_greedy) in zip(got[MC], ref[MC], strict=True):
            assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy, args
        for ll, ref_ll in zip(got[ROLLING], ref[ROLLING], strict=True):
            assert ll == pytest.approx(ref_ll, abs=1e-4, rel=1e-6), args
        for metric in ("acc,none", "acc_norm,none"):
            assert round(results[MC][metric], 4) == round(ref_results[MC][metric], 4), (args, metric)
        for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
            assert results[ROLLING][metric] == pytest.approx(ref_results[ROLLING][metric], rel=1e-4), (args, metric)

    prompts = ["abc de", "end of document 3.\n", "the", "zq xy wv ut sr qp"]
    requests = [Instance("generate_until", {}, (p, {"until": ["\n\n", "end"], "max_gen_toks": 12, "do_sample": False}),
                         i) for i, p in enumerate(prompts)]
    ours = harness.JaxlmLM(workdir=run)
    assert ours.generate_until(requests) == theirs.generate_until(requests)


@pytest.mark.slow  # importing jaxlm.harness imports lm_eval (and torch): 24 s under load, the fast lane's slowest
def test_length_buckets_bound_the_compiles():
    from jaxlm import harness

    assert harness.length_buckets(1024) == [16, 32, 64, 128, 256, 512, 1024]
    assert harness.length_buckets(128) == [16, 32, 64, 128] and harness.length_buckets(100) == [16, 32, 64, 100]
    assert [harness.bucket(n, 128) for n in (1, 16, 17, 65, 128)] == [16, 16, 32, 128, 128]


@pytest.mark.slow  # two subprocesses (one on 2 simulated devices)
def test_the_command_writes_results_and_says_one_error_line(exported, tmp_path):
    run, hf_dir, tasks = exported
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}

    def harness(*args):
        return subprocess.run([sys.executable, "-m", "jaxlm.harness", *args], capture_output=True, text=True, env=env,
                              timeout=600)

    from lm_eval.api.instance import Instance

    from jaxlm import harness as harness_lib
    from jaxlm.errors import DataError

    out = tmp_path / "results.json"  # on 2 simulated devices, the batch split over them
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    p = harness(f"--workdir={run}", f"--tasks={MC}", f"--include_path={tasks}", "--limit=4", f"--output={out}",
                "--batch_size=3", "--log_samples")
    del env["XLA_FLAGS"]
    assert p.returncode == 0, p.stderr
    results = json.loads(out.read_text())
    assert results["results"][MC]["alias"] == MC and "acc,none" in results["results"][MC]
    assert results["n-samples"][MC]["effective"] == 4 and MC in p.stdout and "acc" in p.stdout
    samples = [json.loads(line) for line in open(str(out) + ".samples.jsonl")]
    args = [tuple(a) for s in samples for a in s["arguments"]]
    got = [tuple(r[0]) for s in samples for r in s["resps"]]
    ref = harness_lib.JaxlmLM(workdir=run).loglikelihood([Instance("loglikelihood", {}, a, 0) for a in args])
    assert len(args) == 16 and [g for _, g in got] == [g for _, g in ref]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in ref], abs=1e-5)  # 2 devices, batch 4 = 1 device, 16

    p = harness(f"--workdir={run}", "--tasks=jaxlm_test_mcq", f"--include_path={tasks}")
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith("error: --tasks: unknown task(s)")
    assert "did you mean jaxlm_test_mc" in p.stderr and "Traceback" not in p.stderr

    broken = tmp_path / "broken"  # (in-process: the same JaxlmError the command prints as its error line)
    broken.mkdir()
    (broken / "broken.yaml").write_text((tasks / "mc.yaml").read_text().replace(MC, "jaxlm_test_broken")
                                        .replace("mc.jsonl", "missing.jsonl"))
    with pytest.raises(DataError, match=r"--tasks=jaxlm_test_broken: a task's dataset cannot be loaded .*missing"):
        harness_lib.evaluate(harness_lib.JaxlmLM(hf=hf_dir), ["jaxlm_test_broken"], manager=_task_manager(broken))
    (run / "cache_moved").mkdir()  # a run whose token cache (and tokenizer) is gone
    meta = json.loads((run / "run.json").read_text())
    spec = harness_lib.tok_lib.spec_path(meta["data"]["tokenizer"])
    spec.rename(run / "cache_moved" / spec.name)
    kept = run / "tokenizer" / spec.name  # the run's own copy, used once the cache's is gone ...
    assert harness_lib.tok_lib.spec_path(harness_lib.saved_run.tokenizer_spec(meta, run)) == kept
    kept.rename(run / "cache_moved" / "kept")  # ... and gone too
    try:
        with pytest.raises(DataError, match="the run's tokenizer .* is gone"):
            harness_lib.JaxlmLM(workdir=run)
    finally:
        (run / "cache_moved" / spec.name).rename(spec)
        (run / "cache_moved" / "kept").rename(kept)


@pytest.mark.slow  # (shares the exported fixture's run)
def test_the_harness_wikitext_metric_is_jaxlm_eval_on_disjoint_windows(exported):
    """The harness's loglikelihood_rolling of a document is jaxlm.eval's token NLL, negated and summed,
    over the stream EOS + document with --context = --stride = n_positions (disjoint windows; a document
    of whole windows, see below); its
    word_perplexity is exp of that over the raw text's words. (jaxlm.eval's own WikiText defaults
    differ: see the README, "lm-evaluation-harness".)"""
    from lm_eval.api.instance import Instance

    from jaxlm import eval as eval_lib
    from jaxlm import harness

    from conftest import SHARED_DATA

    path = SHARED_DATA / "wikitext-2" / "valid.txt"
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared corpora live beside the checkout)")
    run, _, _ = exported
    lm = harness.JaxlmLM(workdir=run)
    n = lm.max_length
    text = path.read_text()[:3000]
    while len(lm.tok_encode(text)) % n:  # whole windows: the harness's last, partial window would see a full
        text = text[:-1]  # window of context, jaxlm.eval's a shorter one
    [ll] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    stream = np.asarray([lm.eot_token_id] + lm.tok_encode(text))
    nll = eval_lib.token_nll(lm.graphdef, lm.params, eval_lib.Text(stream, len(text.encode()), 1), context=n, stride=n)
    assert len(stream) > 3 * n and ll == pytest.approx(-nll.sum(), rel=1e-6)
