"""The forward (noising) process of absorbing-state diffusion, docs/algorithms.md §2 steps 1-2.

Every random draw for a sequence comes from ``fold_in(key, row)`` where ``row`` is the sequence's
index in the *global* batch (``row_offset + b``). So a micro-batch of rows ``[r0, r0 + B)`` draws
exactly what the full global batch draws for those rows: gradient accumulation and the full batch
see the same ``t`` and the same noise.

The noise mask is always an explicit boolean array; nothing downstream tests ``x_t == M``
(a natural occurrence of the mask id in clean text is not noise).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

DEFAULT_EPS = 1e-3


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NoisedBatch:
    # [B] float32, the time of each sequence, in [eps, 1); or [B, L], the time of each position
    # (block diffusion, docs/algorithms.md §9: every position carries its block's time)
    t: jax.Array
    noise: jax.Array  # [B, L] bool, True where the token was replaced by the mask token
    x_t: jax.Array  # [B, L] the noised tokens


def row_keys(key, batch_size: int, row_offset=0) -> jax.Array:
    """One key per sequence, ``fold_in(key, row_offset + b)``: a row's draws never depend on B."""
    rows = jnp.asarray(row_offset, jnp.int32) + jnp.arange(batch_size, dtype=jnp.int32)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, rows)


def sample_t(key, batch_size: int, *, eps: float = DEFAULT_EPS, stratified: bool = False,
             row_offset=0, global_batch: int | None = None) -> jax.Array:
    """``t = (1 - eps) * u + eps`` per sequence (docs/algorithms.md §2.1), float32 ``[batch_size]``.

    iid: ``u_b ~ U[0, 1)`` drawn from the row's own key. Stratified (antithetic):
    ``u_b = (u_0 + b / B) mod 1`` with one ``u_0`` for the whole global batch of
    ``B = global_batch`` rows, ``b`` the global row index; each ``u_b`` is still marginally uniform.
    The whole sequence is one block of :func:`sample_block_t` (the same draws).
    """
    return sample_block_t(key, batch_size, 1, eps=eps, stratified=stratified,
                          row_offset=row_offset, global_batch=global_batch)[:, 0]


def sample_block_t(key, batch_size: int, blocks: int, *, eps: float = DEFAULT_EPS,
                   stratified: bool = False, symmetric: bool = False, row_offset=0,
                   global_batch: int | None = None) -> jax.Array:
    """float32 ``[batch_size, blocks]``: one time per (row, block), ``t = (1 - eps) u + eps``.

    Block diffusion (docs/algorithms.md §9); :func:`sample_t` is its one-block case. iid: ``u``
    from the row's own key (a row's draws do not depend on the batch); stratified over the global
    batch with one offset per block, ``u[r, k] = (u0_k + r / B) mod 1``. ``symmetric``
    (complementary masking):
    ``t = (1 - 2 eps) u + eps``, so that ``t`` and ``1 - t`` both lie in ``[eps, 1 - eps]``
    and neither view's ``1 / t`` weight exceeds ``1 / eps``.
    """
    rows = jnp.asarray(row_offset, jnp.int32) + jnp.arange(batch_size, dtype=jnp.int32)
    if stratified:
        total = batch_size if global_batch is None else global_batch
        u0 = jax.random.uniform(jax.random.fold_in(key, 1), (blocks,), jnp.float32)
        u = jnp.mod(u0[None, :] + rows.astype(jnp.float32)[:, None] / total, 1.0)
    else:
        keys = row_keys(jax.random.fold_in(key, 0), batch_size, row_offset)
        u = jax.vmap(lambda k: jax.random.uniform(k, (blocks,), jnp.float32))(keys)
    span = 1.0 - 2.0 * eps if symmetric else 1.0 - eps
    return span * u + eps


def sample_noise_mask(key, t, seq_len: int, *, src=None, row_offset=0) -> jax.Array:
    """``noise[b, i] = (U[b, i] < t_b) & ~src[b, i]`` (docs/algorithms.md §2.2); ``t`` is
    ``[B]``, or ``[B, seq_len]`` for a time per position (``U`` is the same either way)."""
    t = jnp.asarray(t, jnp.float32)
    keys = row_keys(jax.random.fold_in(key, 1), t.shape[0], row_offset)
    u = jax.vmap(lambda k: jax.random.uniform(k, (seq_len,), jnp.float32))(keys)
    noise = u < (t[:, None] if t.ndim == 1 else t)
    if src is not None:
        noise = noise & ~jnp.asarray(src, bool)
    return noise


def sample_exact_count_mask(key, eligible, count, *, row_offset=0) -> jax.Array:
    """Noise exactly ``min(count[b], eligible[b].sum())`` eligible positions of each row, chosen
    uniformly at random (the LLaDA conditional-likelihood draw, docs/algorithms.md §5)."""
    eligible = jnp.asarray(eligible, bool)
    keys = row_keys(key, eligible.shape[0], row_offset)
    priority = jax.vmap(lambda k: jax.random.uniform(k, eligible.shape[1:], jnp.float32))(keys)
    # Ineligible positions sort last; the rank of a position among its row's eligible ones.
    priority = jnp.where(eligible, priority, 2.0)
    rank = jnp.argsort(jnp.argsort(priority, axis=-1), axis=-1)
    return eligible & (rank < jnp.asarray(count)[..., None])


def apply_noise(tokens, noise, mask_token_id: int) -> jax.Array:
    """``x_t = where(noise, M, x)``."""
    return jnp.where(noise, jnp.asarray(mask_token_id, tokens.dtype), tokens)


def forward_process(key, tokens, *, mask_token_id: int, src=None, eps: float = DEFAULT_EPS,
                    stratified: bool = False, row_offset=0,
                    global_batch: int | None = None) -> NoisedBatch:
    """Draw ``t`` and the noise for a batch of clean ``tokens [B, L]`` and noise them."""
    batch, seq_len = tokens.shape
    key_t, key_noise = jax.random.split(key)
    t = sample_t(key_t, batch, eps=eps, stratified=stratified, row_offset=row_offset,
                 global_batch=global_batch)
    noise = sample_noise_mask(key_noise, t, seq_len, src=src, row_offset=row_offset)
    return NoisedBatch(t=t, noise=noise, x_t=apply_noise(tokens, noise, mask_token_id))
