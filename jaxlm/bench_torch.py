"""The PyTorch baselines of ``jaxlm.bench``: Hugging Face GPT2LMHeadModel, and a minimal nanoGPT-style
GPT-2 written here with jaxlm's math, eager and under ``torch.compile``.

The nanoGPT-style model is jaxlm's function at the config's shape: pre-LN blocks, causal attention
through ``F.scaled_dot_product_attention`` (its dropout in the kernel when attn_pdrop > 0), GELU with
the tanh approximation (HF's "gelu_new", jaxlm's MLP), the head tied to the token table (vocab_size
rows, no padding), biases per ``model.use_bias``, the config's three dropout rates, fp32; AdamW with
the config's betas, eps and weight decay on the matrices and embeddings only (``optim.decay_mask``),
global-norm clipping at ``optim.clip_norm``. The learning rate is constant (jaxlm's schedule is one
scalar per step). ``load_jaxlm_params`` copies a jaxlm model's parameters into it (the parity test).

Each baseline is a ``Stepper``: ``step()`` runs one training step on a fixed synthetic batch and
waits for it, so ``jaxlm.bench`` can interleave it with jaxlm's own step in the same process.
torch and transformers are optional (test-only dependencies): ``make`` returns what imports.
"""

from __future__ import annotations

import gc
import math
import time
from typing import Callable

import jax
import numpy as np

from jaxlm import hf, naming
from jaxlm import model as model_lib
from jaxlm.precision import FP32


class Stepper:
    """One contender of the interleaved timing: `step()` is one synchronised training step."""

    def __init__(self, name: str, label: str, step: Callable[[], object], tokens_per_step: int, **info):
        self.name, self.label, self.step, self.tokens_per_step, self.info = name, label, step, tokens_per_step, info
        self.cuda = bool(info.get("cuda"))

    def time(self, steps: int, warmup: int) -> dict:
        """Untimed `warmup` steps, then the median of `steps` timed ones (the baseline on its own)."""
        for _ in range(warmup):
            self.step()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - t)
        return self.summary(times)

    def summary(self, times: list[float]) -> dict:
        step_s = float(np.median(times))
        return {"name": self.name, "regime": self.label, "step_s": step_s,
                "tokens_per_s": self.tokens_per_step / step_s, **self.info}


def _torch():
    try:
        import torch  # optional: the baselines run where it is installed
    except ImportError:
        return None
    return torch


def nanogpt_class():
    """The nanoGPT-style GPT-2 (a function so that importing this module does not import torch)."""
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self, d, n_head, eps, bias, attn_pdrop, resid_pdrop):
            super().__init__()
            self.n_head, self.attn_pdrop = n_head, attn_pdrop
            self.ln_1, self.ln_2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
            self.c_attn, self.attn_proj = nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d, bias=bias)
            self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d, bias=bias), nn.Linear(4 * d, d, bias=bias)
            self.drop = nn.Dropout(resid_pdrop)

        def forward(self, x):
            B, T, D = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).view(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_pdrop if self.training else 0.0,
                                               is_causal=True)
            x = x + self.drop(self.attn_proj(y.transpose(1, 2).reshape(B, T, D)))
            return x + self.drop(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")))

    class NanoGPT(nn.Module):
        def __init__(self, *, vocab_size, n_positions, n_embd, n_layer, n_head, embd_pdrop=0.0, attn_pdrop=0.0,
                     resid_pdrop=0.0, layer_norm_epsilon=1e-5, use_bias=True, initializer_range=0.02):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(n_positions, n_embd)
            self.drop = nn.Dropout(embd_pdrop)
            self.h = nn.ModuleList(Block(n_embd, n_head, layer_norm_epsilon, use_bias, attn_pdrop, resid_pdrop)
                                   for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(n_embd, eps=layer_norm_epsilon)
            for name, p in self.named_parameters():  # GPT-2's init, as jaxlm's (speed does not depend on it)
                if p.dim() == 2:
                    std = initializer_range / (math.sqrt(2 * n_layer) if name.endswith("_proj.weight") else 1.0)
                    nn.init.normal_(p, 0.0, std)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)

        def forward(self, idx, targets):
            pos = torch.arange(idx.shape[1], device=idx.device)
            x = self.drop(self.wte(idx) + self.wpe(pos))
            for block in self.h:
                x = block(x)
            logits = F.linear(self.ln_f(x), self.wte.weight)  # the tied head
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))

    return NanoGPT


def nanogpt(model_cfg, vocab_size: int | None = None):
    """The nanoGPT-style model of a jaxlm ``GPT2Config`` (or a config's model section)."""
    m = model_cfg
    return nanogpt_class()(vocab_size=vocab_size or m.vocab_size, n_positions=m.n_positions, n_embd=m.n_embd,
                           n_layer=m.n_layer, n_head=m.n_head, embd_pdrop=m.embd_pdrop, attn_pdrop=m.attn_pdrop,
                           resid_pdrop=m.resid_pdrop, layer_norm_epsilon=m.layer_norm_epsilon, use_bias=m.use_bias,
                           initializer_range=m.initializer_range)


def load_jaxlm_params(model, params, model_cfg) -> None:
    """Copies jaxlm's parameters (a GPT2 model's nnx state) into the nanoGPT-style model, in place."""
    torch = _torch()
    flat = naming.flat(model_lib.per_layer(params))
    ours = {}
    for name in hf.name_map(model_cfg.n_layer):
        if name not in flat:  # model.use_bias=False: the torch model has no such parameter either
            continue
        a = np.asarray(jax.device_get(flat[name]), FP32)
        a = a.reshape(hf.hf_shape(name, a.shape))
        if name == hf.TOKEN_TABLE:
            a = a[: model_cfg.vocab_size]  # without the padding rows
        if name.endswith(".kernel"):
            a = a.T  # (in, out) -> torch.nn.Linear's (out, in)
        ours[name.replace(".scale", ".weight").replace(".kernel", ".weight").replace(".embedding", ".weight")
             .replace("attn.c_attn", "c_attn").replace("attn.c_proj", "attn_proj")
             .replace("mlp.c_fc", "c_fc").replace("mlp.c_proj", "mlp_proj")] = torch.from_numpy(np.array(a, order="C"))
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise ValueError(f"parameters not matched: missing {missing}, unexpected {unexpected}")


