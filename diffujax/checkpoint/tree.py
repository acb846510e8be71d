"""diffujax parameters in three shapes: a flat ``{spec path: array}`` dict (what the converters and
the on-disk checkpoint use), a nested dict, and the model's ``nnx.State``."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from diffujax.models import abstract_model, param_specs
from diffujax.models.configs import ModelConfig


def nest(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return out


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for name, value in tree.items():
        path = f"{prefix}{name}"
        if isinstance(value, Mapping):
            out.update(flatten(value, path + "/"))
        else:
            out[path] = value
    return out


def abstract_state(config: ModelConfig) -> nnx.State:
    """The model's parameter state with ShapeDtypeStruct leaves (no memory)."""
    return nnx.split(abstract_model(config), nnx.Param)[1]


def state_paths(config: ModelConfig) -> dict[str, str]:
    """spec path ("layers/wq") -> path in the model's state ("params/layers/wq").

    Matching by suffix keeps the on-disk layout equal to the weight table of ``param_specs``
    whatever attribute the model keeps its parameter tree under."""
    in_state = list(flatten(nnx.to_pure_dict(abstract_state(config))))
    out = {}
    for spec_path in param_specs(config):
        found = [p for p in in_state if p == spec_path or p.endswith("/" + spec_path)]
        if len(found) != 1:
            raise RuntimeError(f"parameter {spec_path!r} is not uniquely in the model state: {found}")
        out[spec_path] = found[0]
    return out


def to_state(config: ModelConfig, flat: Mapping[str, Any]) -> nnx.State:
    """Flat ``{spec path: array}`` -> the model's ``nnx.State`` (arrays become jax arrays)."""
    state = abstract_state(config)
    paths = state_paths(config)
    nnx.replace_by_pure_dict(state, nest({paths[k]: jax.numpy.asarray(v) for k, v in flat.items()}))
    return state


def from_state(config: ModelConfig, params) -> dict[str, Any]:
    """The model's ``nnx.State`` (or a nested / flat dict of it) -> flat ``{spec path: array}``."""
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    flat = flatten(params)
    paths = state_paths(config)
    if set(paths).issubset(flat):
        return {k: flat[k] for k in paths}
    missing = [v for v in paths.values() if v not in flat]
    if missing:
        raise ValueError(f"parameters lack {missing[:3]} for a {config.family} model")
    return {k: flat[v] for k, v in paths.items()}


def merge_model(config: ModelConfig, params: nnx.State) -> nnx.Module:
    """A runnable model from a config and its parameter state (no random initialisation)."""
    graphdef = nnx.split(abstract_model(config), nnx.Param)[0]
    return nnx.merge(graphdef, params)


def to_numpy(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))
