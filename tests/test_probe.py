"""jaxlm.probe: MDL probes recover what is linearly there and nothing else, the online codelength is the
sum it should be, the ranking labels are BM25's, everything is deterministic, bad inputs fail clearly."""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from rank_bm25 import BM25Okapi

from jaxlm import model, precision
from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.probe import mdl, report, study
from jaxlm.probe import tasks as tasks_lib

from conftest import ROOT, train_tiny_run

FAST = mdl.ProbeSettings(max_steps=300)


def _synthetic(seed=0, n=2000, m=500, f=16, k=4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, n + m, f))  # layer 0: the labels' features; layer 1: unrelated noise
    y_linear = np.argmax(x[0] @ rng.normal(size=(f, k)), -1)
    y = np.stack([y_linear, rng.integers(0, k, n + m)])  # a linear task; labels unrelated to any feature
    return x[:, :n], y[:, :n], x[:, n:], y[:, n:]


@pytest.mark.slow  # over 4 s: out of the fast lane (runs in CI)
def test_linear_labels_compress_and_random_ones_do_not():
    x, y, xt, yt = _synthetic()
    r = mdl.probe(x, y, [4, 4], xt, yt, hp=FAST)
    # layer 0 on the linear labels: far shorter than the uniform code, nearly always right
    assert r["compression"][0, 0] > 3 and r["accuracy"][0, 0] > 0.9
    # random labels (any layer) and the linear labels from unrelated features: no compression
    # (band: the probes start uniform and keep the best held-out loss, so they cost at most a little)
    for layer, c in ((0, 1), (1, 0), (1, 1)):
        assert 0.9 < r["compression"][layer, c] < 1.05, r["compression"]
        assert r["accuracy"][layer, c] < 0.4


def test_online_codelength_is_the_sum_over_portions():
    ends = (2, 4, 8)
    nll = np.arange(3 * 8, dtype=float).reshape(3, 8) / 10
    # first 2 labels uniform (K=4: 2 bits each); labels 2,3 under probe 0; labels 4..7 under probe 1
    want = 2 * 2 + (nll[0, 2] + nll[0, 3]) + (nll[1, 4] + nll[1, 5] + nll[1, 6] + nll[1, 7])
    assert mdl.online_codelength(nll, ends, 4) == pytest.approx(want)
    assert mdl.portion_ends(1000, 16) == (16, 31, 62, 125, 250, 500, 1000)
    assert mdl.portion_ends(20, 16) == (10, 20)  # too few examples: two portions anyway


@pytest.mark.slow  # over 4 s: out of the fast lane (runs in CI)
def test_untrained_probes_cost_exactly_the_uniform_code():
    """max_steps=0: every probe stays at zero weights, predicting 1/K, so online = N log2 K exactly."""
    x, y, xt, yt = _synthetic(n=300, m=50)
    y, yt = np.stack([y[0], y[1] % 3]), np.stack([yt[0], yt[1] % 3])
    r = mdl.probe(x, y, [4, 3], xt, yt, hp=mdl.ProbeSettings(max_steps=0))
    assert r["online_bits"][:, 0] == pytest.approx(300 * 2.0)
    assert r["online_bits"][:, 1] == pytest.approx(300 * math.log2(3))
    np.testing.assert_allclose(r["compression"], 1.0)


@pytest.mark.slow  # over 4 s: out of the fast lane (runs in CI)
def test_probes_are_deterministic():
    x, y, xt, yt = _synthetic(n=500, m=100)
    a = mdl.probe(x, y, [4, 4], xt, yt, seed=3, hp=FAST)
    b = mdl.probe(x, y, [4, 4], xt, yt, seed=3, hp=FAST)
    for k in ("online_bits", "accuracy"):
        np.testing.assert_array_equal(a[k], b[k])


# --- labels -----------------------------------------------------------------------------------------

EOS = 1


def _stream(seed=0, n=3000, vocab=40):
    rng = np.random.default_rng(seed)
    s = rng.zipf(1.5, size=n) % (vocab - 2) + 2
    s[rng.random(n) < 0.02] = EOS
    return s.astype(np.int32)


