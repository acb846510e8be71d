"""Attention patterns: which key positions each query may see.

A pattern is a small pytree: a static ``kind`` (causal | full | annealed), three int32 scalars
(``seed``, ``step``, ``threshold``) and optional ``segment_ids``. Scalars are traced values, so a
new step or annealing ratio never recompiles anything.

Block diffusion (docs/algorithms.md §9) adds two static integers. ``block_size = N > 0`` cuts the
sequence into blocks of ``N`` positions (block of index ``i`` is ``i // N``): a query sees every key
of an earlier block and, inside its own block, the keys ``kind`` allows (``full``: all of them;
``causal``: ``k <= q``; ``annealed``: causal plus the hashed entries). ``stream_len = S > 0``
says the sequence is the two-stream training input ``[x_t ; x_0]`` of length ``2 S``: a noisy
query (``q < S``) sees its own noisy block (by ``kind``) and the *clean* earlier blocks
(``k >= S``); a clean query sees the clean stream block-causally (the same rule as the single
stream); no clean query sees the noisy stream. ``block_size = 0`` is the whole sequence as one
block: today's full-sequence recipe, unchanged.

The annealed pattern (docs/algorithms.md §3) keeps the causal part always open and opens each future
entry ``(i, j > i)`` when a counter-based hash of ``(seed, step, i, j)`` falls under the ratio.
``is_open`` is the single definition of that rule: the dense mask used by the reference attention
and the kernels (which evaluate it per tile, in-kernel) both call it, so they agree bit for bit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

KINDS = ("causal", "full", "annealed")
# The ratio is resolved to 24 bits: entry open iff (hash >> 8) < threshold, threshold in [0, 2^24].
FULL_THRESHOLD = 1 << 24


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionPattern:
    kind: str = dataclasses.field(default="causal", metadata=dict(static=True))
    seed: jax.Array | int = 0
    step: jax.Array | int = 0
    threshold: jax.Array | int = 0
    segment_ids: jax.Array | None = None  # [B, L] int32; attention stays inside a segment
    block_size: int = dataclasses.field(default=0, metadata=dict(static=True))  # 0: no blocks
    stream_len: int = dataclasses.field(default=0, metadata=dict(static=True))  # 0: one stream

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"attention pattern kind {self.kind!r} is not one of {KINDS}")
        if self.block_size < 0 or self.stream_len < 0:
            raise ValueError(f"attention pattern block_size {self.block_size} and stream_len "
                             f"{self.stream_len} must be >= 0")
        if self.stream_len and not self.block_size:
            raise ValueError("a two-stream attention pattern (stream_len > 0) needs block_size")

    @property
    def blocked(self) -> bool:
        return self.block_size > 0

    def with_blocks(self, block_size: int, stream_len: int = 0) -> "AttentionPattern":
        """This pattern inside blocks of ``block_size`` (two-stream when ``stream_len > 0``)."""
        return dataclasses.replace(self, block_size=block_size, stream_len=stream_len)


def causal(segment_ids=None) -> AttentionPattern:
    return AttentionPattern("causal", segment_ids=segment_ids)


def full(segment_ids=None) -> AttentionPattern:
    return AttentionPattern("full", segment_ids=segment_ids)


def annealed(seed, step, ratio, segment_ids=None) -> AttentionPattern:
    ratio = jnp.clip(jnp.asarray(ratio, jnp.float32), 0.0, 1.0)
    return AttentionPattern("annealed", jnp.asarray(seed, jnp.int32), jnp.asarray(step, jnp.int32),
                            jnp.floor(ratio * FULL_THRESHOLD).astype(jnp.int32), segment_ids)


def anneal_ratio(step, anneal_steps: int) -> jax.Array:
    """``r(step) = min(1, (step + 1) / anneal_steps)``; ``anneal_steps = 0`` means full attention."""
    if anneal_steps <= 0:
        return jnp.float32(1.0)
    return jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / anneal_steps)


def anneal_end(anneal_steps: int) -> int:
    """The first (0-based) training step at ``r = 1``, where the annealed pattern is all open:
    ``anneal_steps - 1``; 0 without a ramp (``anneal_steps <= 1``)."""
    return max(anneal_steps - 1, 0)


def is_annealing(step: int, anneal_steps: int) -> bool:
    """The annealing phase of (0-based) training step ``step``, on the host: True while the ramp
    is below ``r = 1``. The train step takes it as a static argument, so the steps after the ramp
    compile with the plain full pattern (``for_training(..., annealing=False)``)."""
    return step < anneal_end(anneal_steps)


def for_training(step, anneal_steps: int, seed=0, segment_ids=None, *,
                 annealing: bool = True) -> AttentionPattern:
    """The pattern of training step ``step`` (docs/algorithms.md §3). ``annealing`` is the phase
    (``is_annealing``, static): ``False`` gives the plain full pattern, which computes what the
    annealed pattern at ``r = 1`` computes but lets the kernels take their full-attention paths
    (cuDNN, splash, no hash); ``True`` the annealed pattern at ``anneal_ratio(step)``, which is
    all open from ``anneal_end`` on, so it is right at every step."""
    if not annealing or anneal_steps <= 0:
        return full(segment_ids)
    return annealed(seed, step, anneal_ratio(step, anneal_steps), segment_ids)


def _fmix32(x):
    """murmur3's 32-bit finaliser: a cheap bijective avalanche on uint32 (wraps by design)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def pattern_hash(seed, step, q_idx, k_idx):
    """uint32 hash of ``(seed, step, query, key)``; broadcasts over its integer arguments.

    Only integer multiply, xor and shift: cheap on the TPU vector unit and exactly reproducible on
    every backend, which is the point (no hardware PRNG).
    """
    u = lambda v: jnp.asarray(v).astype(jnp.uint32)
    h = _fmix32(u(seed) * jnp.uint32(0x9E3779B9) + u(step))
    h = _fmix32(h ^ (u(q_idx) * jnp.uint32(0x27D4EB2F)))
    return _fmix32(h ^ (u(k_idx) * jnp.uint32(0x165667B1)))


