"""The device mesh and the one table of partition rules.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with parameters, gradients and
optimizer state sharded: ZeRO-3 style) and ``tensor`` (Megatron tensor parallel). ``-1`` in the
config means "the rest of the devices". The batch is split over (data, fsdp).

Axis types: we build the mesh with ``AxisType.Auto`` (``jax.make_mesh`` now defaults to
Explicit). jaxlm states shardings at the jit boundary (``in_shardings``/``out_shardings`` of the
train step, from the table below) and at the model's few large activations (``constrain``, by
name), and lets the compiler propagate them in between; the Explicit mode would make every einsum
in the model declare its output sharding, which couples the model to the mesh for no gain at
GPT-2 scale.

Rules (first match wins; dims not divisible by their axis size are replicated, with a note):

=======================  ==================  ======================================
parameter                spec                why
=======================  ==================  ======================================
wte.embedding (V, D)     (tensor, fsdp)      vocab-parallel embedding and tied head
wpe.embedding (P, D)     (None, fsdp)
c_attn kernel (D,3,H,K)  (fsdp,·,tensor,·)   column-parallel by whole heads of q, k, v
c_attn bias (3, H, K)    (·, tensor, ·)
c_fc kernel              (fsdp, tensor)      column-parallel
c_fc bias                (tensor,)
c_proj kernel            (tensor, fsdp)      row-parallel
c_proj bias, LayerNorm   replicated
=======================  ==================  ======================================

Activations get the same treatment (``constrain``): the model names each large activation
(``residual`` stream, ``qkv``, ``mlp`` hidden, ``logits``) and ACTIVATIONS says how it is laid
out: batch over (data, fsdp), heads / hidden / vocab over tensor -- Megatron's layout. Without
these the compiler is free to meet an FSDP-sharded weight by resharding the *activations* to the
weight's contraction dim and all-reducing partial sums of the whole global batch, which it does.
The model stays mesh-agnostic: outside a mesh context (``use_mesh``) ``constrain`` is the identity.
"""

from __future__ import annotations

import math
import re
import warnings

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm import naming
from jaxlm.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
BATCH = P(BATCH_AXES)
_NOTED: set[str] = set()

RULES: tuple[tuple[str, P], ...] = (
    (r"wte\.embedding$", P("tensor", "fsdp")),
    (r"wpe\.embedding$", P(None, "fsdp")),
    (r"c_attn\.kernel$", P("fsdp", None, "tensor", None)),
    (r"c_attn\.bias$", P(None, "tensor", None)),
    (r"c_fc\.kernel$", P("fsdp", "tensor")),
    (r"c_fc\.bias$", P("tensor")),
    (r"c_proj\.kernel$", P("tensor", "fsdp")),
    (r"(c_proj\.bias|ln_\d\.(scale|bias)|ln_f\.(scale|bias))$", P()),
)


# Activation layouts, by the names the model gives them (jaxlm/model.py).
ACTIVATIONS: dict[str, P] = {
    "residual": P(BATCH_AXES, None, None),  # (B, T, D): replicated over tensor, as in Megatron
    "qkv": P(BATCH_AXES, None, None, "tensor", None),  # (B, T, 3, H, K): whole heads per tensor shard
    "mlp": P(BATCH_AXES, None, "tensor"),  # (B, T, 4D)
    "logits": P(BATCH_AXES, None, "tensor"),  # (B, T, V): vocab-parallel
    # the tied embedding as the forward uses it: gathered over fsdp once per step for both the
    # lookup and the head, vocab-parallel over tensor (a lookup then costs one all-reduce of the
    # local batch's embeddings, not of the global batch's)
    "vocab_table": P("tensor", None),  # (V, D)
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
    return NamedSharding(mesh, BATCH)


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


def spec_for(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The partition spec of one parameter; dims its axis does not divide stay replicated."""
    for pattern, spec in RULES:
        if re.search(pattern, name):
            return _fit(spec, shape, mesh, re.sub(r"^.*?(?=(wte|wpe|h|ln_f)[.])", "", name))
    raise ConfigError(f"sharding: no partition rule matches parameter {name!r}; add one to jaxlm/sharding.py RULES")


def use_mesh(mesh: Mesh):
    """Context in which the model's ``constrain`` calls apply (enter it inside the jitted function)."""
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def constrain(x: jax.Array, kind: str) -> jax.Array:
    """Lays activation `x` out as ACTIVATIONS[kind] on the context mesh; the identity without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, _fit(ACTIVATIONS[kind], x.shape, mesh, f"the {kind} activation"))


def param_shardings(params, mesh: Mesh):
    """NamedShardings for a params pytree (nnx.State of Params or arrays), by the rule table."""

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
        return NamedSharding(mesh, spec_for(naming.param_name(path), shape, mesh))

    return jax.tree_util.tree_map_with_path(one, params)


def state_shardings(abstract_state, mesh: Mesh):
    """Shardings of a whole train state: params and optimizer moments by the rule table (their
    names end like the parameter's), every scalar and everything else replicated."""

    def one(path, leaf):
        name = naming.param_name(path)
        shape = tuple(leaf.shape)
        if shape and name.startswith(("params.", "opt_state.")):
            return NamedSharding(mesh, spec_for(name, shape, mesh))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
