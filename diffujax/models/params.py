"""One abstract description per weight drives initialisation, sharding and the checkpoint key map.

A family declares ``param_specs(config) -> {"path/to/weight": ParamSpec}``; ``ParamTree`` turns
that table into an NNX module tree whose ``nnx.Param`` leaves carry the logical axis names.
Per-layer weights are stacked on a leading ``layers`` axis so the forward pass is one
``lax.scan`` (compile time independent of depth; slice ``i`` is Hugging Face layer ``i``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, one per dimension
    init: str = "normal"  # normal | ones | zeros
    std: float = 0.02

    def __post_init__(self):
        if len(self.shape) != len(self.axes):
            raise ValueError(f"shape {self.shape} and logical axes {self.axes} differ in rank")

    def initialize(self, key, dtype):
        if self.init == "ones":
            return jnp.ones(self.shape, dtype)
        if self.init == "zeros":
            return jnp.zeros(self.shape, dtype)
        return (self.std * jax.random.normal(key, self.shape, jnp.float32)).astype(dtype)


class ParamTree(nnx.Module):
    """NNX module holding ``nnx.Param`` leaves laid out as the ``/``-separated spec paths."""

    def __init__(self, specs: dict[str, ParamSpec], dtype, key):
        keys = dict(zip(specs, jax.random.split(key, len(specs))))
        for path, spec in specs.items():
            node = self
            *parents, leaf = path.split("/")
            for name in parents:
                if not hasattr(node, name):
                    setattr(node, name, nnx.Module())
                node = getattr(node, name)
            setattr(node, leaf, nnx.Param(spec.initialize(keys[path], dtype), logical_axes=spec.axes))


def get(tree, path: str):
    """The array at a ``/``-separated path of a module or nested dict of params."""
    node = tree
    for name in path.split("/"):
        node = node[name] if isinstance(node, dict) else getattr(node, name)
    return node[...] if isinstance(node, nnx.Variable) else node
