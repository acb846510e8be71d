"""Drawing tokens from model logits, exactly in float32 (docs/algorithms.md §6, last paragraph).

A float32 uniform has 2^-24 resolution near 1, so textbook Gumbel-max ``-log(-log(u))`` can never
produce the rare, very small ``-log(u)`` that lets a low-probability token win: the tail of the
distribution is cut and generated text looks better than the model is. Here a token is the winner
of an exponential race, ``argmax_j(logit_j - log E_j)`` with ``E_j ~ Exp(1)`` (the same as
Gumbel-max, ``P(j) = softmax(logits)_j``), and ``E`` is built from two 32-bit words so that it
keeps full float32 relative precision from 2^-64 up to about 44.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_TWO_POW_M32 = 2.0 ** -32
_TWO_POW_M64 = 2.0 ** -64
_LARGEST_BELOW_ONE = 1.0 - 2.0 ** -24


def uniform_from_bits(hi, lo) -> jax.Array:
    """``(hi * 2^32 + lo) * 2^-64`` in float32, clipped to ``[2^-64, 1)``: uniform on ``[0, 1)``
    with float32 relative precision at every scale down to 2^-64 (not just 2^-24 near 0)."""
    v = hi.astype(jnp.float32) * _TWO_POW_M32 + lo.astype(jnp.float32) * _TWO_POW_M64
    return jnp.clip(v, _TWO_POW_M64, _LARGEST_BELOW_ONE)


def exponential_from_bits(hi, lo) -> jax.Array:
    """Float32 ``Exp(1)`` from two uint32 words, with float32 relative precision at both ends.

    ``E = -log(1 - v)``: for ``v < 1/2`` as ``-log1p(-v)`` (small ``E``, the ones that let rare
    tokens win); for ``v >= 1/2`` as ``-log(w)`` with ``w = 1 - v`` built from the complemented
    bits, so that ``w`` keeps its precision where ``v`` is close to 1 (large ``E``).
    """
    lower_half = hi < jnp.uint32(1 << 31)
    v = uniform_from_bits(hi, lo)
    # 1 - v = ((2^32 - 1 - hi) * 2^32 + (2^32 - 1 - lo) + 1) * 2^-64, never 0
    w = (~hi).astype(jnp.float32) * _TWO_POW_M32 + ((~lo).astype(jnp.float32) + 1) * _TWO_POW_M64
    return jnp.where(lower_half, -jnp.log1p(-v), -jnp.log(w))


def exponential_draws(key, shape) -> jax.Array:
    """Float32 ``Exp(1)`` draws of ``shape`` (two random 32-bit words each)."""
    bits = jax.random.bits(key, (2, *shape), jnp.uint32)
    return exponential_from_bits(bits[0], bits[1])


def race_winner(logits, exponentials) -> jax.Array:
    """``argmax_j(logit_j - log E_j)`` over the last axis: a draw from ``softmax(logits)`` when
    ``E`` are independent ``Exp(1)`` (token ``j`` finishes at ``E_j / p_j``; the first one wins)."""
    return jnp.argmax(logits.astype(jnp.float32) - jnp.log(exponentials), axis=-1).astype(jnp.int32)


def sample_categorical(key, logits) -> jax.Array:
    """One token per row of ``logits [..., V]`` (unnormalised; ``-inf`` = forbidden), int32."""
    return race_winner(logits, exponential_draws(key, logits.shape))


def filter_logits(logits, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
    """Temperature, then top-k, then nucleus (top-p) filtering; filtered entries become ``-inf``.

    Top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p`` (the token
    that crosses it is kept, so at least one always survives).
    """
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth_largest, logits, -jnp.inf)
    if top_p is not None and top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # the smallest logit still inside the nucleus; everything below it goes
        cutoff = jnp.min(jnp.where(mass_before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return logits
