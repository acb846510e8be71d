"""The key/value cache of decoding (docs/algorithms.md §9): what a cached forward pass shares.

A ``KVCache`` holds every layer's keys and values, ``[layers, B, T, kv_heads, head_dim]``,
stacked on the layer axis so that it travels through ``scan_layers_cached`` beside the stacked
weights. A cached forward pass runs ``n`` new tokens at canvas positions ``offset ..
offset + n - 1``: each layer writes their keys and values into its slice of the cache at
``offset`` (in place: the cache is the scan's carry, never copied) and attends from the new
queries over the whole slice, under a mask that opens only keys below ``offset + n`` (the rest of
the cache is stale or empty) and, among those, what the attention pattern allows. Under a
block-causal pattern (``full().with_blocks(N)``) a committed block's keys and values are those a
full forward pass of the canvas computes, so decoding against the cache is exact.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from diffujax.attention.pattern import AttentionPattern, is_open
from diffujax.attention.reference import masked_attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [layers, B, T, kv_heads, head_dim]
    v: jax.Array  # same shape as k

    @property
    def length(self) -> int:
        return self.k.shape[2]


def visible_keys(pattern: AttentionPattern, offset, n: int, length: int) -> jax.Array:
    """Bool ``[n, length]``: may the query at canvas position ``offset + i`` see cache slot
    ``j``? Only slots below ``offset + n`` hold keys of this canvas; ``is_open`` decides the
    rest (the one definition of every pattern, docs/algorithms.md §9)."""
    q = offset + jnp.arange(n, dtype=jnp.int32)[:, None]
    k = jnp.arange(length, dtype=jnp.int32)[None, :]
    return (k < offset + n) & is_open(pattern, q, k)


def scan_layers_cached(block: nnx.Module, step, x, cache: KVCache, offset, visible):
    """``step(layer, x, attend) -> (x, cache)`` once per layer of the stacked ``block`` (as
    ``layers.scan_layers``), the cache carried.

    ``attend(q, k, v) -> (out, cache)`` is what the layer calls for its attention: it writes the
    new ``k``, ``v`` ``[B, n, KVH, D]`` into the layer's slice of the cache at ``offset`` and
    attends from ``q`` over that slice where ``visible``. Returns ``(x, updated cache)``."""
    graphdef, state = nnx.split(block)

    def body(carry, sliced):
        x, cache = carry
        layer_state, i = sliced

        def attend(q, k, v):
            at = (i, 0, offset, 0, 0)
            keys = jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), at)
            values = jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), at)
            # Plain XLA: a decoding pass is a few queries against the cache (memory-bound).
            out = masked_attention(q, keys[i].astype(q.dtype), values[i].astype(q.dtype),
                                   visible)
            return out, KVCache(keys, values)

        return step(nnx.merge(graphdef, layer_state), x, attend), None

    layers = cache.k.shape[0]
    (x, cache), _ = jax.lax.scan(body, (x, cache), (state, jnp.arange(layers)))
    return x, cache
