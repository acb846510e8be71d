"""One abstract description per weight drives initialisation, sharding and the checkpoint key map.

A family declares ``param_specs(config) -> {"path/to/weight": ParamSpec}``. The parameters
themselves are a plain pytree: nested dicts of arrays laid out as those ``/``-separated paths
(``params["layers"]["wq"]`` is the weight of spec ``"layers/wq"``), the same tree in memory, in
the optimizer state, in a checkpoint and in the converters. Per-layer weights are stacked on a
leading ``layers`` axis so the forward pass is one ``lax.scan`` (compile time independent of
depth; slice ``i`` is Hugging Face layer ``i``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

Params = dict  # nested {name: dict | array}, keyed by the ParamSpec paths


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


def nest(flat: Mapping[str, Any]) -> Params:
    """``{"layers/wq": x}`` -> ``{"layers": {"wq": x}}``."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return out


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Inverse of ``nest``: ``{"layers/wq": x}`` (a flat dict is returned as it is)."""
    out = {}
    for name, value in tree.items():
        path = f"{prefix}{name}"
        if isinstance(value, Mapping):
            out.update(flatten(value, path + "/"))
        else:
            out[path] = value
    return out


def map_specs(fn: Callable[[str, ParamSpec], Any], specs: Mapping[str, ParamSpec]) -> Params:
    """The parameter tree of ``fn(path, spec)`` for every weight of ``specs``."""
    return nest({path: fn(path, spec) for path, spec in specs.items()})


def init_params(specs: Mapping[str, ParamSpec], dtype, key) -> Params:
    """Every weight initialised as its spec says; one key per weight, split in table order."""
    keys = dict(zip(specs, jax.random.split(key, len(specs))))
    return map_specs(lambda path, spec: spec.initialize(keys[path], dtype), specs)


def abstract_params(specs: Mapping[str, ParamSpec], dtype) -> Params:
    """The parameter tree as ``ShapeDtypeStruct`` s: no memory (restore targets, compiling)."""
    return map_specs(lambda _, spec: jax.ShapeDtypeStruct(spec.shape, jnp.dtype(dtype)), specs)
