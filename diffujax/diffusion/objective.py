"""The training objective, docs/algorithms.md §2 steps 3-6 (and the AR baseline loss of
docs/algorithms.md §5).

Losses are returned as :class:`LossSums`: numerators and denominators summed over the rows of a
(micro-)batch. Sums of micro-batches add up (``a + b``), and only the caller divides, so gradient
accumulation is normalised over the global batch (docs/algorithms.md §2.6)::

    sums = [diffusion_loss_sums(apply_fn, params, mb, key, ..., row_offset=r, global_batch=B)
            for r, mb in micro_batches]                      # per micro-batch
    grad = sum(grad of s.weighted) / sum(s.denominator)      # denominators do not depend on params
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from diffujax.attention.pattern import AttentionPattern, causal
from diffujax.diffusion.noise import DEFAULT_EPS, NoisedBatch, forward_process

ApplyFn = Callable[..., jax.Array]  # apply_fn(params, tokens [B, L], pattern) -> logits [B, L, V]
# (or a SplitHead: the training step's apply_fn, whose logits the loss computes in chunks)

LOSS_CHUNK = 128  # positions per chunk of the chunked cross-entropy (rows x chunk x V float32)

# "masked": reference parity, sum(w * ce) / sum(noise[:, 1:]).
# "tokens": per-token NELBO, sum(w * ce) / number of target tokens.
# "sequence": LLaDA SFT, each sequence's sum(w * ce) divided by its own target count, averaged
#             over sequences.
NORMALIZATIONS = ("masked", "tokens", "sequence")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LossSums:
    """Float32 scalars summed over rows; add micro-batches with ``+``, divide with ``.loss``."""

    weighted: jax.Array  # numerator of the optimised loss
    denominator: jax.Array  # what ``weighted`` is divided by (depends on the normalisation)
    unweighted: jax.Array  # sum of ce over noised targets, no 1/t (the reference's logged loss)
    noised: jax.Array  # number of noised target positions
    targets: jax.Array  # number of target positions (non-src, in loss_mask, positions 1..L-1)

    def __add__(self, other: "LossSums") -> "LossSums":
        return jax.tree.map(jnp.add, self, other)

    @property
    def loss(self) -> jax.Array:
        return self.weighted / jnp.maximum(self.denominator, 1e-9)

    def metrics(self) -> dict[str, jax.Array]:
        """The loss plus what the reference logs: the unweighted mean ce over noised tokens."""
        return dict(loss=self.loss,
                    unweighted_masked_loss=self.unweighted / jnp.maximum(self.noised, 1.0),
                    noised_fraction=self.noised / jnp.maximum(self.targets, 1.0),
                    target_tokens=self.targets)


@dataclasses.dataclass(frozen=True)
class SplitHead:
    """Logits not yet computed: the network's last hidden states ``[B, L, D]`` and its output
    head, ``head(hidden[:, i:j]) -> float32 logits [B, j - i, V]``. An ``apply_fn`` may return
    one in place of ``[B, L, V]`` logits; the cross-entropy then never holds the logits of more
    than ``chunk`` positions per row (:func:`chunked_cross_entropy`)."""

    hidden: jax.Array
    head: Callable[[jax.Array], jax.Array]
    chunk: int = LOSS_CHUNK


def _cross_entropy(logits, targets) -> jax.Array:
    """``logsumexp(logits) - logits[target]`` over the last axis, float32."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def chunked_cross_entropy(split: SplitHead, targets) -> jax.Array:
    """``ce[b, i]`` of ``split.head(split.hidden)`` against ``targets [B, L]``, ``split.chunk``
    positions at a time: each chunk's logits are computed, reduced to ce and dropped; the
    backward pass recomputes them (``jax.checkpoint``), so neither pass keeps ``[B, L, V]``
    float32 logits, only ``[B, chunk, V]``. The sequence axis is chunked, so the batch axis
    keeps its sharding."""
    batch, length = targets.shape
    hidden, chunk = split.hidden, min(split.chunk, length)
    chunks = -(-length // chunk)
    pad = chunks * chunk - length
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))

    def by_chunk(x):  # [B, chunks * chunk, ...] -> [chunks, B, chunk, ...]
        return jnp.moveaxis(x.reshape(batch, chunks, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one_chunk(args):
        h, t = args
        return _cross_entropy(split.head(h), t)

    ce = jax.lax.map(one_chunk, (by_chunk(hidden), by_chunk(targets)))
    return jnp.moveaxis(ce, 0, 1).reshape(batch, chunks * chunk)[:, :length]


def shifted_cross_entropy(logits, tokens) -> jax.Array:
    """``ce[b, i] = -log softmax(logits[b, i])[tokens[b, i + 1]]`` for ``i < L - 1``, float32.

    The shift of docs/algorithms.md §1: the logits at position ``i`` predict the token at ``i + 1``.
    ``logits``: ``[B, L, V]``, or a :class:`SplitHead` (computed in chunks).
    """
    if isinstance(logits, SplitHead):
        # every position's ce against the next token (the last against a dummy, dropped): no
        # copy of the hidden states without their last position
        targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
        return chunked_cross_entropy(logits, targets)[:, :-1]
    return _cross_entropy(logits[:, :-1], tokens[:, 1:])


def target_positions(tokens, *, src=None, loss_mask=None) -> jax.Array:
    """Bool ``[B, L - 1]``: the targets ``1..L-1`` that are not ``src`` and are in ``loss_mask``.

    ``loss_mask`` (``[B, L]``, True = counts) removes positions such as evaluation padding from
    every sum; it does not change which positions get noised (put them in ``src`` for that).
    """
    targets = jnp.ones(tokens[:, 1:].shape, bool)
    if src is not None:
        targets = targets & ~jnp.asarray(src, bool)[:, 1:]
    if loss_mask is not None:
        targets = targets & jnp.asarray(loss_mask, bool)[:, 1:]
    return targets


def per_sequence_terms(logits, tokens, noised: NoisedBatch, *, src=None, loss_mask=None):
    """Per-sequence pieces of the loss, float32 ``[B]`` each: ``weighted`` = sum of ``w * ce``,
    ``unweighted`` = sum of ce over noised targets, ``noised`` and ``targets`` counts."""
    ce = shifted_cross_entropy(logits, tokens)
    targets = target_positions(tokens, src=src, loss_mask=loss_mask)
    noise = jnp.asarray(noised.noise, bool)[:, 1:] & targets
    t = jnp.asarray(noised.t, jnp.float32)
    # The time of each target: the row's, or (block diffusion) the target's own block's.
    t = t[:, None] if t.ndim == 1 else t[:, 1:]
    # w[b, i] = noise[b, i + 1] / t; `where` keeps an unused inf/nan ce out of the sums.
    noised_ce = jnp.where(noise, ce, 0.0)
    return dict(weighted=(noised_ce / t).sum(axis=1), unweighted=noised_ce.sum(axis=1),
                noised=noise.sum(axis=1).astype(jnp.float32),
                targets=targets.sum(axis=1).astype(jnp.float32))


def loss_sums_from_logits(logits, tokens, noised: NoisedBatch, *, src=None, loss_mask=None,
                          normalization: str = "masked") -> LossSums:
    """docs/algorithms.md §2 steps 4-6, given ``logits [B, L, V]`` of ``noised.x_t`` (any float
    dtype)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization {normalization!r} is not one of {NORMALIZATIONS}")
    terms = per_sequence_terms(logits, tokens, noised, src=src, loss_mask=loss_mask)
    if normalization == "masked":
        weighted, denominator = terms["weighted"].sum(), terms["noised"].sum()
    elif normalization == "tokens":
        weighted, denominator = terms["weighted"].sum(), terms["targets"].sum()
    else:  # "sequence"
        weighted = (terms["weighted"] / jnp.maximum(terms["targets"], 1.0)).sum()
        denominator = jnp.float32(tokens.shape[0])
    return LossSums(weighted=weighted, denominator=denominator,
                    unweighted=terms["unweighted"].sum(), noised=terms["noised"].sum(),
                    targets=terms["targets"].sum())


def diffusion_loss_sums(apply_fn: ApplyFn, params, tokens, key, *, mask_token_id: int,
                        pattern: AttentionPattern, src=None, loss_mask=None,
                        normalization: str = "masked", stratified: bool = False,
                        eps: float = DEFAULT_EPS, row_offset=0,
                        global_batch: int | None = None) -> LossSums:
    """Noise ``tokens [B, L]``, run the model under ``pattern`` and return the loss sums
    (docs/algorithms.md §2).

    ``row_offset`` / ``global_batch`` place this micro-batch in the global batch, so that its
    draws (and the stratification of ``t``) are those of the full batch.
    """
    noised = forward_process(key, tokens, mask_token_id=mask_token_id, src=src, eps=eps,
                             stratified=stratified, row_offset=row_offset,
                             global_batch=global_batch)
    logits = apply_fn(params, noised.x_t, pattern)
    return loss_sums_from_logits(logits, tokens, noised, src=src, loss_mask=loss_mask,
                                 normalization=normalization)


def ar_loss_sums(apply_fn: ApplyFn, params, tokens, *, pattern: AttentionPattern | None = None,
                 loss_mask=None) -> LossSums:
    """Next-token cross-entropy of the AR baseline (causal attention, nothing noised), as sums:
    ``weighted`` = ``unweighted`` = sum of ce over targets ``1..L-1``, divided by their count."""
    logits = apply_fn(params, tokens, causal() if pattern is None else pattern)
    ce = shifted_cross_entropy(logits, tokens)
    targets = target_positions(tokens, loss_mask=loss_mask)
    total = jnp.where(targets, ce, 0.0).sum()
    count = targets.sum().astype(jnp.float32)
    return LossSums(weighted=total, denominator=count, unweighted=total, noised=count,
                    targets=count)