def adamw(model, optim_cfg, fused: bool = False):
    """AdamW as jaxlm's chain: decay on the matrices and embeddings (``matrices``) or on all parameters."""
    torch = _torch()
    params = [p for p in model.parameters() if p.requires_grad]
    if optim_cfg.get("decay_mask", "matrices") == "matrices":
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": float(optim_cfg.weight_decay)},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    else:
        groups = [{"params": params, "weight_decay": float(optim_cfg.weight_decay)}]
    return torch.optim.AdamW(groups, lr=float(optim_cfg.lr), betas=(float(optim_cfg.b1), float(optim_cfg.b2)),
                             eps=float(optim_cfg.eps), fused=fused)


def _train_step(torch, loss_fn, model, opt, clip: float, cuda: bool):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn()
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return loss
    return step


def _first_step(step, name: str, log) -> tuple[bool, float]:
    """Runs the first step (torch.compile compiles there): (whether it ran, its seconds)."""
    t = time.perf_counter()
    try:
        step()
    except Exception as e:  # e.g. no C++ compiler for inductor: say so in one line, the bench goes on
        log(f"  {name}: torch.compile does not work here ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "not timed")
        return False, 0.0
    return True, time.perf_counter() - t


def make(cfg, batch_size: int, *, nanogpt_eager: bool = True, nanogpt_compiled: bool = True, hf: bool = True,
         log=print) -> list[Stepper]:
    """The baselines that import and run, each with one step done: HF GPT2LMHeadModel (on CUDA bf16 autocast,
    fused AdamW and torch.compile, as before), nanoGPT-style eager, nanoGPT-style under torch.compile."""
    torch = _torch()
    if torch is None:
        return []
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    m, T = cfg.model, cfg.train.seq_len
    vocab = m.vocab_size or cfg.data.vocab_size
    x = torch.from_numpy(np.random.RandomState(0).randint(0, vocab, (batch_size, T + 1)).astype(np.int64)).to(dev)
    inputs, targets = x[:, :-1], x[:, 1:]
    tokens = batch_size * T
    common = {"cuda": cuda, "torch": torch.__version__, "vocab_size": vocab,
              "dropout": {"embd": m.embd_pdrop, "attn": m.attn_pdrop, "resid": m.resid_pdrop}}
    out = []
    if hf:
        try:
            import transformers  # likewise optional
        except ImportError:
            transformers = None
        if transformers is not None:
            out += _hf(torch, transformers, cfg, vocab, inputs, tokens, common, log)
    for compiled, wanted in ((False, nanogpt_eager), (True, nanogpt_compiled)):
        if not wanted:
            continue
        torch.manual_seed(0)
        model = nanogpt(m, vocab).to(dev).train()
        opt = adamw(model, cfg.optim, fused=cuda)
        forward = torch.compile(model) if compiled else model
        name = "compiled" if compiled else "eager"
        step = _train_step(torch, lambda f=forward: f(inputs, targets), model, opt, float(cfg.optim.clip_norm), cuda)
        ok, first_s = _first_step(step, f"nanoGPT-style {name}", log)
        if ok:
            out.append(Stepper(name, "torch " + ("compile" if compiled else "eager"), step, tokens, compiled=compiled,
                               first_step_s=first_s,
                               model="nanoGPT-style GPT-2 (jaxlm.bench_torch)", **common))
    return out


def _hf(torch, transformers, cfg, vocab, inputs, tokens, common, log) -> list[Stepper]:
    """HF GPT2LMHeadModel with the config's dropout rates (SDPA attention, its dropout in-kernel; AdamW
    lr 1e-4 on every parameter, clipping at 1); on CUDA bf16 autocast, fused AdamW and torch.compile."""
    m, cuda = cfg.model, common["cuda"]
    hf_cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=m.n_positions, n_embd=m.n_embd, n_layer=m.n_layer,
                                     n_head=m.n_head, embd_pdrop=m.embd_pdrop, attn_pdrop=m.attn_pdrop,
                                     resid_pdrop=m.resid_pdrop, bos_token_id=0, eos_token_id=0)
    hf_cfg._attn_implementation = "sdpa"
    model = transformers.GPT2LMHeadModel(hf_cfg).to(inputs.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    forward = torch.compile(model) if cuda else model
    make_step = lambda f: _train_step(torch, lambda: f(inputs, labels=inputs).loss, model, opt, 1.0, cuda)
    step = make_step(forward)
    ok, first_s = _first_step(step, "HF GPT2LMHeadModel", log)
    if not ok:  # where torch.compile does not work, the eager model is the baseline
        forward, step = model, make_step(model)
        opt.zero_grad(set_to_none=True)
        _, first_s = _first_step(step, "HF GPT2LMHeadModel (eager)", log)
    regime = "torch " + ("bf16 autocast" if cuda else "fp32")
    return [Stepper("hf", regime, step, tokens, compiled=forward is not model, first_step_s=first_s,
                    model="HF GPT2LMHeadModel", transformers=transformers.__version__, **common)]


def release(steppers: list[Stepper]) -> None:
    """Drops the baselines' models and, on CUDA, hands their memory back before JAX's backend starts."""
    torch = _torch()
    steppers.clear()
    if torch is not None and torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
