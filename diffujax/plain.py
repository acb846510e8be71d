"""Python objects as plain JSON / YAML data: the one place they are converted.

- ``to_plain``: configs and metadata for people and files (dataclasses -> dicts, tuples -> lists,
  numpy / jax scalars -> numbers, paths -> strings). Lossy: tuples come back as lists, which
  the readers (config loading, ``model_config_from_dict``) turn back by their field types.
- ``to_tagged`` / ``from_tagged``: an exact round trip for state whose structure must come back
  as it was (grain iterator states: tuples and int-keyed dicts), tagged in the JSON.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np


def to_plain(obj) -> Any:
    """``obj`` as JSON-able data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, np.generic) or (hasattr(obj, "__array__") and np.ndim(obj) == 0):
        return np.asarray(obj).item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def to_tagged(x) -> Any:
    """Tuples and dicts with non-string keys tagged so ``from_tagged`` restores them exactly."""
    if isinstance(x, tuple):
        return {"__tuple__": [to_tagged(v) for v in x]}
    if isinstance(x, list):
        return [to_tagged(v) for v in x]
    if isinstance(x, dict):
        if all(isinstance(k, str) for k in x):
            return {k: to_tagged(v) for k, v in x.items()}
        return {"__items__": [[to_tagged(k), to_tagged(v)] for k, v in x.items()]}
    if isinstance(x, np.generic):
        return x.item()
    return x


def from_tagged(x) -> Any:
    if isinstance(x, dict):
        if set(x) == {"__tuple__"}:
            return tuple(from_tagged(v) for v in x["__tuple__"])
        if set(x) == {"__items__"}:
            return {from_tagged(k): from_tagged(v) for k, v in x["__items__"]}
        return {k: from_tagged(v) for k, v in x.items()}
    if isinstance(x, list):
        return [from_tagged(v) for v in x]
    return x
