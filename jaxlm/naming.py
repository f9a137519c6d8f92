"""Names of pytree leaves: the one helper that model, sharding, optim, hf and checkpoint share.

A parameter's name is its key path joined by dots, Hugging Face style:
``params["h"][0]["attn"]["c_attn"]["kernel"]`` is ``h.0.attn.c_attn.kernel``. Sharding rules,
the weight-decay mask and the HF name map all match on these names.
"""

from __future__ import annotations

from typing import Any

import jax


def param_name(path) -> str:
    """'h.0.attn.c_attn.kernel' for a pytree key path into params (or into anything holding them)."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def flat(tree) -> dict[str, Any]:
    """{'h.0.attn.c_attn.kernel': leaf, ...} of a pytree."""
    return {param_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
