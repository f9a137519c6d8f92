"""The device mesh and the one table from the model's logical axes to mesh axes.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with parameters, gradients and
optimizer state sharded: ZeRO-3 style) and ``tensor`` (Megatron tensor parallel). ``-1`` in the
config means "the rest of the devices". The batch is split over (data, fsdp).

Axis types: we build the mesh with ``AxisType.Auto`` (``jax.make_mesh`` defaults to Explicit).
jaxlm states shardings at the jit boundary (``in_shardings``/``out_shardings`` of the train step)
and at the model's few large activations (``constrain``), and lets the compiler propagate them in
between; the Explicit mode would make every einsum in the model declare its output sharding,
which couples the model to the mesh for no gain at GPT-2 scale.

The model names every dim of every parameter and large activation with a logical axis, where it
makes them (``jaxlm/model.py``: Flax ``out_sharding`` metadata on parameters, ``ACTIVATIONS``);
``LOGICAL_RULES`` below is the only place those names meet the mesh (MaxText's
``logical_axis_rules``). Dims not divisible by their mesh axes are replicated, with a note.

What the table makes of them:

====================================  =====================  =====================================
array (logical axes)                  layout                 why
====================================  =====================  =====================================
wte (vocab, embed)                    (tensor, fsdp)         vocab-parallel embedding and tied head
wpe (positions, embed)                (·, fsdp)
c_attn kernel (embed, qkv, heads,     (fsdp, ·, tensor, ·)   column-parallel by whole heads of
head_dim), bias (qkv, heads, ...)     (·, tensor, ·)         q, k and v
c_fc kernel (embed, mlp), bias (mlp)  (fsdp, tensor)         column-parallel
c_proj kernel (heads | mlp, embed)    (tensor, fsdp)         row-parallel
c_proj bias, LayerNorm (act_embed)    replicated
residual (batch, length, act_embed)   (data+fsdp, ·, ·)      replicated over tensor, as in Megatron
qkv, mlp, logits                      batch over (data, fsdp); heads, hidden, vocab over tensor
vocab_table (vocab, act_embed)        (tensor, ·)            the table gathered over fsdp once per
                                                             step for both the lookup and the head
====================================  =====================  =====================================

Without the activation layouts the compiler is free to meet an FSDP-sharded weight by resharding
the *activations* to the weight's contraction dim and all-reducing partial sums of the whole
global batch, which it does. The model stays mesh-agnostic: its ``constrain`` calls apply only
inside ``use_mesh``, which installs this table's layout; elsewhere they are the identity.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import warnings

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm import model as model_lib
from jaxlm import naming
from jaxlm.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
_NOTED: set[str] = set()

# logical axis (jaxlm/model.py) -> mesh axis, axes, or None (replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "length": None,
    "vocab": "tensor",  # vocab-parallel token table, head and logits
    "positions": None,
    "embed": "fsdp",  # d_model of the weight matrices: ZeRO-3
    "act_embed": None,  # d_model of activations, biases added to them, LayerNorm: replicated
    "qkv": None,
    "heads": "tensor",  # whole heads per tensor shard
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,  # the stacked blocks' leading axis (model.scan_layers): every device holds every layer
}


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, int, int]:
    sizes = [int(mesh_cfg[a]) for a in AXES]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % fixed:
            raise ConfigError(f"mesh: {dict(zip(AXES, sizes))} -- the fixed axes ({fixed}) do not divide "
                              f"the {n_devices} devices")
        sizes[sizes.index(-1)] = n_devices // fixed
    if math.prod(sizes) != n_devices:
        raise ConfigError(f"mesh: data×fsdp×tensor = {'×'.join(map(str, sizes))} = {math.prod(sizes)} but there are "
                          f"{n_devices} devices; make the product {n_devices} or set one axis to -1")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches (B, T): split over the data-parallel devices."""
    return NamedSharding(mesh, logical_spec(("batch",)))


def microbatch_sharding(mesh: Mesh) -> NamedSharding:
    """A batch as micro-batches (n, B / n, T): each micro-batch split over the data-parallel devices."""
    return NamedSharding(mesh, logical_spec((None, "batch")))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def _fit(spec: P, shape: tuple[int, ...], mesh, what: str) -> P:
    """`spec` with every dim its mesh axes do not divide replicated instead (noted once)."""
    fitted = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        size = math.prod(mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,))) if axis else 1
        if dim % size:
            note = f"sharding: dim {dim} of {what} is not divisible by mesh.{axis}={size}; that dim is replicated"
            if axis == "tensor" and what.startswith(("wte", "the logits", "the vocab_table")):
                note += (f" (the head then runs whole on every tensor shard; model.vocab_multiple="
                         f"{math.lcm(128, size)} pads the token table to a size that divides)")
            if note not in _NOTED:
                _NOTED.add(note)
                warnings.warn(note, stacklevel=4)
            axis = None
        fitted.append(axis)
    return P(*fitted)


def logical_spec(axes: tuple[str | None, ...]) -> P:
    """The PartitionSpec of dims named `axes` (None: a dim without a name, replicated), by LOGICAL_RULES."""
    unknown = [a for a in axes if a is not None and a not in LOGICAL_RULES]
    if unknown:
        raise ConfigError(f"sharding: logical axis {unknown[0]!r} has no entry in jaxlm/sharding.py LOGICAL_RULES")
    return P(*(None if a is None else LOGICAL_RULES[a] for a in axes))


def layout(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh, what: str) -> P:
    """The spec of an array of `shape` whose dims are `axes`; dims their mesh axes do not divide stay replicated."""
    return _fit(logical_spec(axes), shape, mesh, what)


def spec_for(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The partition spec of one parameter (or optimizer moment named like it), by its logical axes."""
    try:
        axes = model_lib.param_axes(name)
    except KeyError:
        raise ConfigError(f"sharding: {name!r} is not a parameter of the model (it declares no logical axes)") from None
    return layout(axes, shape, mesh, re.sub(r"^.*?(?=(wte|wpe|h|ln_f)[.])", "", name))


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
    """Context in which the model's ``constrain`` calls apply (enter it inside the jitted function)."""
    abstract = mesh.abstract_mesh
    with jax.sharding.use_abstract_mesh(abstract), naming.layouts(
            lambda axes, shape, what: layout(axes, shape, abstract, what)):
        yield


def constrain(x: jax.Array, kind: str) -> jax.Array:
    """``model.constrain``: activation `x` laid out by kind (``model.ACTIVATIONS``) inside ``use_mesh``,
    the identity elsewhere."""
    return model_lib.constrain(x, kind)


def param_shardings(params, mesh: Mesh):
    """NamedShardings for a params pytree (nnx.State of Params or arrays), by their logical axes."""

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
        return NamedSharding(mesh, spec_for(naming.param_name(path), shape, mesh))

    return jax.tree_util.tree_map_with_path(one, params)


def state_shardings(abstract_state, mesh: Mesh):
    """Shardings of a whole train state: params and optimizer moments by their logical axes (a
    moment's name ends like its parameter's), every scalar and everything else replicated."""

    def one(path, leaf):
        name = naming.param_name(path)
        shape = tuple(leaf.shape)
        if shape and name.startswith(("params.", "opt_state.")):
            return NamedSharding(mesh, spec_for(name, shape, mesh))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def memory(mesh: Mesh) -> tuple[float, str]:
    """(bytes, what) the mesh's devices hold in all: accelerators' memory, or the host's RAM for CPU
    devices (which share it, simulated ones too)."""
    device = mesh.devices.flat[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"]) * mesh.devices.size, f"{mesh.devices.size} {device.device_kind} device(s)"
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "this host's memory"