def test_corpus_stats_and_bm25_match_rank_bm25():
    vocab, window = 40, 16
    s = _stream()
    stats = tasks_lib.corpus_stats(s, vocab, EOS, window)
    # passages, independently: split at EOS (kept with its passage), then into chunks of `window`
    passages, cur = [], []
    for t in s.tolist():
        cur.append(t)
        if len(cur) == window or t == EOS:
            passages.append(cur)
            cur = []
    passages += [cur] if cur else []
    assert stats.n_passages == len(passages)
    assert stats.avgdl == pytest.approx(np.mean([len(p) for p in passages]))
    df = {t: sum(t in p for p in passages) for t in range(vocab)}
    assert stats.df.tolist() == [df[t] for t in range(vocab)]
    bm = BM25Okapi([[str(t) for t in p] for p in passages], k1=1.2, b=0.75)
    # rank_bm25's Okapi idf can go negative (and is then floored); ours is Lucene's ln(1 + ...): give it ours
    bm.idf = {str(t): math.log(1 + (len(passages) - df[t] + 0.5) / (df[t] + 0.5)) for t in range(vocab)}
    rng = np.random.default_rng(1)
    for _ in range(5):
        q = rng.choice(np.arange(2, vocab), 3, replace=False)
        want = bm.get_scores([str(t) for t in q])
        for i in rng.choice(len(passages), 10, replace=False):
            ids, cnt = np.unique(passages[i], return_counts=True)
            tf, idf, score = tasks_lib.bm25_values(q, dict(zip(ids.tolist(), cnt.tolist())), len(passages[i]), stats)
            assert score == pytest.approx(want[i])
            assert tf == sum(passages[i].count(t) for t in q)
            assert idf == pytest.approx(sum(bm.idf[str(t)] for t in q))


def test_made_labels_equal_an_independent_computation():
    vocab, window = 40, 16
    stats = tasks_lib.corpus_stats(_stream(0), vocab, EOS, window)
    settings = tasks_lib.TaskSettings(window=window, rows=20, tokens_per_row=5, pairs_per_row=3)
    names = ["position", "token_frequency", "repeat", "prev_token", "bm25", "tf", "idf"]
    data = tasks_lib.make(_stream(7, n=400), stats, names, settings)
    w = data.windows
    for j, (r, d) in enumerate(zip(data.pair_row, data.pair_len)):
        doc = w[r, :d].tolist()
        q = data.queries[j].tolist()
        assert len(set(q)) == len(q)
        idf = [math.log(1 + (stats.n_passages - stats.df[t] + 0.5) / (stats.df[t] + 0.5)) for t in q]
        tf = [doc.count(t) for t in q]
        bm25 = sum(i * f * 2.2 / (f + 1.2 * (0.25 + 0.75 * d / stats.avgdl)) for i, f in zip(idf, tf))
        assert data.values["tf"][j] == sum(tf)
        assert data.values["idf"][j] == pytest.approx(sum(idf))
        assert data.values["bm25"][j] == pytest.approx(bm25)
    for name in ("bm25", "tf", "idf"):  # quantile classes: ordered like the values
        v, y = data.values[name], data.labels[name]
        assert all(v[y == c].max() < v[y == c + 1].min() for c in range(3) if (y == c).any() and (y == c + 1).any())
    for j, (r, p) in enumerate(zip(data.tok_row, data.tok_pos)):
        assert data.labels["position"][j] == (0 if p == 0 else 1 + int(math.log2(p)))
        earlier = [i for i in range(p) if w[r, i] == w[r, p]]
        want = 0 if not earlier else min(1 + int(math.log2(p - earlier[-1])), 7)
        assert data.labels["repeat"][j] == want
    # control labels are a function of the token type, with the task's classes
    for name in ("position", "repeat"):
        ctrl = data.labels[name + "_control"]
        types = w[data.tok_row, data.tok_pos]
        assert all(len(set(ctrl[types == t])) == 1 for t in set(types.tolist()))
        assert ctrl.max() < data.classes[name]


def test_text_labels():
    texts = ["", "", " foo", "Bar", "(", "x", ")", "_y", " Zed", "z"]
    got = tasks_lib.text_labels(np.array([2, 3, 4, 5, 6, 8, 9, 7]), texts)
    # " foo" starts a word; "Bar" continues "foo"; "(" has no word char; "x" starts one inside "(";
    # ")" none; " Zed" starts a capitalised word that "z" continues; "_y" continues it too
    assert got["word_start"].tolist() == [1, 0, 0, 1, 0, 1, 0, 0]
    assert got["capitalised_span"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert got["bracket_depth"].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]


def test_make_is_deterministic():
    stats = tasks_lib.corpus_stats(_stream(0), 40, EOS, 16)
    settings = tasks_lib.TaskSettings(window=16, rows=20, tokens_per_row=5, pairs_per_row=3, seed=5)
    a = tasks_lib.make(_stream(7, n=400), stats, ["position", "bm25"], settings).arrays()
    b = tasks_lib.make(_stream(7, n=400), stats, ["position", "bm25"], settings).arrays()
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


