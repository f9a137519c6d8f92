"""Linear probes and their online codelength (Voita & Titov 2020, "Information-Theoretic Probing
with Minimum Description Length").

The training examples (in a fixed random order) are cut into portions at ``ends`` = n·2^-10, n·2^-9,
..., n/2, n (portions smaller than ``min_first`` examples are dropped from the front; at least two
remain). For each prefix ``[0, ends[i])`` a softmax probe (weights and bias, zeros at the start, so
its first prediction is uniform) is trained with Adam on minibatches of the prefix's first nine
tenths, keeping the parameters with the lowest loss on its last tenth (evaluated every
``eval_every`` steps; training stops after ``patience`` evaluations without improvement or at
``max_steps``). Then

    online codelength = ends[0]·log2 K + Σ_{i ≥ 1} Σ_{j ∈ [ends[i-1], ends[i])} -log2 p_{i-1}(y_j | x_j)

where p_{i-1} is the probe trained on the prefix ``[0, ends[i-1])``; uniform codelength = n·log2 K;
compression = uniform / online. Accuracy is that of the probe trained on all n examples, on the test
examples. K is the task's number of classes.

``train_all`` trains every probe of a checkpoint in one jitted call: vmapped over layers, label
sets (a task and its control share the features) and portions.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm import precision


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    batch: int = 128
    lr: float = 1e-2
    max_steps: int = 600
    eval_every: int = 20
    patience: int = 5
    min_first: int = 16  # the first portion has at least this many examples


def portion_ends(n: int, min_first: int = 16) -> tuple[int, ...]:
    """Prefix lengths n·2^-10, ..., n/2, n (Voita & Titov's 0.1%, 0.2%, ..., 100%), without the portions
    smaller than `min_first` examples; at least two portions whenever n >= 2."""
    ends = sorted({max(1, round(n * 2.0 ** -k)) for k in range(10, -1, -1)})
    keep = [e for e in ends if e >= min_first]
    if len(keep) < 2:
        keep = [e for e in ends if e < n][-1:] + [n] if n >= 2 else [n]
    return tuple(keep)


def online_codelength(nll_bits: np.ndarray, ends, n_classes: int) -> float:
    """The online code of the labels (bits): `nll_bits[i, j]` is -log2 p(y_j | x_j) under the probe
    trained on the prefix [0, ends[i]); the first portion is sent with the uniform code."""
    total = ends[0] * math.log2(n_classes)
    for i in range(1, len(ends)):
        total += float(np.sum(nll_bits[i - 1, ends[i - 1]:ends[i]]))
    return total


def uniform_codelength(n: int, n_classes: int) -> float:
    return n * math.log2(n_classes)


def _masked_logits(params, x, k, k_max):
    logits = x @ params["w"] + params["b"]
    return jnp.where(jnp.arange(k_max) < k, logits, -1e9)


def _loss(params, x, y, k, k_max, weight=None):
    nll = optax.softmax_cross_entropy_with_integer_labels(_masked_logits(params, x, k, k_max), y)
    if weight is None:
        return nll.mean()
    return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def _train_one(x_NF, y_N, k, n_end, key, *, k_max: int, dev_max: int, hp: ProbeSettings):
    """One probe on the prefix [0, n_end): Adam on the first nine tenths, the best parameters on the last tenth."""
    F = x_NF.shape[-1]
    n_dev = jnp.maximum(1, n_end // 10)
    n_tr = n_end - n_dev
    dev_idx = n_tr + jnp.arange(dev_max)
    dev_w = (dev_idx < n_end).astype(x_NF.dtype)
    dev_x, dev_y = x_NF[jnp.minimum(dev_idx, x_NF.shape[0] - 1)], y_N[jnp.minimum(dev_idx, x_NF.shape[0] - 1)]
    params = {"w": jnp.zeros((F, k_max), x_NF.dtype), "b": jnp.zeros((k_max,), x_NF.dtype)}
    opt = optax.adam(hp.lr)

    def dev_loss(p):
        return _loss(p, dev_x, dev_y, k, k_max, dev_w)

    def sgd(i, carry):
        p, o, key = carry
        key, sub = jax.random.split(key)
        idx = jax.random.randint(sub, (hp.batch,), 0, jnp.maximum(n_tr, 1))
        g = jax.grad(_loss)(p, x_NF[idx], y_N[idx], k, k_max)
        upd, o = opt.update(g, o, p)
        return optax.apply_updates(p, upd), o, key

    def cond(c):
        step, _, _, _, _, bad, _ = c
        return (step < hp.max_steps) & (bad < hp.patience)

    def body(c):
        step, p, o, best, best_loss, bad, key = c
        p, o, key = jax.lax.fori_loop(0, hp.eval_every, sgd, (p, o, key))
        loss = dev_loss(p)
        better = loss < best_loss - 1e-6
        best = jax.tree.map(lambda a, b: jnp.where(better, a, b), p, best)
        return (step + hp.eval_every, p, o, best, jnp.where(better, loss, best_loss),
                jnp.where(better, 0, bad + 1), key)

    init = (jnp.int32(0), params, opt.init(params), params, dev_loss(params), jnp.int32(0), key)
    return jax.lax.while_loop(cond, body, init)[3]


@functools.partial(jax.jit, static_argnames=("ends", "k_max", "hp"))
def _train_all(x_LNF, y_CN, k_C, xt_LMF, yt_CM, key, *, ends, k_max, hp):
    ends_P = jnp.asarray(ends)
    dev_max = max(1, ends[-1] // 10)
    C, P = y_CN.shape[0], len(ends)
    keys = jax.random.split(key, (C, P))
    one = functools.partial(_train_one, k_max=k_max, dev_max=dev_max, hp=hp)
    over_p = jax.vmap(one, in_axes=(None, None, None, 0, 0))
    over_c = jax.vmap(over_p, in_axes=(None, 0, 0, None, 0))
    over_l = jax.vmap(over_c, in_axes=(0, None, None, None, None))
    params = over_l(x_LNF, y_CN, k_C, ends_P, keys)  # leaves (L, C, P, ...)

    def scores(p, x_NF, xt_MF, y_N, yt_M, k):
        logp = jax.nn.log_softmax(_masked_logits(p, x_NF, k, k_max))
        nll_bits = -jnp.take_along_axis(logp, y_N[:, None], axis=-1)[:, 0] / math.log(2)
        acc = jnp.mean(jnp.argmax(_masked_logits(p, xt_MF, k, k_max), -1) == yt_M)
        return nll_bits, acc

    s = jax.vmap(scores, in_axes=(0, None, None, None, None, None))  # portions
    s = jax.vmap(s, in_axes=(0, None, None, 0, 0, 0))  # label sets
    s = jax.vmap(s, in_axes=(0, 0, 0, None, None, None))  # layers
    return s(params, x_LNF, xt_LMF, y_CN, yt_CM, k_C)  # (L, C, P, N) bits, (L, C, P) accuracy


def standardize(x_LNF: np.ndarray, xt_LMF: np.ndarray):
    """Each feature of each layer to mean 0, std 1 over the training examples (no labels involved)."""
    mean = x_LNF.mean(axis=1, keepdims=True)
    std = x_LNF.std(axis=1, keepdims=True) + 1e-6
    return (x_LNF - mean) / std, (xt_LMF - mean) / std


def probe(x_LNF, y_CN, classes_C, xt_LMF, yt_CM, *, seed: int = 0, hp: ProbeSettings = ProbeSettings()) -> dict:
    """Trains every probe: features of L layers (train (L, N, F), test (L, M, F)), C label sets.

    Returns arrays (L, C): online and uniform codelength (bits), compression, test accuracy; plus the
    portion ends. The training examples are used in the order given (shuffle them first).
    """
    x, xt = standardize(np.asarray(x_LNF, np.float64), np.asarray(xt_LMF, np.float64))
    dtype = precision.FP32
    N = x.shape[1]
    ends = portion_ends(N, hp.min_first)
    classes_C = np.asarray(classes_C)
    for c, k in enumerate(classes_C):
        if np.min(y_CN[c]) < 0 or np.max(y_CN[c]) >= k or np.min(yt_CM[c]) < 0 or np.max(yt_CM[c]) >= k:
            raise ValueError(f"label set {c}: labels outside [0, {k})")
    k_max = int(classes_C.max())
    nll, acc = _train_all(jnp.asarray(x, dtype), jnp.asarray(y_CN, jnp.int32), jnp.asarray(classes_C, jnp.int32),
                          jnp.asarray(xt, dtype), jnp.asarray(yt_CM, jnp.int32), jax.random.key(seed),
                          ends=ends, k_max=k_max, hp=hp)
    nll, acc = np.asarray(nll, np.float64), np.asarray(acc, np.float64)
    L, C = nll.shape[:2]
    online = np.array([[online_codelength(nll[i, c], ends, int(classes_C[c])) for c in range(C)] for i in range(L)])
    uniform = np.array([[uniform_codelength(N, int(classes_C[c])) for c in range(C)] for _ in range(L)])
    return {"online_bits": online, "uniform_bits": uniform, "compression": uniform / online,
            "accuracy": acc[:, :, -1], "ends": ends}
