"""Scoring and likelihood estimators (docs/algorithms.md §5). References: float64 numpy
re-implementations from the docs/algorithms.md text (multiple-choice score on the same noise draws,
AR NLL, the ratio standard error) and, for LLaDA's estimator, its exact expectation by enumerating
every noised subset."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from diffujax.attention.pattern import full
from diffujax.diffusion import (NLLEstimate, ar_nll_terms, conditional_nll,
                                multiple_choice_score, sample_noise_mask, summarize_nll)
from diffusion_toys import all_sequences, mixing_apply, sequence_index, table_apply

B, L, V, M = 4, 9, 7, 6


def _ce64(logits, tokens):
    """float64 shifted ce ``[B, L-1]``: logits at i score the token at i + 1."""
    logp = special.log_softmax(np.asarray(logits, np.float64), axis=-1)[:, :-1]
    return -np.take_along_axis(logp, np.asarray(tokens)[:, 1:, None], axis=-1)[..., 0]


def test_multiple_choice_score_matches_reference_on_the_same_draws():
    weights = jax.random.normal(jax.random.key(0), (L, V, L, V))
    tokens = jax.random.randint(jax.random.key(1), (B, L), 0, M)
    src = np.zeros((B, L), bool)
    src[:, :4] = True
    src[1, :8] = True  # a one-token continuation: most levels noise nothing and are skipped
    key, levels = jax.random.key(2), 32
    score = jax.jit(lambda w, x, s: multiple_choice_score(mixing_apply, w, x, s, key,
                                                          mask_token_id=M))(weights, tokens, src)
    # the draws the score makes: one noise mask per level k at rate k / T
    ks = jnp.arange(levels, 0, -1)
    masks = jax.jit(jax.vmap(lambda k: sample_noise_mask(
        jax.random.fold_in(key, k), jnp.full(B, k / levels), L, src=jnp.asarray(src))))(ks)
    logits = jax.jit(jax.vmap(lambda noise: mixing_apply(weights, jnp.where(noise, M, tokens),
                                                         full())))(masks)
    expected = np.zeros(B)
    for noise, level_logits in zip(np.asarray(masks), np.asarray(logits)):
        assert not (noise & src).any()
        ce = _ce64(level_logits, tokens)
        counted = noise[:, 1:]
        for b in range(B):
            if counted[b].any():  # skip levels with no noised token
                expected[b] += ce[b][counted[b]].mean()
    np.testing.assert_allclose(score, expected / levels, rtol=1e-5)


def test_ar_nll_and_summary():
    weights = jax.random.normal(jax.random.key(3), (L, V, L, V))
    tokens = jax.random.randint(jax.random.key(4), (B, L), 0, M)
    nll, targets = jax.jit(lambda w, x: ar_nll_terms(mixing_apply, w, x))(weights, tokens)
    np.testing.assert_allclose(nll, _ce64(mixing_apply(weights, tokens, None), tokens).sum(1),
                               rtol=1e-5)
    np.testing.assert_array_equal(targets, L - 1)
    summary = summarize_nll(nll, targets, num_draws=0)
    per_token = np.asarray(nll, np.float64) / (L - 1)
    assert summary.num_tokens == B * (L - 1) and summary.num_sequences == B
    np.testing.assert_allclose(summary.mean_nll, per_token.mean(), rtol=1e-6)
    # equal lengths: the ratio standard error is the plain standard error of the mean
    np.testing.assert_allclose(summary.std_error, per_token.std(ddof=1) / np.sqrt(B), rtol=1e-6)
    np.testing.assert_allclose(summary.perplexity, np.exp(summary.mean_nll))
    assert "exact" in str(summary) and "<=" not in str(summary)


def test_a_diverged_models_perplexity_is_infinite_not_an_overflow():
    """Reference: numpy's float64 exp, which overflows to inf (math.exp raises instead)."""
    estimate = NLLEstimate(mean_nll=800.0, std_error=5.0, num_tokens=10, num_sequences=2,
                           num_draws=1)
    with np.errstate(over="ignore"):
        assert estimate.perplexity == np.exp(800.0) == np.inf
        assert estimate.perplexity_interval == (np.inf, np.inf)
    assert "inf" in str(estimate)


# --- LLaDA conditional likelihood by enumeration ---------------------------------------------

K4, M4, V4, L4 = 3, 3, 4, 4  # real tokens 0..2, mask 3, position 0 the prompt


def llada_expectation(table, x, answer):
    """E over l ~ U{1..n} and a uniform l-subset S of (n / l) * sum_{i in S} ce_i(x_S)."""
    logp = special.log_softmax(table, axis=-1)
    n, total = len(answer), 0.0
    for size in range(1, n + 1):
        subsets = list(itertools.combinations(answer, size))
        for subset in subsets:
            noised = np.array(x)
            noised[list(subset)] = M4
            row = logp[sequence_index(noised, V4)]
            ce = -sum(row[i - 1, x[i]] for i in subset)
            total += (1 / n) * (n / size) * ce / len(subsets)
    return total


def test_conditional_nll_is_unbiased_for_its_exact_expectation():
    table = np.random.default_rng(0).normal(0.0, 1.5, (V4 ** L4, L4, V4))
    data = all_sequences(K4, L4)[:27]  # x_0 = 0, every answer of 3 tokens
    exact = np.array([llada_expectation(table, x, (1, 2, 3)) for x in data])
    copies = 30
    tokens = jnp.asarray(np.tile(data, (copies, 1)))
    src = jnp.zeros(tokens.shape, bool).at[:, 0].set(True)
    run = jax.jit(lambda t, x, s, k: conditional_nll(table_apply, t, x, s, k, mask_token_id=M4,
                                                     num_draws=6, draws_per_forward=3))
    estimates = np.asarray(run(jnp.asarray(table, jnp.float32), tokens, src, jax.random.key(5)))
    error = estimates.reshape(copies, -1) - exact[None, :]
    standard_error = error.std() / np.sqrt(error.size)
    assert abs(error.mean()) < 4 * standard_error and standard_error < 0.02 * exact.mean()
    # with a prompt covering everything there is nothing to score
    np.testing.assert_array_equal(run(jnp.asarray(table, jnp.float32), tokens,
                                      jnp.ones(tokens.shape, bool), jax.random.key(5)), 0.0)
