"""Logical axis names -> mesh axes.

Models name every parameter dimension and the main activations with logical names (batch, length,
embed, heads, kv_heads, head_dim, mlp, vocab, layers). A rule table maps each name to mesh axes
(``data``, ``fsdp``, ``tensor``). Nothing else in the code knows about the mesh.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
from jax.sharding import PartitionSpec as P

# FSDP shards parameters along `embed`; tensor parallelism shards heads, MLP and vocabulary.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...] | str | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("positions", None),
)

_RULES: contextvars.ContextVar = contextvars.ContextVar("diffujax_logical_rules", default=None)


@contextlib.contextmanager
def axis_rules(rules=DEFAULT_RULES):
    """Activate a rule table (activation constraints are no-ops when none is active)."""
    token = _RULES.set(tuple(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


def active_rules():
    """The rule table in effect: the one ``axis_rules`` activated, else ``DEFAULT_RULES``."""
    return _RULES.get() or DEFAULT_RULES


def logical_to_spec(names, rules=None, mesh_axes=None) -> P:
    """PartitionSpec for a tuple of logical names. A mesh axis is used at most once (the first
    dimension to claim it wins), and axes missing from the mesh or of size 1 are skipped."""
    rules = dict(rules if rules is not None else (_RULES.get() or DEFAULT_RULES))
    used: set[str] = set()
    spec = []
    for name in names:
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and (mesh_axes is None or mesh_axes.get(a, 1) > 1))
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def constrain(x, names):
    """Sharding constraint on an activation by logical names; identity outside a mesh/rules."""
    rules = _RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh is None or mesh.empty:
        return x
    spec = logical_to_spec(names, rules, dict(zip(mesh.axis_names, mesh.axis_sizes)))
    return jax.lax.with_sharding_constraint(x, spec)
