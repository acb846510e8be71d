"""Checksums of saved arrays (training states and model checkpoints): any damage to a saved
array makes its checkpoint unusable.

Each array's checksum is a pair of uint32 sums over its raw bits (the words ``w_i`` of its
little-endian bytes at global flat position ``i``)::

    (sum_i w_i,  sum_i w_i * (2 i + 1))   mod 2**32

Both are sums of per-element terms, so each device reduces the shard it holds and only two words
per array cross the interconnect: one jitted program over the whole state, computed where the
data is, a few elementwise ops and a reduction per array (cheap next to a step, on TPU or CPU).
Being sums over *global* positions, they do not depend on the sharding, so a step saved on one
topology verifies after a restore onto another. The first sum changes with any single changed
word; the position weights catch swapped or shifted words.

Small JSON records (the data-iterator state, the run config, the meta) get a SHA-256 of their
canonical JSON text instead (``json_digest``).
"""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (narrow types widened, 8-byte types split in two)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _position_weights(shape) -> jax.Array:
    """``2 i + 1`` for the global row-major index ``i`` of each element, built from per-axis iotas
    (no reshape, so a sharded operand stays where it is)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index * jnp.uint32(2) + jnp.uint32(1)


def _checksum(x: jax.Array) -> jax.Array:
    w = _words(x)
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32),
                      jnp.sum(w * _position_weights(w.shape), dtype=jnp.uint32)])


@jax.jit
def _checksums(leaves):
    return [_checksum(x) for x in leaves]


def checksums(tree) -> dict[str, list[int]]:
    """``{array name: [sum, weighted sum]}`` of every array leaf of ``tree`` (device arrays,
    sharded or not, or host numpy arrays)."""
    # ``params/layers/attn/q_proj/kernel`` for a key path
    named = [(jax.tree_util.keystr(p, simple=True, separator="/"), x)
             for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
             if hasattr(x, "shape") and hasattr(x, "dtype")]
    out = {}
    for members in by_device_set(named):
        values = [local_value(v) for v in _checksums([x for _, x in members])]
        out.update({name: [int(v[0]), int(v[1])] for (name, _), v in zip(members, values)})
    return out


def by_device_set(named) -> list[list]:
    """``(name, array)`` pairs grouped by the set of devices each array lives on (host arrays:
    one group): one jitted program per group, since a call cannot mix them."""
    groups: dict = {}
    for name, x in named:
        devices = getattr(getattr(x, "sharding", None), "device_set", None)
        groups.setdefault(tuple(sorted(d.id for d in devices)) if devices else (), []).append(
            (name, x))
    return list(groups.values())


def local_value(x) -> np.ndarray:
    """A replicated result as a host array, also on a multi-host run (where the array is not
    fully addressable and ``device_get`` refuses it): this process's copy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))


def first_mismatch(stored: dict, actual: dict, prefix: str = "") -> str | None:
    """The name of the first array (under ``prefix``) whose checksum differs from the stored
    one, or that is missing on either side; None when all agree."""
    wanted = {k: v for k, v in stored.items() if k.startswith(prefix)}
    got = {k: v for k, v in actual.items() if k.startswith(prefix)}
    for name in sorted(set(wanted) | set(got)):
        if wanted.get(name) != got.get(name):
            return name
    return None


def json_digest(obj) -> str:
    """SHA-256 of ``obj``'s canonical JSON text (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


__all__ = ["checksums", "first_mismatch", "json_digest"]
