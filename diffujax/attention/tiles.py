"""Which tiles of an attention pattern can hold an open entry, from integer bounds alone.

A flash kernel works on tiles: queries ``[q_lo, q_hi]`` x keys ``[k_lo, k_hi]``. Before it loads
a tile it must know, from scalars only (program ids and the SMEM threshold), whether the tile can
hold an open entry (else skip it and re-point its DMA at a block already resident) and whether
every entry is open (else evaluate ``pattern.is_open`` on it). ``TileRule`` answers both for
every pattern of ``pattern.py``: plain, in blocks, and the two-stream ``[x_t ; x_0]`` input of
block diffusion (docs/algorithms.md §9). It never evaluates the mask; ``tests/attention/
test_block_skipping.py`` checks it against ``dense_mask`` tile by tile.

Positions ``p`` are indices inside a stream (two streams: a clean key or query ``x`` has position
``x - S``). With ``start(p)`` / ``end(p)`` the first / last position of ``p``'s block (the whole
stream when there are no blocks), a query at ``p`` sees, in its own stream:

- keys ``[start(p), hi(p)]`` of its own block and every earlier key, with ``hi(p) = p`` when the
  inside of a block is causal and ``end(p)`` when it is full (``annealed``: causal at ratio 0,
  full at ratio 1, in between either bound as needed);
- a noisy query additionally sees clean keys ``[0, start(p) - 1]`` and no earlier noisy block;
  a clean query sees no noisy key.

So the keys a range of queries sees, and the queries that see a range of keys, are at most two
intervals each (the noisy ones, then the clean ones; a single stream has only the second), and a
tile is open throughout iff it lies in one quadrant (noisy/clean queries x keys) and its corner
that the rule opens last is open. Integer division is ``lax.div`` (truncating; every operand is
non-negative): ``//`` lowers through ``sign``, which Mosaic's scalar unit lacks.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from diffujax.attention.pattern import FULL_THRESHOLD

EMPTY_LO = 1 << 30  # an empty span is (EMPTY_LO, -1): min/max of spans then give their hull


def _i32(x):
    return jnp.asarray(x, jnp.int32)


@dataclasses.dataclass(frozen=True)
class TileRule:
    """The static part of a pattern, as the kernels see it. ``seq_len``: the real length (``2 *
    stream_len`` for two streams); keys and queries at or past it are padding, never open."""
    kind: str
    block_size: int
    stream_len: int
    seq_len: int

    def __post_init__(self):
        if self.stream_len and self.seq_len != 2 * self.stream_len:
            raise ValueError(f"a two-stream attention pattern (stream_len {self.stream_len}) "
                             f"needs length {2 * self.stream_len}, got {self.seq_len}")

    # -- the per-stream bounds of the module docstring -----------------------------------------

    @property
    def _stream_end(self) -> int:
        return (self.stream_len or self.seq_len) - 1

    def _start(self, p):
        n = self.block_size
        return lax.mul(lax.div(p, _i32(n)), _i32(n)) if n else jnp.zeros_like(p)

    def _end(self, p):
        n = self.block_size
        last = _i32(self._stream_end)
        return jnp.minimum(self._start(p) + (n - 1), last) if n else jnp.broadcast_to(last, p.shape)

    def _hi(self, p, wide):
        return jnp.where(wide, self._end(p), p)

    def _lo(self, p, wide):
        return jnp.where(wide, self._start(p), p)

    def _wide(self, thr, upper: bool):
        """Is the inside of a block bounded by the full rule? ``upper``: for "may be open"
        (annealed above ratio 0), else for "surely open" (annealed at ratio 1 only)."""
        if self.kind == "full":
            return jnp.bool_(True)
        if self.kind == "causal":
            return jnp.bool_(False)
        return (thr > 0) if upper else (thr >= FULL_THRESHOLD)

    # -- spans ---------------------------------------------------------------------------------

    @staticmethod
    def _span(present, lo, hi):
        # int32 operands: Triton's lowering mistypes a select between two Python ints.
        return (jnp.where(present, _i32(lo), _i32(EMPTY_LO)),
                jnp.where(present, _i32(hi), _i32(-1)))

    def key_spans(self, thr, q_lo, q_hi):
        """The keys queries ``[q_lo, q_hi]`` may see: ``((lo, hi), (lo, hi))``, noisy keys then
        clean (one stream: the first is empty). Exact for causal/full and annealed at ratio 0."""
        wide = self._wide(thr, upper=True)
        a, b = _i32(q_lo), jnp.minimum(_i32(q_hi), self.seq_len - 1)
        real = a <= b
        s = self.stream_len
        if not s:
            return self._span(False, a, b), self._span(real, 0, self._hi(b, wide))
        noisy, clean = real & (a < s), real & (b >= s)
        b_noisy = jnp.minimum(b, s - 1)
        own = self._span(noisy, self._start(a), self._hi(b_noisy, wide))
        # Clean keys: the earlier blocks of a noisy query, the block-causal prefix of a clean one.
        last = jnp.maximum(jnp.where(noisy, self._start(b_noisy) - 1, -1),
                           jnp.where(clean, self._hi(b - s, wide), -1))
        return own, self._span(last >= 0, s, s + last)

    def query_spans(self, thr, k_lo, k_hi):
        """The queries that may see keys ``[k_lo, k_hi]``: noisy queries, then clean ones."""
        wide = self._wide(thr, upper=True)
        c, d = _i32(k_lo), jnp.minimum(_i32(k_hi), self.seq_len - 1)
        real = c <= d
        s = self.stream_len
        if not s:
            return self._span(False, c, d), self._span(real, self._lo(c, wide), self.seq_len - 1)
        noisy, clean = real & (c < s), real & (d >= s)
        own_lo, own_hi = self._span(noisy, self._lo(c, wide), self._end(jnp.minimum(d, s - 1)))
        c_clean = jnp.maximum(c, s) - s
        later = self._start(c_clean) + self.block_size  # noisy queries of a later block
        later_lo, later_hi = self._span(clean & (later < s), later, s - 1)
        noisy_span = jnp.minimum(own_lo, later_lo), jnp.maximum(own_hi, later_hi)
        return noisy_span, self._span(clean, s + self._lo(c_clean, wide), 2 * s - 1)

    # -- whole tiles ---------------------------------------------------------------------------

    def fully_open(self, thr, q_lo, q_hi, k_lo, k_hi):
        """Is every entry of the tile open (by the pattern; segment ids aside)?"""
        wide = self._wide(thr, upper=False)
        a, b, c, d = (_i32(x) for x in (q_lo, q_hi, k_lo, k_hi))
        real_keys = d < self.seq_len
        s = self.stream_len
        if not s:
            return real_keys & (d <= self._hi(a, wide))
        noisy_q, clean_q = b < s, a >= s
        noisy_k, clean_k = d < s, c >= s
        own = noisy_q & noisy_k & (c >= self._start(b)) & (d <= self._hi(a, wide))
        earlier = noisy_q & clean_k & (d - s < self._start(a))
        clean = clean_q & clean_k & (d - s <= self._hi(a - s, wide))
        return real_keys & (own | earlier | clean)


def tile_range(span, tile: int):
    """A key or query span as the tiles of size ``tile`` it touches: ``(first, last)``."""
    lo, hi = span
    return lax.div(lo, _i32(tile)), lax.div(jnp.maximum(hi, 0), _i32(tile))


def tile_runs(spans, j, tile: int):
    """Does tile ``j`` touch either span?"""
    hit = jnp.bool_(False)
    for lo, hi in spans:
        first, last = tile_range((lo, hi), tile)
        hit = hit | ((lo <= hi) & (first <= j) & (j <= last))
    return hit


def tile_to_load(spans, j, tile: int):
    """The tile to DMA at grid step ``j`` when the steps walk tiles in order: ``j`` itself when
    it touches a span, else the last touched tile before it (already resident: no copy), or the
    first one after it when there is none yet (loaded once, then used)."""
    (l1, h1), (l2, h2) = spans
    has1, has2 = l1 <= h1, l2 <= h2
    first1, last1 = tile_range((l1, h1), tile)
    first2, last2 = tile_range((l2, h2), tile)
    first1, last1 = jnp.where(has1, first1, first2), jnp.where(has1, last1, last2)
    first2, last2 = jnp.where(has2, first2, first1), jnp.where(has2, last2, last1)
    r = jnp.maximum(j, first1)
    r = jnp.where((r > last1) & (r < first2), last1, r)
    r = jnp.minimum(r, last2)
    return jnp.where(has1 | has2, r, 0)
