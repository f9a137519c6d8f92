"""The stack of n_layer blocks: a Python loop over per-layer blocks, or (``model.scan_layers``) one
block of stacked parameters run by ``jax.lax.scan``; and the converters between the two layouts.

Why a scan: the loop writes n_layer copies of the block into the program, so compile time grows
with depth (on CPU gpt2_xl's 48 blocks took 278 s against gpt2_small's 50 s); the scan writes one,
run n_layer times, as MaxText and Levanter scan over layers.

The stacked block is a ``model.Block`` whose parameters have a leading ``layers`` axis, made by
stacking the per-layer blocks the loop would make (``stack_blocks``): the same seed gives the same
numbers in both layouts. The scan is Flax NNX's functional pattern (what ``nnx.scan`` does inside):
``nnx.split`` the stacked block once and ``nnx.merge`` one layer's slice in the body. The layer
index, the layer's dropout key and its decode cache are scanned values; what the block sows
(telemetry, residuals) comes out of the scan stacked, as the loop's does out of ``run``. With a
remat policy the body is under ``jax.checkpoint``, so each layer is rematerialised as in the loop.
Attention reads its layer-index factors for a traced index from a table of the loop's Python values
(``attention.score_scale``): the same floats, so the same numbers.

Layouts. Loop: ``params["h"] = {0: block, 1: block, ...}`` (names 'h.0.attn.c_attn.kernel'). Scan:
``params["h"] = block`` with arrays (n_layer, ...) (names 'h.attn.c_attn.kernel', logical axes
('layers', ...), the 'layers' axis on no mesh axis). The stacked layout is internal: ``to_layout``
converts any pytree holding params (a train state with its optimizer moments, real or abstract),
and the boundaries that name parameters outside the program (HF export and import, restoring a
checkpoint written in the other layout: ``other_layout``) convert with it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm import attention as attn_lib


def stack_blocks(blocks) -> nnx.Module:
    """One block whose every parameter is the per-layer blocks' stacked on a new leading axis."""
    graphdef = nnx.graphdef(blocks[0])
    block = nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks]))
    block.attn.layer_idx = None  # a stacked block is called with each layer's index (see run)
    return block


def run(h, x_BTD, *, keys, cache, remat: Callable | None, capture: type | None):
    """`x_BTD` through every block of `h` (an nnx.List of blocks, or one stacked block).

    `keys`: (n_layer,) dropout keys or None; `cache`: the decode cache (a tuple of per-layer
    KVCaches for the loop, one stacked KVCache for the scan) or None; `remat`: the block call,
    rematerialised or not (``model.GPT2._block_fn``); `capture`: a variable type to collect from the
    blocks' sow calls, or None. Returns (x, the updated cache or None, the sown values stacked
    (n_layer, ...) or None).
    """
    if isinstance(h, nnx.List):
        return _loop(h, x_BTD, keys, cache, remat, capture)
    return _scan(h, x_BTD, keys, cache, remat, capture)


def _call(block_fn, block, capture, *args):
    """((x, cache), what the block sowed of `capture` as a plain dict, or None)."""
    if capture is None:
        return block_fn(block, *args), None
    out, sown = nnx.capture(block_fn, capture)(block, *args)
    return out, nnx.to_pure_dict(sown)


def _loop(h, x_BTD, keys, cache, block_fn, capture):
    new_cache, sown = [], []
    for i, block in enumerate(h):
        (x_BTD, layer_cache), layer_sown = _call(block_fn, block, capture, x_BTD,
                                                 None if keys is None else keys[i],
                                                 None if cache is None else cache[i])
        new_cache.append(layer_cache)
        sown.append(layer_sown)
    stacked = None if capture is None else jax.tree.map(lambda *xs: jnp.stack(xs), *sown)
    return x_BTD, None if cache is None else tuple(new_cache), stacked


