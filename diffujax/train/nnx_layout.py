"""Reading training checkpoints saved while the model was an NNX module (diffujax before the
parameters became a plain tree).

Then every parameter tree in the training state (``params``, ``ema`` and each optimizer moment)
was an ``nnx.State``, which orbax stored with two extra levels: the module attribute holding the
weights (``params``) above the weight table, and a ``value`` under each weight::

    params/params/layers/wq/value            (now: params/layers/wq)
    opt_state/1/0/mu/params/embed/value      (now: opt_state/1/0/mu/embed)

Such a step is restored into a target of its own stored layout, carrying today's shardings, so no
array is read twice or gathered; then each array moves to its place in today's state, and the
checksums saved with the step are verified under the arrays' new names. The files on disk are
left as they are; the run's next save is in today's layout.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax

from diffujax.checkpoint.errors import CheckpointError
from diffujax.checkpoint.integrity import array_name

MODULE, VALUE = "params", "value"


def _is_variable(node) -> bool:
    return isinstance(node, Mapping) and set(node) == {VALUE} and not isinstance(node[VALUE],
                                                                                  Mapping)


def _is_module(node) -> bool:
    """``{"params": tree of variables}``: one parameter tree of the NNX layout."""
    if not (isinstance(node, Mapping) and set(node) == {MODULE}):
        return False
    leaves = jax.tree_util.tree_leaves(node[MODULE], is_leaf=_is_variable)
    return bool(leaves) and all(_is_variable(x) for x in leaves)


def current_names(stored) -> dict[str, str]:
    """Stored name -> today's name of every array of a saved state tree (orbax metadata or
    restored nested dicts and lists; names as ``array_name`` writes them). Identical names for a
    state in today's layout."""
    names = {}

    def walk(node, old, new):
        if _is_variable(node):
            names["/".join(old)] = "/".join(new)
        elif _is_module(node):
            walk(node[MODULE], old + [MODULE], new)
        elif isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, old + [str(key)], new + [str(key)])
        elif isinstance(node, (list, tuple)):
            for index, value in enumerate(node):
                walk(value, old + [str(index)], new + [str(index)])
        elif node is not None:
            names["/".join(old)] = "/".join(new)

    walk(stored, [], [])
    return names


def renaming(stored) -> dict[str, str] | None:
    """``current_names`` of a saved state tree in the NNX layout; None for one in today's."""
    names = current_names(stored)
    return names if any(old != new for old, new in names.items()) else None


def unwrap_params(stored: Mapping) -> dict:
    """A parameter tree of the NNX layout (``{"params": {..{"value": x}}}``) in today's form."""
    inner = stored[MODULE] if _is_module(stored) else stored
    return jax.tree_util.tree_map(lambda v: v[VALUE], dict(inner), is_leaf=_is_variable)


def current_checksums(integrity: Mapping | None, names: Mapping[str, str]) -> Mapping | None:
    """A step's integrity record with its array names (the stored layout's) renamed to today's
    (``names``: ``current_names`` of the stored tree), so the checksums verify against the state
    in today's layout."""
    if not integrity or "arrays" not in integrity:
        return integrity
    arrays = {names.get(k, k): v for k, v in integrity["arrays"].items()}
    return dict(integrity, arrays=arrays)


def _named_leaves(tree) -> dict[str, Any]:
    return {array_name(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def stored_target(stored: Mapping, abstract_state, names: Mapping[str, str]):
    """A restore target shaped like the stored tree (plain dicts and lists), each leaf the
    ``ShapeDtypeStruct`` (with sharding) of the array it becomes in ``abstract_state``."""
    wanted = _named_leaves(abstract_state)
    missing = sorted(set(wanted) - set(names.values()))
    if missing:
        raise CheckpointError(f"an NNX-layout checkpoint lacks {missing[:3]} of the current"
                              " training state")

    def leaf(path, meta):
        stored_name = array_name(path)
        want = wanted.get(names[stored_name])
        if want is None:
            raise CheckpointError(f"array {stored_name!r} of an NNX-layout checkpoint has no"
                                  " place in the current training state (another optimizer or"
                                  " model?)")
        if tuple(meta.shape) != tuple(want.shape):
            raise CheckpointError(f"array {stored_name!r} has shape {tuple(meta.shape)}, the"
                                  f" current training state expects {tuple(want.shape)}")
        return jax.ShapeDtypeStruct(want.shape, want.dtype, sharding=want.sharding)

    return jax.tree_util.tree_map_with_path(
        leaf, stored, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


def to_current(restored, abstract_state, names: Mapping[str, str]):
    """The restored stored-layout tree as a tree of ``abstract_state`` 's structure."""
    by_name = {names[name]: x for name, x in _named_leaves(restored).items()}
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
    return jax.tree_util.tree_unflatten(treedef, [by_name[array_name(p)] for p, _ in paths])
