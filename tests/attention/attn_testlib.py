"""Shared helpers for the attention tests: inputs, patterns, and kernel-vs-reference checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffujax.attention.pattern import AttentionPattern, annealed, causal, full
from diffujax.attention.reference import reference_attention

PATTERN_NAMES = ("causal", "full", "annealed_r0", "annealed_r0.3", "annealed_r1")


def make_pattern(name: str, segment_ids=None, seed: int = 11, step: int = 5) -> AttentionPattern:
    if name == "causal":
        return causal(segment_ids)
    if name == "full":
        return full(segment_ids)
    ratio = float(name.split("_r")[1])
    return annealed(seed, step, ratio, segment_ids)


def segment_ids(batch: int, length: int) -> jax.Array:
    """Row 0: three contiguous segments; row 1: ids that repeat non-contiguously (7, 3, 7)."""
    rows = []
    for r in range(batch):
        a, b = length // 3, (2 * length) // 3
        if r % 2 == 0:
            row = [0] * a + [1] * (b - a) + [2] * (length - b)
        else:
            row = [7] * a + [3] * (b - a) + [7] * (length - b)
        rows.append(row)
    return jnp.asarray(np.array(rows, np.int32))


def two_stream_segment_ids(batch: int, stream_len: int) -> jax.Array:
    """Segment ids of a two-stream ``[x_t ; x_0]`` input: a row's ids, twice."""
    seg = segment_ids(batch, stream_len)
    return jnp.concatenate([seg, seg], axis=1)


# Block-diffusion patterns of the kernel tests (name, kind, block_size, stream_len, segmented):
# one stream in blocks, and two streams of 20 (length 40) with blocks that divide the stream (5)
# and blocks that do not (6, 8).
BLOCKED_CASES = [("blocks6-full-seg", "full", 6, 0, True),
                 ("blocks6-annealed", "annealed_r0.3", 6, 0, False),
                 ("two-stream-b5-causal", "causal", 5, 20, False),
                 ("two-stream-b8-full-seg", "full", 8, 20, True),
                 ("two-stream-b6-annealed-seg", "annealed_r0.3", 6, 20, True)]


def blocked_pattern(case, batch: int, length: int) -> AttentionPattern:
    _, name, block, stream, segmented = case
    seg = None
    if segmented:
        seg = two_stream_segment_ids(batch, stream) if stream else segment_ids(batch, length)
    return make_pattern(name, seg).with_blocks(block, stream)


def make_inputs(batch, length, heads, kv_heads, dim, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)  # numpy: no compilation per shape
    shapes = [(batch, length, heads, dim), (batch, length, kv_heads, dim),
              (batch, length, kv_heads, dim), (batch, length, heads, dim)]
    return tuple(jnp.asarray(rng.standard_normal(s, np.float32)).astype(dtype) for s in shapes)


def out_and_grads(fn, pattern, q, k, v, do):
    """``(o, dq, dk, dv)`` of ``fn(q, k, v, pattern)`` under one jit (one compilation)."""
    @jax.jit
    def run(q, k, v, do, pattern):
        o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, pattern), q, k, v)
        return (o, *vjp(do))
    return run(q, k, v, do, pattern)


def check_against_reference(fn, pattern, q, k, v, do, atol=3e-5, rtol=1e-5):
    got = out_and_grads(fn, pattern, q, k, v, do)
    want = out_and_grads(reference_attention, pattern, q, k, v, do)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape)
        g32, w32 = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.all(np.isfinite(g32)), name
        np.testing.assert_allclose(g32, w32, atol=atol, rtol=rtol, err_msg=name)


def mask_reader(fn):
    """A jitted ``(pattern, length, batch) -> [B, L, L] bool``: which keys each query attended to.

    q = k = 0 makes every open score equal, so the softmax is uniform over the open keys and
    exactly 0 on closed ones; v = identity (D = L) writes row i's probabilities into out[i].
    """
    run = jax.jit(lambda q, v, p: fn(q, q, v, p))

    def read(pattern, length: int, batch: int = 1):
        q = jnp.zeros((batch, length, 1, length), jnp.float32)
        v = jnp.broadcast_to(jnp.eye(length, dtype=jnp.float32)[None, :, None, :],
                             (batch, length, 1, length))
        return np.asarray(run(q, v, pattern)[:, :, 0, :]) > 0  # [B, L, L]
    return read
