"""The device mesh and the one table of partition rules.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with parameters, gradients and
optimizer state sharded: ZeRO-3 style) and ``tensor`` (Megatron tensor parallel). ``-1`` in the
config means "the rest of the devices". The batch is split over (data, fsdp).

Axis types: we build the mesh with ``AxisType.Auto`` (``jax.make_mesh`` now defaults to
Explicit). jaxlm states shardings at the jit boundary (``in_shardings``/``out_shardings`` of the
train step, from the table below) and lets the compiler propagate them through the model; the
Explicit mode would make every einsum in the model declare its output sharding, which couples the
model to the mesh for no gain at GPT-2 scale.

Rules (first match wins; dims not divisible by their axis size are replicated, with a note):

=======================  ==================  ======================================
parameter                spec                why
=======================  ==================  ======================================
wte.embedding (V, D)     (tensor, fsdp)      vocab-parallel embedding and tied head
wpe.embedding (P, D)     (None, fsdp)
c_attn / c_fc kernel     (fsdp, tensor)      column-parallel
c_attn / c_fc bias       (tensor,)
c_proj kernel            (tensor, fsdp)      row-parallel
c_proj bias, LayerNorm   replicated
=======================  ==================  ======================================
"""

from __future__ import annotations

import math
import re
import warnings

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxlm.errors import ConfigError
from jaxlm.model import param_name

AXES = ("data", "fsdp", "tensor")
BATCH = P(("data", "fsdp"))
_NOTED: set[str] = set()

RULES: tuple[tuple[str, P], ...] = (
    (r"wte\.embedding$", P("tensor", "fsdp")),
    (r"wpe\.embedding$", P(None, "fsdp")),
    (r"(c_attn|c_fc)\.kernel$", P("fsdp", "tensor")),
    (r"(c_attn|c_fc)\.bias$", P("tensor")),
    (r"c_proj\.kernel$", P("tensor", "fsdp")),
    (r"(c_proj\.bias|ln_\d\.(scale|bias)|ln_f\.(scale|bias))$", P()),
)


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
    return NamedSharding(mesh, BATCH)


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def spec_for(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The partition spec of one parameter; dims its axis does not divide stay replicated."""
    for pattern, spec in RULES:
        if re.search(pattern, name):
            fitted = []
            for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
                if axis is not None and dim % mesh.shape[axis]:
                    note = f"sharding: dim {dim} of {re.sub(r'^.*?(?=(wte|wpe|h|ln_f)[.])', '', name)} is not divisible by " \
                           f"mesh.{axis}={mesh.shape[axis]}; that dim is replicated"
                    if note not in _NOTED:
                        _NOTED.add(note)
                        warnings.warn(note, stacklevel=3)
                    axis = None
                fitted.append(axis)
            return P(*fitted)
    raise ConfigError(f"sharding: no partition rule matches parameter {name!r}; add one to jaxlm/sharding.py RULES")


def param_shardings(params, mesh: Mesh):
    """NamedShardings for a params pytree (nnx.State of Params or arrays), by the rule table."""

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
        return NamedSharding(mesh, spec_for(param_name(path), shape, mesh))

    return jax.tree_util.tree_map_with_path(one, params)


def state_shardings(abstract_state, mesh: Mesh):
    """Shardings of a whole train state: params and optimizer moments by the rule table (their
    names end like the parameter's), every scalar and everything else replicated."""

    def one(path, leaf):
        name = param_name(path)
        shape = tuple(leaf.shape)
        if shape and name.startswith(("params.", "opt_state.")):
            return NamedSharding(mesh, spec_for(name, shape, mesh))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
