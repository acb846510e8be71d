"""One abstract description per weight drives initialisation, sharding and the checkpoint key map.

A family declares ``param_specs(config) -> {"path/to/weight": ParamSpec}``: the weight table.
Its paths are the paths of the family's Flax NNX module tree (``"layers/attn/q_proj/kernel"`` is
the kernel of the query projection of the stacked ``layers`` block), and the modules take their
weights from the table through ``Weights`` (a module can only create a weight the table
describes, and a model that leaves one unused is an error). Outside a module the parameters are
a plain pytree, nested dicts of arrays laid out as those paths (``nnx.to_pure_dict`` of the
model's state): the same tree in the optimizer state, in a checkpoint and in the converters. Per-layer weights are
stacked on a leading ``layers`` axis so the forward pass is one scan (compile time independent
of depth; slice ``i`` is Hugging Face layer ``i``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

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


class Weights:
    """The weight table seen from one module: ``param(name)`` creates the ``nnx.Param`` of the
    table's entry at this module's path, initialised as the entry says and carrying its logical
    axes as the variable's ``out_sharding`` metadata (eager sharding off: shardings come from the
    rule table, ``models.param_shardings``). One key per weight, split in table order from the
    model's key, so a weight's initial value does not depend on how modules are nested."""

    def __init__(self, specs: Mapping[str, ParamSpec], dtype, key, prefix: str = "",
                 _used: set | None = None):
        self._specs, self._dtype, self._prefix = specs, jnp.dtype(dtype), prefix
        self._keys = key if isinstance(key, dict) else dict(
            zip(specs, jax.random.split(key, len(specs))))
        self._used = set() if _used is None else _used

    def child(self, name: str) -> "Weights":
        """The view of submodule ``name``."""
        return Weights(self._specs, self._dtype, self._keys, f"{self._prefix}{name}/",
                       self._used)

    def param(self, name: str) -> nnx.Param:
        path = self._prefix + name
        if path not in self._specs:
            raise KeyError(f"weight {path!r} is not in the family's weight table")
        spec = self._specs[path]
        self._used.add(path)
        return nnx.Param(spec.initialize(self._keys[path], self._dtype), out_sharding=spec.axes,
                         eager_sharding=False)

    def optional(self, name: str) -> nnx.Param | None:
        """The weight if the table has it here (Qwen2's q/k/v biases, an untied head), else
        None."""
        return self.param(name) if self._prefix + name in self._specs else None

    def check_complete(self, owner: str) -> None:
        """Raise if a weight of the table was never asked for: the module tree and the table
        must describe the same weights."""
        unused = sorted(set(self._specs) - self._used)
        if unused:
            raise ValueError(f"{owner} does not use weight(s) {unused} of its weight table")


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

