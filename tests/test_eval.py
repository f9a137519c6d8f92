"""Evaluation: sliding windows against an independent transformers computation, WikiText's
detokenizer, LAMBADA's last-word accuracy and final-word perplexity."""

import json
import math

import numpy as np
import pytest

from jaxlm import eval as eval_lib
from jaxlm import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A random tiny GPT-2 saved in Hugging Face's format, loaded by transformers and by jaxlm."""
    d = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=40, n_embd=32, n_layer=2, n_head=4,
                                  initializer_range=0.2)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    ref.save_pretrained(d)
    _, _, graphdef, params = hf.load_pretrained(d, regime="fp32")
    return ref, graphdef, params


def _reference_nll(ref, tokens, context, stride):
    """Per-token NLL with plain transformers forward passes: windows start every `stride` tokens and read
    up to `context` tokens; each target is scored by the first window that predicts it."""
    n, nll, scored, start = len(tokens), {}, 0, 0
    while scored < n - 1:
        end = min(start + context, n - 1)
        x = torch.tensor(tokens[start:end + 1])[None]
        with torch.no_grad():
            logp = torch.log_softmax(ref(x[:, :-1]).logits.double(), -1)[0]
        for t in range(scored + 1, end + 1):
            nll[t] = -float(logp[t - start - 1, tokens[t]])
        scored, start = end, start + stride
    assert sorted(nll) == list(range(1, n))
    return np.array([nll[t] for t in range(1, n)])


@pytest.mark.parametrize("context, stride", [(16, 16), (16, 5), (39, 13), (20, 1)])
def test_sliding_window_perplexity_equals_transformers(tiny_hf, context, stride):
    ref, graphdef, params = tiny_hf
    tokens = np.random.RandomState(1).randint(0, 101, size=123)
    text = eval_lib.Text(tokens, n_bytes=500, n_documents=1)
    got = eval_lib.evaluate(graphdef, params, text, context=context, stride=stride)
    want = _reference_nll(ref, list(tokens), context, stride)
    assert got["tokens"] == len(tokens) - 1
    assert got["loss"] == pytest.approx(want.mean(), rel=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(want.mean()), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(want.sum() / math.log(2) / 500, rel=1e-4)


def test_windows_score_every_token_once_with_at_least_context_minus_stride():
    for n, c, s in [(100, 10, 3), (11, 10, 10), (2, 5, 5), (1000, 1023, 512), (50, 7, 7)]:
        seen = []
        for start, first, end in eval_lib.windows(n, c, s):
            assert end - start <= c and first > start
            seen.extend(range(first, end + 1))
            assert all(t - start >= min(c - s, t) for t in range(first, end + 1))
        assert seen == list(range(1, n))


@pytest.mark.parametrize("raw, text", [
    ("the 1 @,@ 000 @-@ year @-@ old", "the 1,000-year-old"),
    ("pi is 3 @.@ 14 .", "pi is 3.14 ."),
    ("Hello , world . Yes ! No ? a : b ; c", "Hello, world. Yes! No? a: b; c"),
    (" = Valkyria Chronicles = \n", " = Valkyria Chronicles =\n"),
    (" = = Gameplay = = \n \n The game", " == Gameplay ==\n\nThe game"),
    (" = = = Plot = = = \n", " === Plot ===\n"),
    ("he said ( in 2011 ) that", "he said (in 2011) that"),
    ('the " Nameless " unit', 'the "Nameless" unit'),
    ("the team 's players", "the team's players"),
    ("the players ' union", "the players' union"),
    ("at 30 \u00b0 C", "at 30\u00b0C"),
    ("line one \n line two", "line one\nline two"),
])
def test_wikitext_detokenizer(raw, text):
    assert eval_lib.wikitext_detokenize(raw) == text


class _WordTokenizer:
    """A deterministic test tokenizer: every space-delimited piece (with its leading space) is one id,
    and a long word is two ids (so continuations of 1 and 2 tokens both occur)."""

    def __init__(self):
        self.vocab = {}
        self.eos_id = 0

    def _id(self, piece):
        return self.vocab.setdefault(piece, 1 + (sum(map(ord, piece)) * 7919) % 100)

    def encode(self, texts):
        out = []
        for text in texts:
            ids = []
            for i, word in enumerate(text.split(" ")):
                piece = word if i == 0 else " " + word
                ids += [self._id(piece[:4]), self._id(piece[4:])] if len(piece) > 6 else [self._id(piece)]
            out.append(ids)
        return out


def test_lambada_accuracy_and_final_word_perplexity_equal_transformers(tiny_hf, tmp_path):
    ref, graphdef, params = tiny_hf
    passages = ["the cat sat on the mat and the dog", "a b c d e f g h i j kangaroos",
                "one two three four five six", "x y z x y z x y z x"]
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    tok = _WordTokenizer()
    examples = eval_lib.lambada_examples(str(path))
    assert examples[1] == ("a b c d e f g h i j", " kangaroos")
    got = eval_lib.lambada(graphdef, params, tok, examples, n_positions=40)
    lls, hits = [], []
    for ctx, word in examples:  # independently, with transformers
        c, w = tok.encode([ctx])[0], tok.encode([ctx + word])[0]
        cont = w[len(c):]
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor(w)[None, :-1]).logits.double(), -1)[0, -len(cont):]
        lls.append(float(sum(logp[i, t] for i, t in enumerate(cont))))
        hits.append(all(int(logp[i].argmax()) == t for i, t in enumerate(cont)))
    assert got["documents"] == 4
    assert got["accuracy"] == pytest.approx(np.mean(hits))
    assert got["perplexity"] == pytest.approx(math.exp(-np.mean(lls)), rel=1e-4)