def _scan(block, x_BTD, keys, cache, block_fn, capture):
    graphdef, state = nnx.split(block)
    n_layer = jax.tree.leaves(state)[0].shape[0]

    def body(x_BTD, layer):
        layer_state, layer_idx, key, layer_cache = layer
        (x_BTD, layer_cache), sown = _call(block_fn, nnx.merge(graphdef, layer_state), capture, x_BTD,
                                           key, layer_cache, layer_idx)
        return x_BTD, (layer_cache, sown)

    x_BTD, (new_cache, sown) = jax.lax.scan(body, x_BTD, (state, jnp.arange(n_layer, dtype=jnp.int32), keys, cache))
    return x_BTD, new_cache, sown


def empty_cache(batch: int, length: int, n_head: int, head_dim: int, dtype, n_layer: int, stacked: bool):
    """Per layer, room for `length` keys and values, none filled: a tuple of KVCaches, or one
    stacked KVCache (arrays with a leading n_layer axis) for the scan."""
    layers = tuple(attn_lib.KVCache.empty(batch, length, n_head, head_dim, dtype) for _ in range(n_layer))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers) if stacked else layers


def cache_index(cache) -> jax.Array:
    """The positions filled in a cache of either layout (every layer has the same)."""
    return cache[0].index if isinstance(cache, tuple) else cache.index[0]


# --- the two layouts of the parameters ------------------------------------------------------

def _is_params(x) -> bool:
    return isinstance(x, dict) and "h" in x and "wte" in x


def is_stacked(params) -> bool:
    """Whether `params` (a model's parameter dict) is in the scan's layout."""
    return not all(isinstance(k, int) for k in params["h"])


def _stack(xs):
    x = xs[0]
    if isinstance(x, jax.ShapeDtypeStruct):
        s = x.sharding
        s = NamedSharding(s.mesh, P(None, *s.spec)) if isinstance(s, NamedSharding) else s
        return jax.ShapeDtypeStruct((len(xs), *x.shape), x.dtype, sharding=s)
    return jnp.stack(xs)


def _unstack(a) -> list:
    if isinstance(a, jax.ShapeDtypeStruct):
        s = a.sharding
        s = NamedSharding(s.mesh, P(*tuple(s.spec)[1:])) if isinstance(s, NamedSharding) else s
        return [jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=s)] * a.shape[0]
    return [a[i] for i in range(a.shape[0])]


def _params_to(params, stacked: bool):
    if is_stacked(params) == stacked:
        return params
    h = params["h"]
    if stacked:
        return {**params, "h": jax.tree.map(lambda *xs: _stack(xs), *[h[i] for i in sorted(h)])}
    leaves, treedef = jax.tree.flatten(h)
    layers = zip(*[_unstack(a) for a in leaves])
    return {**params, "h": {i: jax.tree.unflatten(treedef, layer) for i, layer in enumerate(layers)}}


def to_layout(tree, stacked: bool):
    """`tree` with every parameter dict in it (the params, the optimizer's moments) in the scan's
    layout (`stacked`) or the loop's; arrays, or ShapeDtypeStructs whose shardings follow."""
    return jax.tree.map(lambda x: _params_to(x, stacked) if _is_params(x) else x, tree, is_leaf=_is_params)


def find_params(tree) -> dict | None:
    """The first parameter dict in `tree`, or None."""
    found = [x for x in jax.tree.leaves(tree, is_leaf=_is_params) if _is_params(x)]
    return found[0] if found else None


def other_layout(abstract_state) -> tuple[Any, Callable] | None:
    """(the abstract state in the other layout, a function from such a state to this layout on this
    state's shardings) for a state holding parameters; None for one without."""
    params = find_params(abstract_state)
    if params is None:
        return None
    stacked = is_stacked(params)
    shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
    convert = jax.jit(lambda s: to_layout(s, stacked), out_shardings=shardings)
    return to_layout(abstract_state, not stacked), convert
