"""Tiny stand-in models for the diffusion tests: ``apply_fn(params, tokens, pattern) -> logits``.

They are module-level functions (the samplers take ``apply_fn`` as a static jit argument) and
compute each row on its own with gathers and sums only, so a row's logits are bit-identical
whatever batch it sits in.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np


def table_apply(table, tokens, pattern):
    """An arbitrary function of the whole sequence: ``table [V**L, L, V]`` indexed by the
    sequence read as a base-``V`` number (digit ``j`` = token at position ``j``)."""
    vocab = table.shape[-1]
    weights = vocab ** jnp.arange(tokens.shape[1])
    return table[(tokens * weights).sum(axis=1)]


def sequence_index(tokens, vocab: int) -> np.ndarray:
    tokens = np.asarray(tokens)
    return (tokens * vocab ** np.arange(tokens.shape[-1])).sum(axis=-1)


def fixed_apply(logits, tokens, pattern):
    """Ignores its input: ``logits [L, V]`` for every row."""
    return jnp.broadcast_to(logits, (tokens.shape[0], *logits.shape))


def mixing_apply(weights, tokens, pattern):
    """``logits[b, l] = sum_j weights[j, tokens[b, j], l]``: every position sees every token."""
    length = tokens.shape[1]
    picked = weights[jnp.arange(length)[None, :], tokens]  # [B, L_in, L_out, V]
    return picked.sum(axis=1)


def all_sequences(vocab: int, length: int) -> np.ndarray:
    return np.array(list(itertools.product(range(vocab), repeat=length)), np.int32)