def _kind_allows(pattern: AttentionPattern, q_idx, k_idx):
    """The ``kind`` rule alone (no blocks, no segments)."""
    if pattern.kind == "full":
        return jnp.ones(jnp.broadcast_shapes(q_idx.shape, k_idx.shape), bool)
    allowed = k_idx <= q_idx
    if pattern.kind == "annealed":
        bits = (pattern_hash(pattern.seed, pattern.step, q_idx, k_idx) >> 8).astype(jnp.int32)
        allowed = allowed | (bits < pattern.threshold)
    return allowed


def _floor_div(x, n: int):
    """``x // n`` for a static ``n > 0``, equal for every int, but lowered without ``sign`` (which
    Mosaic lowers only for a known chip): truncating division, shifted for negative ``x``."""
    x = jnp.asarray(x)
    return lax.div(x - (x < 0).astype(x.dtype) * (n - 1), jnp.asarray(n, x.dtype))


def _block_allows(pattern: AttentionPattern, q_idx, k_idx):
    """The block rules of the module docstring; indices are positions in the (1 or 2) streams."""
    n, s = pattern.block_size, pattern.stream_len
    if not s:
        q_blk, k_blk = _floor_div(q_idx, n), _floor_div(k_idx, n)
        return (k_blk < q_blk) | ((k_blk == q_blk) & _kind_allows(pattern, q_idx, k_idx))
    q_clean, k_clean = q_idx >= s, k_idx >= s
    q_pos = jnp.where(q_clean, q_idx - s, q_idx)
    k_pos = jnp.where(k_clean, k_idx - s, k_idx)
    q_blk, k_blk = _floor_div(q_pos, n), _floor_div(k_pos, n)
    # The hash sees stream positions, so the noisy and the clean stream anneal the same entries.
    own_block = (k_blk == q_blk) & _kind_allows(pattern, q_pos, k_pos)
    earlier = k_blk < q_blk
    # Boolean selects written as and/or: Mosaic cannot lower a select of i1 vectors.
    noisy = (k_clean & earlier) | (~k_clean & own_block)
    clean = k_clean & (earlier | own_block)
    return (q_clean & clean) | (~q_clean & noisy)


def is_open(pattern: AttentionPattern, q_idx, k_idx, q_seg=None, k_seg=None):
    """Boolean: may query ``q_idx`` attend to key ``k_idx``? Broadcasts; used in and out of kernels."""
    q_idx = jnp.asarray(q_idx)
    k_idx = jnp.asarray(k_idx)
    if pattern.block_size:
        allowed = _block_allows(pattern, q_idx, k_idx)
    else:
        allowed = _kind_allows(pattern, q_idx, k_idx)
    if q_seg is not None:
        allowed = allowed & (q_seg == k_seg)
    return allowed


def dense_mask(pattern: AttentionPattern, q_len: int, kv_len: int | None = None) -> jax.Array:
    """The dense boolean mask: ``[L, L]``, or ``[B, L, L]`` when the pattern has segment ids."""
    kv_len = q_len if kv_len is None else kv_len
    q = jnp.arange(q_len, dtype=jnp.int32)[:, None]
    k = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
    if pattern.segment_ids is None:
        return is_open(pattern, q, k)
    seg = jnp.asarray(pattern.segment_ids)
    return is_open(pattern, q[None], k[None], seg[:, :, None], seg[:, None, :])
