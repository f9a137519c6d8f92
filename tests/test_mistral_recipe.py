"""Mistral's recipe, proved against a PyTorch re-creation of Mistral's training.

The reference is Hugging Face's ``GPT2LMHeadModel`` loaded from jaxlm's exported step-0 weights, trained
on the batches jaxlm's loader gives (``jaxlm.data.viewer``) with what Mistral's stack did, written out
from its source (transformers 4.5.0 + DeepSpeed 0.3.13, ZeRO-2):

* ``torch.optim.AdamW`` over every parameter in one group, weight decay 0.1 (transformers 4.5 handed
  DeepSpeed ``model.parameters()``; DeepSpeed's FusedAdam in AdamW mode is the same update);
* ZeRO-2's clipping: ``clip = (||g|| + 1e-6) / max_norm``, the gradients divided by it when it is > 1,
  the norm summed in float64;
* ``WarmupDecayLR``: ``lr * ln(k + 1) / ln(W)`` for k < W, then ``lr * (T - k) / (T - W)``, stepped by
  the engine after each applied update and not at construction, so update 1 runs at the optimizer's
  configured lr;
* documents tokenized with no EOS and concatenated (Mistral's ``tokenizer(text)``).

jaxlm's per-step losses must equal the reference's within 1e-5 relative over 48 steps that cover
warmup and decay; flipping any one Mistral switch must move them well past that.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from jaxlm import config, export, telemetry
from jaxlm import run as run_lib
from jaxlm.data import sources as sources_lib
from jaxlm.data import tokenizer_train, viewer

from conftest import ROOT, once_per_session, write_word_corpus

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # trains several runs of 48 steps

STEPS, WARMUP, BATCH, SEQ, LR = 48, 10, 4, 32, 3e-3
TOLERANCE = 1e-5  # relative, per step


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(corpus glob, GPT-2-style tokenizer spec hf:DIR): a byte-level BPE trained here, in GPT-2's files."""
    def build(root):
        docs = write_word_corpus(root / "corpus", 40, words_per_doc=0, seed=3)
        tok = tokenizer_train.train_byte_bpe([p.read_text() for p in sorted(docs.glob("*.txt"))], 400)
        return f"files:{docs}/*.txt", tok.save(root / "gpt2_tokenizer")

    return once_per_session(tmp_path_factory, "mistral-corpus", build)


def mistral_cfg(corpus, **flips):
    """configs/gpt2_small.py's recipe on a 2-layer model, fp32, dropout 0, `flips` applied."""
    source, tokenizer = corpus
    return config.load(ROOT / "jaxlm" / "configs" / "gpt2_small.py", {
        "model.n_layer": 2, "model.n_embd": 64, "model.n_head": 4, "model.n_positions": SEQ,
        "model.embd_pdrop": 0.0, "model.attn_pdrop": 0.0, "model.resid_pdrop": 0.0,
        "precision.regime": "fp32", "data.source": source, "data.tokenizer": tokenizer, "data.val_fraction": 0.0,
        "train.steps": STEPS, "train.batch_size": BATCH, "train.seq_len": SEQ, "train.eval_every": 0,
        "optim.lr": LR, "optim.warmup_steps": WARMUP, "log.every": 8, "log.stats_every": 0,
        "log.wandb_mode": "disabled", "log.tensorboard": False, "checkpoint.stages": ((1000, 10_000),),
        **flips})


def jaxlm_losses(cfg, workdir) -> np.ndarray:
    run_lib.run(cfg, workdir, log=lambda s: None)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [x for r in records for x in r.get(telemetry.STEP_LOSSES, [])]
    assert len(losses) == STEPS
    return np.asarray(losses)


class WarmupDecayLR:
    """DeepSpeed 0.3.13's WarmupDecayLR (warmup_min_lr 0): __init__ leaves the optimizer's lr alone;
    step() advances the iteration and sets lr = max_lr * gamma(iteration)."""

    def __init__(self, optimizer, max_lr: float, warmup: int, total: int):
        self.opt, self.max_lr, self.total = optimizer, max_lr, total
        self.warmup = max(2, warmup)
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup)
        self.last_batch_iteration = -1

    def gamma(self) -> float:
        it = self.last_batch_iteration
        if it < self.warmup:
            return self.inverse_log_warm_up * math.log(it + 1)
        return max(0.0, float(self.total - it) / float(max(1.0, self.total - self.warmup)))

    def step(self) -> None:
        self.last_batch_iteration += 1
        for group in self.opt.param_groups:
            group["lr"] = self.max_lr * self.gamma()


