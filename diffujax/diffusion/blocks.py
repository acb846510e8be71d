"""Block diffusion, docs/algorithms.md §9: noise drawn per block, the two-stream ``[x_t ; x_0]``
forward pass with the token shift, and the block NELBO (training loss and likelihood bound).

The sequence of ``L`` positions is cut into blocks of ``N`` (block of position ``i``: ``i // N``;
the last block is shorter when ``N`` does not divide ``L``). ``N = 0`` (or ``N >= L``) is the whole
sequence as one block: :func:`effective_block_size` says which, and a block size of 0 runs the
plain single-stream forward pass.

Block mode calls ``apply_fn(params, tokens, pattern, positions)``: the two streams repeat the
positions ``0..L-1`` (or the batch's own ``positions``), so the model must take them (every
family's ``forward`` does).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from diffujax.attention.pattern import AttentionPattern
from diffujax.diffusion.noise import (DEFAULT_EPS, NoisedBatch, apply_noise, sample_block_t,
                                      sample_noise_mask)
from diffujax.diffusion.objective import LossSums, SplitHead, loss_sums_from_logits


def effective_block_size(block_size: int, seq_len: int) -> int:
    """The block size a sequence of ``seq_len`` tokens is trained and scored with: ``block_size``,
    or 0 (the whole sequence, the full-sequence recipe of §2) when it is 0 or ``>= seq_len``."""
    return 0 if block_size <= 0 or block_size >= seq_len else int(block_size)


def num_blocks(seq_len: int, block_size: int) -> int:
    return 1 if block_size <= 0 else -(-seq_len // block_size)


def block_of(seq_len: int, block_size: int) -> np.ndarray:
    """int32 ``[seq_len]``: the block of each position (all 0 for ``block_size = 0``)."""
    positions = np.arange(seq_len, dtype=np.int32)
    return positions // block_size if block_size > 0 else np.zeros_like(positions)


def block_forward_process(key, tokens, *, block_size: int, mask_token_id: int, src=None,
                          eps: float = DEFAULT_EPS, stratified: bool = False,
                          complementary: bool = False, row_offset=0,
                          global_batch: int | None = None) -> NoisedBatch:
    """Noise ``tokens [B, L]`` block by block (docs/algorithms.md §9): block ``k`` of row ``b``
    draws ``t[b, k]`` and its non-``src`` positions are masked with that probability. The
    returned ``t`` is ``[B, L]``, each position carrying its block's time.

    ``complementary``: ``2B`` rows, the ``B`` rows above and then the same rows with the noise
    flipped on the non-``src`` positions and time ``1 - t`` (each non-``src`` position is noised
    in exactly one of a row's two views); ``t`` is then drawn symmetric (:func:`sample_block_t`).
    """
    batch, seq_len = tokens.shape
    key_t, key_noise = jax.random.split(key)
    t_block = sample_block_t(key_t, batch, num_blocks(seq_len, block_size), eps=eps,
                             stratified=stratified, symmetric=complementary,
                             row_offset=row_offset, global_batch=global_batch)
    t = t_block[:, block_of(seq_len, block_size)]
    noise = sample_noise_mask(key_noise, t, seq_len, src=src, row_offset=row_offset)
    if complementary:
        eligible = jnp.ones_like(noise) if src is None else ~jnp.asarray(src, bool)
        noise = jnp.concatenate([noise, eligible & ~noise])
        t = jnp.concatenate([t, 1.0 - t])
        tokens = twice(tokens)
    return NoisedBatch(t=t, noise=noise, x_t=apply_noise(tokens, noise, mask_token_id))


def twice(x):
    """``x`` stacked on itself along rows (the second view of complementary masking)."""
    return None if x is None else jnp.concatenate([x, x])


def two_stream_source(seq_len: int, block_size: int) -> np.ndarray:
    """int32 ``[seq_len]``: where, in the ``2L`` two-stream logits, the prediction of token
    ``i + 1`` is read. The token shift of §1 inside a block (the noisy stream at ``i``); when
    ``i + 1`` starts a block, the clean stream at ``i`` (the last token of the committed block
    before it), which is the logit decoding has when it starts that block."""
    i = np.arange(seq_len, dtype=np.int32)
    return np.where((i + 1) % block_size == 0, seq_len + i, i).astype(np.int32)


def block_logits(apply_fn, params, x_t, tokens, *, block_size: int,
                 pattern: AttentionPattern, positions=None) -> jax.Array:
    """Logits ``[B, L, V]`` aligned as a plain forward pass's (position ``i`` predicts token
    ``i + 1``) for the noised ``x_t`` under the block model.

    ``block_size > 0``: one pass over ``[x_t ; x_0]`` (``2L`` positions, positions ``0..L-1``
    twice, segment ids repeated) under ``pattern.with_blocks(N, stream_len=L)``, then each
    position's prediction is taken from the stream :func:`two_stream_source` names. The model
    computes logits for all ``2L`` positions, half of which are dropped (docs/algorithms.md §9
    counts that cost; an ``apply_fn`` returning an ``objective.SplitHead`` takes the kept half
    before its head). ``block_size = 0``: the plain forward pass under ``pattern``.
    """
    batch, seq_len = tokens.shape
    if block_size <= 0:
        return apply_fn(params, x_t, pattern, *(() if positions is None else (positions,)))
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), tokens.shape)
    segments = pattern.segment_ids
    if segments is not None:
        segments = jnp.concatenate([segments, segments], axis=1)
    streams = dataclasses.replace(pattern, segment_ids=segments).with_blocks(
        block_size, stream_len=seq_len)
    logits = apply_fn(params, jnp.concatenate([x_t, tokens], axis=1), streams,
                      jnp.concatenate([positions, positions], axis=1))
    source = two_stream_source(seq_len, block_size)
    if isinstance(logits, SplitHead):  # the kept positions' hidden states, before the head
        return dataclasses.replace(logits, hidden=jnp.take(logits.hidden, source, axis=1))
    return jnp.take(logits, source, axis=1)


def block_diffusion_loss_sums(apply_fn, params, tokens, key, *, block_size: int,
                              mask_token_id: int, pattern: AttentionPattern, src=None,
                              loss_mask=None, positions=None, normalization: str = "masked",
                              stratified: bool = False, complementary: bool = False,
                              eps: float = DEFAULT_EPS, row_offset=0,
                              global_batch: int | None = None) -> LossSums:
    """The block NELBO of ``tokens [B, L]`` as loss sums (docs/algorithms.md §9): noise per block,
    the two-stream forward pass, ``sum over noised targets j of ce_j / t_block(j)``, normalised as
    ``normalization`` says (§2.6). Keyword arguments as ``objective.diffusion_loss_sums``;
    ``pattern`` is the pattern inside a block (its kind and segment ids), ``positions`` the
    batch's own (packed documents), ``complementary`` adds each row's complementary view (the
    sums then run over ``2B`` rows). ``block_size`` must be effective
    (:func:`effective_block_size`): 0 runs the single-stream forward pass with one ``t`` per row.
    """
    noised = block_forward_process(key, tokens, block_size=block_size,
                                   mask_token_id=mask_token_id, src=src, eps=eps,
                                   stratified=stratified, complementary=complementary,
                                   row_offset=row_offset, global_batch=global_batch)
    if complementary:
        tokens, src, loss_mask, positions = map(twice, (tokens, src, loss_mask, positions))
        pattern = dataclasses.replace(pattern, segment_ids=twice(pattern.segment_ids))
    logits = block_logits(apply_fn, params, noised.x_t, tokens, block_size=block_size,
                          pattern=pattern, positions=positions)
    return loss_sums_from_logits(logits, tokens, noised, src=src, loss_mask=loss_mask,
                                 normalization=normalization)
