"""Likelihood, perplexity and scoring, docs/algorithms.md §5.

The ``*_terms`` functions are pure JAX over one batch and return per-sequence numbers; run them
over an evaluation set, concatenate, and turn them into the reported figure with
:func:`summarize_nll` (the one place where a perplexity and its error bar are computed).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffujax.attention.pattern import AttentionPattern, causal, full
from diffujax.diffusion.blocks import block_forward_process, block_logits
from diffujax.diffusion.noise import (DEFAULT_EPS, NoisedBatch, apply_noise, row_keys,
                                      sample_exact_count_mask, sample_noise_mask)
from diffujax.diffusion.objective import (ApplyFn, per_sequence_terms, shifted_cross_entropy,
                                          target_positions)


# --- ELBO perplexity of the diffusion model ---------------------------------------------------

def elbo_terms(apply_fn: ApplyFn, params, tokens, key, *, mask_token_id: int,
               pattern: AttentionPattern | None = None, src=None, loss_mask=None,
               num_draws: int = 1, stratified: bool = True, eps: float = DEFAULT_EPS,
               row_offset=0, global_batch: int | None = None, block_size: int = 0,
               positions=None):
    """Per-sequence NELBO of positions ``1..L-1`` given position 0 (MDLM protocol,
    docs/algorithms.md §5; with ``block_size`` the block NELBO of §9).

    Each of ``num_draws`` draws takes one ``t`` per sequence (stratified across the global batch
    of ``global_batch`` rows, this batch being rows ``row_offset..``) and one noise draw; returns
    ``(nelbo [B], targets [B])``: the weighted ce summed over the sequence's target tokens and
    averaged over draws (nats), and its number of target tokens. ``mean over data of nelbo /
    targets`` upper-bounds the per-token NLL ("tokens" normalisation). Besides position 0, ``src``
    (e.g. an SFT prompt) and the positions outside ``loss_mask`` (padding) are conditioned on:
    never noised, never scored, so the figure bounds the NLL of the scored tokens given them.

    ``block_size`` (``blocks.effective_block_size``; 0: the whole sequence): a block model, scored
    with one ``t`` per block (each block's ``t`` stratified across the rows as above) and the
    two-stream forward pass, which calls ``apply_fn(params, tokens, pattern, positions)``;
    ``pattern`` is then the pattern inside a block. ``positions`` (``[B, L]``, packed documents)
    are passed to ``apply_fn`` when given.
    """
    pattern = full() if pattern is None else pattern
    conditioned = jnp.broadcast_to(jnp.arange(tokens.shape[1]) == 0, tokens.shape)  # position 0
    if src is not None:
        conditioned = conditioned | jnp.asarray(src, bool)
    if loss_mask is not None:
        conditioned = conditioned | ~jnp.asarray(loss_mask, bool)
    src = conditioned

    def one_draw(draw):
        # block size 0: one block, the plain forward process and forward pass (the same draws)
        noised = block_forward_process(jax.random.fold_in(key, draw), tokens,
                                       block_size=block_size, mask_token_id=mask_token_id,
                                       src=src, eps=eps, stratified=stratified,
                                       row_offset=row_offset, global_batch=global_batch)
        logits = block_logits(apply_fn, params, noised.x_t, tokens, block_size=block_size,
                              pattern=pattern, positions=positions)
        return per_sequence_terms(logits, tokens, noised, src=src, loss_mask=loss_mask)["weighted"]

    nelbo = jax.lax.map(one_draw, jnp.arange(num_draws, dtype=jnp.int32)).mean(axis=0)
    targets = target_positions(tokens, src=src, loss_mask=loss_mask).sum(axis=1)
    return nelbo, targets.astype(jnp.float32)


def ar_nll_terms(apply_fn: ApplyFn, params, tokens, *, pattern: AttentionPattern | None = None,
                 loss_mask=None):
    """AR baseline: per-sequence next-token NLL summed over targets ``1..L-1`` (causal attention)
    and the number of targets, ``(nll [B], targets [B])``."""
    logits = apply_fn(params, tokens, causal() if pattern is None else pattern)
    targets = target_positions(tokens, loss_mask=loss_mask)
    nll = jnp.where(targets, shifted_cross_entropy(logits, tokens), 0.0).sum(axis=1)
    return nll, targets.sum(axis=1).astype(jnp.float32)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


@dataclasses.dataclass(frozen=True)
class NLLEstimate:
    """A per-token NLL with its uncertainty; ``perplexity`` is a bound for a diffusion model."""

    mean_nll: float  # nats per token
    std_error: float  # over sequences (data sampling plus Monte-Carlo noise)
    num_tokens: int
    num_sequences: int
    num_draws: int  # noise draws per sequence; 0 for an exact (AR) likelihood

    @property
    def perplexity(self) -> float:
        """``exp(mean_nll)``; ``inf`` past float range (a diverged model), not an overflow."""
        return _exp(self.mean_nll)

    @property
    def perplexity_interval(self) -> tuple[float, float]:
        """95% interval, ``exp(mean +- 1.96 se)``."""
        half = 1.96 * self.std_error
        return _exp(self.mean_nll - half), _exp(self.mean_nll + half)

    def __str__(self) -> str:
        low, high = self.perplexity_interval
        draws = "exact" if self.num_draws == 0 else f"{self.num_draws} draw(s)/sequence"
        bound = "" if self.num_draws == 0 else "<= "
        return (f"perplexity {bound}{self.perplexity:.3f} (95% CI {low:.3f}..{high:.3f}); "
                f"NLL {self.mean_nll:.4f} +- {self.std_error:.4f} nats/token; "
                f"{self.num_tokens} tokens, {self.num_sequences} sequences, {draws}")


def summarize_nll(nll, targets, *, num_draws: int) -> NLLEstimate:
    """Mean NLL per token ``sum(nll) / sum(targets)`` over all sequences, and its standard error
    (delta method for a ratio of means, sequences as the independent units; with stratified
    ``t`` the draws are negatively correlated, so this error bar is conservative)."""
    nll = np.asarray(nll, np.float64).ravel()
    targets = np.asarray(targets, np.float64).ravel()
    count, tokens = nll.size, targets.sum()
    mean = nll.sum() / tokens
    if count > 1:
        residual = nll - mean * targets
        std_error = math.sqrt((residual ** 2).sum() / (count * (count - 1))) / (tokens / count)
    else:
        std_error = math.inf
    return NLLEstimate(mean_nll=float(mean), std_error=float(std_error), num_tokens=int(tokens),
                       num_sequences=count, num_draws=num_draws)


# --- scoring a continuation given a prefix ------------------------------------------------------

def _continuation(tokens, src, loss_mask):
    """Bool ``[B, L]``: the positions being scored (not src, in loss_mask, not position 0)."""
    scored = ~jnp.asarray(src, bool) & (jnp.arange(tokens.shape[1]) > 0)
    return scored if loss_mask is None else scored & jnp.asarray(loss_mask, bool)


def multiple_choice_score(apply_fn: ApplyFn, params, tokens, src, key, *, mask_token_id: int,
                          pattern: AttentionPattern | None = None, loss_mask=None,
                          num_levels: int = 32, row_offset=0):
    """The reference's multiple-choice score (docs/algorithms.md §5), ``[B]``, lower is better.

    For ``k = T..1`` noise the continuation (``~src``) at rate ``k / T`` with one draw, take the
    unweighted mean ce over the noised positions (shifted), skip levels with none noised; the
    score is the sum over levels divided by ``T``.

    This is what the reference's evaluation scripts compute (``eval-diffugpt.py`` /
    ``eval-diffullama.py`` import the module-level ``eval_forward`` of its ``ddm/trainer.py``,
    one row per call): levels ``T..1``, unweighted, a level with nothing noised adding 0. Its
    trainer's ``eval_forward`` *method* (levels ``T-1..1``, ``1/t``-weighted) is a training-time
    loss that no evaluation script calls.
    ``row_offset`` may be a ``[B]`` array (row ``b`` draws as row ``row_offset[b] + b``).
    """
    pattern = full() if pattern is None else pattern
    scored = _continuation(tokens, src, loss_mask)

    def one_level(level):
        rate = jnp.full(tokens.shape[:1], level / num_levels, jnp.float32)
        noise = sample_noise_mask(jax.random.fold_in(key, level), rate, tokens.shape[1],
                                  src=~scored, row_offset=row_offset)
        logits = apply_fn(params, apply_noise(tokens, noise, mask_token_id), pattern)
        terms = per_sequence_terms(logits, tokens, NoisedBatch(rate, noise, tokens))
        # mean over noised positions; a level with none noised adds nothing
        return terms["unweighted"] / jnp.maximum(terms["noised"], 1.0)

    levels = jnp.arange(num_levels, 0, -1, dtype=jnp.int32)
    return jax.lax.map(one_level, levels).sum(axis=0) / num_levels


def conditional_nll(apply_fn: ApplyFn, params, tokens, src, key, *, mask_token_id: int,
                    pattern: AttentionPattern | None = None, loss_mask=None,
                    num_draws: int = 128, draws_per_forward: int = 1, row_offset=0):
    """LLaDA's estimate of ``-log p(answer | prompt)`` per row, ``[B]`` (docs/algorithms.md §5).

    The answer is ``~src`` (within ``loss_mask``), of length ``n``. Each draw takes
    ``l ~ U{1..n}`` (stratified over the row's draws), noises exactly ``l`` answer tokens chosen
    uniformly and scores ``(n / l) * sum of ce over them``; the estimate is the mean over draws.
    ``draws_per_forward`` draws share one forward pass (a batch of that many times ``B`` rows).
    """
    if num_draws % draws_per_forward:
        raise ValueError(f"num_draws={num_draws} is not a multiple of "
                         f"draws_per_forward={draws_per_forward}")
    pattern = full() if pattern is None else pattern
    batch, length = tokens.shape
    answer = _continuation(tokens, src, loss_mask)
    n = answer.sum(axis=1)
    u0 = jax.vmap(lambda k: jax.random.uniform(k, ()))(row_keys(key, batch, row_offset))

    def draw_mask(draw):
        u = jnp.mod(u0 + draw.astype(jnp.float32) / num_draws, 1.0)
        count = jnp.minimum(1 + jnp.floor(u * n).astype(jnp.int32), n)
        noise = sample_exact_count_mask(jax.random.fold_in(key, draw + 1), answer, count,
                                        row_offset=row_offset)
        return noise, count

    def one_forward(chunk):
        draws = chunk * draws_per_forward + jnp.arange(draws_per_forward, dtype=jnp.int32)
        noise, count = jax.vmap(draw_mask)(draws)  # [c, B, L], [c, B]
        clean = jnp.broadcast_to(tokens, noise.shape).reshape(-1, length)
        flat_noise = noise.reshape(-1, length)
        logits = apply_fn(params, apply_noise(clean, flat_noise, mask_token_id), pattern)
        ce_sum = per_sequence_terms(logits, clean, NoisedBatch(jnp.ones(clean.shape[:1]),
                                                               flat_noise, clean))["unweighted"]
        ce_sum = ce_sum.reshape(draws_per_forward, batch)
        return (n / jnp.maximum(count, 1) * ce_sum).sum(axis=0)

    chunks = jnp.arange(num_draws // draws_per_forward, dtype=jnp.int32)
    return jax.lax.map(one_forward, chunks).sum(axis=0) / num_draws