def reference_losses(hf_dir, batches: np.ndarray, cfg) -> np.ndarray:
    """Mistral's training step by step in PyTorch (fp32, dropout 0) on `batches`."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model.train()
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    sched = WarmupDecayLR(opt, o.lr, int(o.warmup_steps), cfg.train.steps)
    losses = []
    for batch in batches:
        x = torch.tensor(batch, dtype=torch.long)
        logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        total_norm = math.sqrt(sum(float(g.double().norm(2)) ** 2 for g in grads))
        clip = (total_norm + 1e-6) / o.clip_norm  # ZeRO-2's unscale_and_clip_grads
        if clip > 1:
            for g in grads:
                g.mul_(1.0 / clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()  # after the applied update (the engine's _take_model_step)
        losses.append(float(loss.detach()))
    return np.asarray(losses)


@pytest.fixture(scope="module")
def mistral(corpus, tmp_path_factory):
    """jaxlm's Mistral-recipe losses, the batches it trained on, and the reference's losses."""
    def build(root):
        cfg = mistral_cfg(corpus)
        losses = jaxlm_losses(cfg, root / "run")
        batches = viewer.batches(cfg, root / "run", 1, STEPS, log=lambda s: None)
        hf_dir = export.export(root / "run", root / "hf0", step=0)
        return {"losses": losses, "batches": batches, "reference": reference_losses(hf_dir, batches, cfg), "root": root}

    return once_per_session(tmp_path_factory, "mistral-run", build)


def test_jaxlm_trains_as_mistral_did_step_for_step(mistral):
    ours, ref = mistral["losses"], mistral["reference"]
    rel = np.abs(ours - ref) / np.abs(ref)
    print(f"jaxlm vs the PyTorch re-creation over {STEPS} steps: max relative difference {rel.max():.3g} at step "
          f"{rel.argmax() + 1}; losses {ours[0]:.4f} -> {ours[-1]:.4f}")
    assert rel.max() < TOLERANCE, f"worst step {rel.argmax() + 1}: jaxlm {ours[rel.argmax()]} vs torch {ref[rel.argmax()]}"
    assert ours[-1] < ours[0] - 0.5  # it learned: the comparison is not of two flat curves


def test_the_rows_are_documents_without_eos_as_mistral_tokenized_them(corpus, mistral):
    """Every row trained on is a cut of the documents' ids, concatenated with nothing between them."""
    cfg = mistral_cfg(corpus)
    tk = transformers.PreTrainedTokenizerFast(tokenizer_file=str(cfg.data.tokenizer[3:] + "/tokenizer.json"))
    docs = list(sources_lib.open_source(cfg.data).documents("train"))
    stream = np.concatenate([tk(d)["input_ids"] for d in docs])  # Mistral's tokenizer(text): no EOS
    n = len(stream) // (SEQ + 1)
    rows = {tuple(r) for r in stream[: n * (SEQ + 1)].reshape(n, SEQ + 1)}
    seen = mistral["batches"].reshape(-1, SEQ + 1)
    assert all(tuple(r) in rows for r in seen)


@pytest.mark.parametrize("flip", [
    {"optim.warmup": "linear"}, {"optim.deepspeed_lag": False}, {"optim.decay_mask": "matrices"},
    {"data.eos": True}, {"data.seed": 0},
], ids=lambda f: next(iter(f)))
def test_each_mistral_switch_flipped_fails_the_comparison(corpus, mistral, flip, tmp_path):
    losses = jaxlm_losses(mistral_cfg(corpus, **flip), tmp_path / "run")
    rel = np.abs(losses - mistral["reference"]) / np.abs(mistral["reference"])
    print(f"{flip}: max relative difference {rel.max():.3g} at step {rel.argmax() + 1}, "
          f"mean {rel.mean():.3g}, final loss {losses[-1]:.4f} vs {mistral['reference'][-1]:.4f}")
    assert rel.max() > 10 * TOLERANCE  # the comparison above would fail, with a margin