# --- representations ----------------------------------------------------------------------------

@pytest.mark.slow  # over 4 s: out of the fast lane (runs in CI)
def test_residuals_are_the_embedding_and_each_block_output():
    cfg = model.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, vocab_multiple=1,
                           attention_impl="reference")
    graphdef, params = model.create(cfg, precision.policy(), seed=1)
    tokens = jnp.arange(12)[None] % 50
    logits, res = jax.jit(lambda p, t: model.apply(graphdef, params, t, collect_residuals=True))(params, tokens)
    assert res.shape == (3, 1, 12, 16)
    np.testing.assert_allclose(res[0, 0], params["wte"]["embedding"][tokens[0]] + params["wpe"]["embedding"][:12],
                               atol=1e-6)
    m = nnx.merge(graphdef, params)
    x = res[0]
    for i in range(2):
        x, _ = m.h[i](x)
        np.testing.assert_allclose(res[i + 1], x, atol=1e-5)
    np.testing.assert_allclose(logits, model.apply(graphdef, params, tokens), atol=1e-5)


# --- inputs ---------------------------------------------------------------------------------------

def test_bad_inputs_fail_with_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown task 'nope'.*known: position"):
        tasks_lib.check_tasks(["position", "nope"])
    assert tasks_lib.check_tasks(["bm25_control", "bm25", "position"]) == ["bm25", "position"]
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        study.resolve_steps([], None, None, False, "RUN")
    with pytest.raises(CheckpointError, match=r"no checkpoint for step\(s\) \[7\]; available: \[0, 5\]"):
        study.resolve_steps([0, 5], 7, None, False, "RUN")
    with pytest.raises(CheckpointError, match="no checkpoints directory"):
        study.run_source(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        study.run_source(tmp_path)
    assert study.resolve_steps([0, 5, 9], None, [9, 0], False, "RUN") == [0, 9]
    assert study.resolve_steps([0, 5, 9], None, None, True, "RUN") == [0, 5, 9]


# --- end to end (a run, subprocesses) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A two-step tiny run with checkpoints at steps 0, 1 and 2."""
    return train_tiny_run(tmp_path_factory.mktemp("probe"), **{"train.seq_len": 32, "train.batch_size": 4})


def _cli(args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "jaxlm.probe", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_probe_a_run_and_report_its_seeds(run_dir, tmp_path):
    settings = tasks_lib.TaskSettings(window=32, rows=40, tokens_per_row=10, pairs_per_row=4)
    names = ["position", "token_frequency", "word_start", "bm25"]
    src = study.run_source(run_dir, all_steps=True, out=tmp_path / "a")
    assert src.steps == [0, 1, 2]
    rows = study.probe_source(src, names, settings=settings, hp=FAST, log=lambda s: None)
    for n in names:
        assert len(rows[n]) == 3 * 3  # (embedding + 2 blocks) x 3 steps
        for f in ("json", "csv", "png"):
            assert (tmp_path / "a" / f"{n}.{f}").exists()
    # the same again (examples from the cache): the same numbers
    again = study.probe_source(study.run_source(run_dir, all_steps=True, out=tmp_path / "a"), names,
                               settings=settings, hp=FAST, log=lambda s: None)
    assert again == rows
    written = report.seeds([tmp_path / "a", tmp_path / "a"], tmp_path / "seeds")
    assert sorted(p.name for p in written) == sorted(f"{n}.png" for n in names)
    res = _cli(["report", str(tmp_path / "a"), str(tmp_path / "a"), f"--out={tmp_path / 'cli'}"])
    assert res.returncode == 0 and f"wrote 4 report(s) to {tmp_path / 'cli'}" in res.stderr, res.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("args, fragment", [
    (["--tasks=position,nope"], "unknown task 'nope'"),
    (["--step=7"], "no checkpoint for step(s) [7]"),
    (["--steps=0,x"], "--steps: integers"),
    (["frobnicate"], "unknown command 'frobnicate'"),
])
def test_cli_errors(run_dir, args, fragment):
    res = _cli([f"--workdir={run_dir}", *args])
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(lines) == 1 and fragment in lines[0], res.stderr[-2000:]


@pytest.mark.slow
def test_cli_no_checkpoints(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    res = _cli([f"--workdir={tmp_path}"])
    assert res.returncode == 1 and "error:" in res.stderr and "no complete checkpoint" in res.stderr, res.stderr


@pytest.mark.slow
def test_probe_an_hf_export_with_the_default_split_and_nothing_written_beside_the_model(run_dir, tmp_path):
    """--hf on the export of a SentencePiece run: its own tokenizer found, a 1,511-document jsonl probed with
    the default held-out share, results and cache under the workdir. (The stdlib: the README's test.)"""
    import json

    from jaxlm import export

    hf_dir = export.export(run_dir, tmp_path / "hf")
    before = sorted(p.name for p in hf_dir.iterdir())
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 30))}) + "\n" for _ in range(1511)))
    src = study.hf_source(hf_dir, data=f"jsonl:{corpus}", workdir=tmp_path / "w")
    assert src.out == tmp_path / "w" / "probe" and src.tokenizer.kind == "sentencepiece"
    settings = tasks_lib.TaskSettings(window=32, rows=40, tokens_per_row=10, pairs_per_row=4)
    said = []
    rows = study.probe_source(src, ["position"], settings=settings, hp=FAST, log=said.append)
    assert len(rows["position"]) == 3 and (tmp_path / "w" / "probe" / "position.json").is_file()
    # labelled as the HF model, not as "step 0" (which reads as untrained): in the JSON, the table and the log
    written = json.loads((tmp_path / "w" / "probe" / "position.json").read_text())
    assert written["steps"] == ["hf:hf"] and [r["step"] for r in written["rows"]] == ["hf:hf"] * 3
    assert [line.split(",")[1] for line in (tmp_path / "w" / "probe" / "position.csv").read_text().splitlines()[1:]] == \
        ["hf:hf"] * 3
    assert [s for s in said if s.startswith("hf:hf: representations")] and not [s for s in said if s.startswith("step")]
    assert list((tmp_path / "w" / "probe" / "cache").glob("tasks-*.npz"))
    assert sorted(p.name for p in hf_dir.iterdir()) == before  # nothing written into the model's directory
    with pytest.raises(ConfigError, match="--hf needs --workdir"):
        study.hf_source(hf_dir, data="stdlib")


