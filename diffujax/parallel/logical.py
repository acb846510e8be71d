"""Logical axis names -> mesh axes.

Models name every parameter dimension (``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``,
``vocab``, ``layers``, ``positions``) and the dimensions of the main activations and data
batches (``activation_*``) with logical names; a rule table maps each name to mesh axes (``data``,
``fsdp``, ``tensor``). Nothing else in the code knows about the mesh.

Weights and activations have names of their own, so each gets its own rule: FSDP shards the
weights' ``embed`` dimension, while the activations' hidden dimension (``activation_embed``)
stays whole whatever the batch is sharded over. A mesh axis shards at most one dimension of an
array: a table that maps two of one array's names onto the same mesh axis is an error (naming
both), never a silent drop of one of them.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
from jax.sharding import PartitionSpec as P

# FSDP shards parameters along `embed`; tensor parallelism shards heads, MLP and vocabulary; the
# batch is split over data x fsdp.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...] | str | None], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("positions", None),
)

# The logical names of the activations and data arrays the code constrains.
BATCH = ("activation_batch", "activation_length")  # tokens and the other [B, L] batch fields
HIDDEN = BATCH + ("activation_embed",)  # the residual stream [B, L, D]
QUERY = BATCH + ("activation_heads", "activation_head_dim")  # attention q [B, L, H, D]
LOGITS = BATCH + ("activation_vocab",)  # [B, L, V]
ACTIVATIONS = (BATCH, HIDDEN, QUERY, LOGITS)

_RULES: contextvars.ContextVar = contextvars.ContextVar("diffujax_logical_rules", default=None)


@contextlib.contextmanager
def rules_in_effect(rules):
    """Make ``rules`` the table that activation constraints read (they are no-ops when none is).
    Entered through ``parallel.mesh.Layout.active``, which sets jax's mesh at the same time."""
    token = _RULES.set(tuple(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


def spec_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one rule target or ``PartitionSpec`` entry (a name, a tuple or None)."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _targets(rules: dict, name) -> tuple[str, ...]:
    return spec_axes(rules.get(name) if name is not None else None)


def check_collisions(names, rules) -> None:
    """ValueError when ``rules`` map two of the logical ``names`` of one array onto one mesh axis
    (a mesh axis can shard only one dimension of an array)."""
    rules, owner = dict(rules), {}
    for name in names:
        for axis in _targets(rules, name):
            if axis in owner:
                raise ValueError(f"logical axes {tuple(names)}: mesh axis {axis!r} is mapped from"
                                 f" both {owner[axis]!r} and {name!r}; give them different mesh"
                                 " axes in the rule table (mesh.rules)")
            owner[axis] = name


def logical_to_spec(names, rules=None, mesh_axes=None) -> P:
    """PartitionSpec for a tuple of logical names; axes missing from the mesh or of size 1 are
    skipped. Two names mapped onto one mesh axis are an error (``check_collisions``).
    ``rules=None``: the table in effect (the one ``Layout.active`` activated, else
    ``DEFAULT_RULES``), the one meaning of "no rules given" for every caller that passes its
    ``rules`` on."""
    rules = dict((_RULES.get() or DEFAULT_RULES) if rules is None else rules)
    check_collisions(names, rules)
    spec = []
    for name in names:
        axes = tuple(a for a in _targets(rules, name)
                     if mesh_axes is None or mesh_axes.get(a, 1) > 1)
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