def test_lambada_bad_lines_are_named(tmp_path):
    from jaxlm.errors import DataError

    path = tmp_path / "l.jsonl"
    path.write_text('{"text": "fine passage here"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"l.jsonl:2: expected a JSON object"):
        eval_lib.lambada_examples(str(path))


def test_wikitext_file_detokenizes_cleanly():
    from conftest import SHARED_DATA

    path = SHARED_DATA / "wikitext-2" / "valid.txt"
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared corpora live beside the checkout)")
    raw = path.read_text()
    text = eval_lib.documents(f"wikitext:{path}", None)[0]
    for token in (" @-@ ", " @,@ ", " @.@ ", " , ", " . ", " 's", "= = "):
        assert token in raw and token not in text, token
    assert len(text) < len(raw) and text.startswith("\n= Homarus gammarus =\n\nHomarus gammarus, known as")


@pytest.mark.slow  # 5-15 s: the fast lane stays short
def test_a_byte_bpe_run_and_its_hf_export_evaluate_the_same(tmp_path):
    """eval --workdir on a run trained with GPT-2-style byte-level BPE and eval --hf on its export give the
    same loss on the same text: weights, tokenizer and windows all survive the round trip."""
    from jaxlm import config, export
    from jaxlm import run as run_lib

    from conftest import ROOT, write_word_corpus

    corpus = write_word_corpus(tmp_path / "corpus", 30)
    cfg = config.load(ROOT / "jaxlm" / "configs" / "tiny.py", {
        "data.source": f"files:{corpus}/*.txt", "data.tokenizer_kind": "byte_bpe", "data.vocab_size": 400,
        "train.steps": 3, "train.eval_every": 0, "log.wandb_mode": "disabled", "log.stats_every": 0,
        "checkpoint.stages": ((3, 10),)})
    run_lib.run(cfg, tmp_path / "run", log=lambda s: None)
    out = export.export(tmp_path / "run", tmp_path / "hf")
    spec = f"files:{corpus}/doc00*.txt"
    ours = eval_lib.evaluate_run(tmp_path / "run", data_spec=spec, context=64, stride=32, log=lambda s: None)[-1]
    theirs = eval_lib.evaluate_hf(out, spec, context=64, stride=32, log=lambda s: None)
    assert ours["tokens"] == theirs["tokens"] and ours["bytes"] == theirs["bytes"]
    assert theirs["loss"] == pytest.approx(ours["loss"], rel=1e-5)


@pytest.mark.slow  # trains a tiny run
def test_the_export_of_a_sentencepiece_run_evaluates_as_the_run(tmp_path):
    """The default (SentencePiece) run's export evaluates with --hf, through its tokenizer.model, through
    the HF files alone, and with --tokenizer given: the run's loss each time."""
    from jaxlm import export

    from conftest import train_tiny_run, write_word_corpus

    run = train_tiny_run(tmp_path, **{"train.batch_size": 4, "train.seq_len": 32})  # small steps: the point is the export
    out = export.export(run, tmp_path / "hf")
    spec = f"files:{write_word_corpus(tmp_path / 'corpus', 30)}/doc00*.txt"
    quiet = lambda s: None  # noqa: E731
    ours = eval_lib.evaluate_run(run, data_spec=spec, context=32, stride=16, log=quiet)[-1]
    given = eval_lib.evaluate_hf(out, spec, context=32, stride=16, tokenizer=str(out / "tokenizer.model"), log=quiet)
    own = eval_lib.evaluate_hf(out, spec, context=32, stride=16, log=quiet)
    (out / "tokenizer.model").unlink()
    hf_files = eval_lib.evaluate_hf(out, spec, context=32, stride=16, log=quiet)
    for theirs in (given, own, hf_files):
        assert theirs["tokens"] == ours["tokens"] and theirs["loss"] == pytest.approx(ours["loss"], rel=1e-5)