def _readme_block(title: str) -> list[str]:
    """The commands of the first bash block of the README's section `title` (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(f"## {title}"):]
    block = section[section.index("```bash\n") + 8:]
    return [line for line in block[: block.index("```")].splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.slow  # four tools in subprocesses
def test_the_readme_probing_section_runs_as_written(tmp_path):
    """The Probing section's commands, in order, from an empty directory, at tiny size (flags appended):
    its run is not the quickstart's, every checkpoint is probed, and the HF directory is probed too."""
    import json
    import re
    import shlex

    from conftest import write_word_corpus

    quickstart = {m for line in _readme_block("Quickstart") for m in re.findall(r"--workdir=(\S+)", line)}
    corpus = write_word_corpus(tmp_path / "corpus", 30)
    tiny = {"jaxlm.main": [f"--config.data.source=files:{corpus}/*.txt", "--config.data.vocab_size=300",
                           "--config.data.val_fraction=0.2", "--config.train.steps=4", "--config.train.seq_len=32",
                           "--config.train.batch_size=4",
                           "--config.train.eval_every=0",
                           "--config.log.stats_every=0", "--config.log.wandb_mode=disabled"],
            "jaxlm.probe": ["--window=32", "--rows=40", "--max_steps=50"], "jaxlm.export": []}
    commands = _readme_block("Probing")
    assert [c.split()[2] for c in commands] == ["jaxlm.main", "jaxlm.probe", "jaxlm.export", "jaxlm.probe"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", WANDB_MODE="disabled")
    for command in commands:
        args = shlex.split(command.replace("((25, 300),)", "((2, 4),)"))  # its checkpoint stages, to 4 steps
        assert args[:2] == ["python", "-m"] and not quickstart & set(re.findall(r"--workdir=(\S+)", command))
        extra = tiny[args[2]] + (["--max_docs=30"] if "--hf=" in command else [])
        res = subprocess.run([sys.executable, *args[1:], *extra], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600, env=env)
        assert res.returncode == 0, f"{command}\n{res.stderr[-3000:]}"
        if args[2] == "jaxlm.main":
            assert "epochs of the" in res.stdout, res.stdout  # the run says how often it reads its corpus
    run = tmp_path / "runs" / "tiny_probe"
    probed = json.loads((run / "probe" / "token_frequency.json").read_text())
    assert probed["steps"] == [0, 2, 4]  # every checkpoint of the run, none missing
    assert (tmp_path / "runs" / "tiny_probe_hf_probe" / "probe" / "position.json").is_file()
