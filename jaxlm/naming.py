"""Names the model, sharding, optim, hf and checkpoint share: parameter names and logical axes.

A parameter's name is its key path joined by dots, Hugging Face style:
``params["h"][0]["attn"]["c_attn"]["kernel"]`` is ``h.0.attn.c_attn.kernel``. The weight-decay
mask and the HF name map match on these names.

A logical axis names what a dim of a parameter or activation is (``'batch'``, ``'embed'``,
``'heads'``, ...). The model declares them where it makes each array and knows nothing of meshes;
``jaxlm.sharding`` maps them to mesh axes with its one table and, for the duration of a train step,
installs that mapping (``layouts``), through which ``constrain`` lays out the model's activations.
Outside it ``constrain`` is the identity.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

import jax

# (logical axes, shape, what the array is) -> PartitionSpec on the context mesh
Layout = Callable[[tuple, tuple, str], Any]
_LAYOUT: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("jaxlm_layout", default=None)


def param_name(path) -> str:
    """'h.0.attn.c_attn.kernel' for a pytree key path into params (or into anything holding them)."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def flat(tree) -> dict[str, Any]:
    """{'h.0.attn.c_attn.kernel': leaf, ...} of a pytree."""
    return {param_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@contextlib.contextmanager
def layouts(layout: Layout) -> Iterator[None]:
    """Within: ``constrain`` lays arrays out as ``layout(axes, shape, what)`` says."""
    token = _LAYOUT.set(layout)
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def layout_of(axes: tuple[str | None, ...], shape: tuple[int, ...], what: str):
    """The installed layout's PartitionSpec for an array of `shape` whose dims are `axes`; None without one."""
    layout = _LAYOUT.get()
    return None if layout is None else layout(axes, shape, what)


def constrain(x: jax.Array, axes: tuple[str | None, ...], what: str) -> jax.Array:
    """`x`, whose dims are the logical `axes`, laid out by the installed layout; the identity without one."""
    layout = _LAYOUT.get()
    if layout is None:
        return x
    return jax.lax.with_sharding_constraint(x, layout(axes, x.shape, what))
