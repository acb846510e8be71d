"""Forward process (docs/algorithms.md §2 steps 1-2). References: the docs/algorithms.md formulas,
the uniform distribution (Kolmogorov-Smirnov via scipy) and binomial counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffujax.diffusion import (apply_noise, sample_exact_count_mask, sample_noise_mask,
                                sample_t)
from diffujax.diffusion import forward_process as _forward_process

EPS = 1e-3
M = 7
forward_process = jax.jit(_forward_process,
                          static_argnames=("mask_token_id", "stratified", "global_batch"))


def _u(t):
    return (np.asarray(t, np.float64) - EPS) / (1 - EPS)


def test_t_iid_in_range_and_uniform():
    t = sample_t(jax.random.key(0), 4000, eps=EPS)
    assert t.dtype == jnp.float32 and t.shape == (4000,)
    assert float(t.min()) >= EPS and float(t.max()) < 1.0
    assert stats.kstest(_u(t), "uniform").pvalue > 1e-3


def test_t_stratified_is_evenly_spaced_and_marginally_uniform():
    batch = 16
    u = np.sort(_u(sample_t(jax.random.key(1), batch, eps=EPS, stratified=True)))
    np.testing.assert_allclose(np.diff(u), 1 / batch, atol=1e-5)
    # row 3 over many keys is U[0, 1)
    keys = jax.random.split(jax.random.key(2), 2000)
    row3 = jax.jit(jax.vmap(lambda k: sample_t(k, batch, eps=EPS, stratified=True)[3]))(keys)
    assert stats.kstest(_u(row3), "uniform").pvalue > 1e-3


@pytest.mark.parametrize("stratified", [False, True])
def test_micro_batches_draw_what_the_global_batch_draws(stratified):
    key, tokens = jax.random.key(3), jax.random.randint(jax.random.key(4), (8, 12), 0, M)
    whole = forward_process(key, tokens, mask_token_id=M, stratified=stratified)
    # tokens < M: x_t is M exactly where the noise mask is set, the clean token elsewhere
    np.testing.assert_array_equal(whole.x_t, np.where(whole.noise, M, tokens))
    for start in (0, 4):
        part = forward_process(key, tokens[start:start + 4], mask_token_id=M,
                               stratified=stratified, row_offset=start, global_batch=8)
        np.testing.assert_array_equal(part.t, whole.t[start:start + 4])
        np.testing.assert_array_equal(part.noise, whole.noise[start:start + 4])


def test_noise_respects_src_and_rate_and_is_explicit():
    batch, length = 64, 256
    tokens = jnp.full((batch, length), M, jnp.int32)  # clean text made of the mask id itself
    src = jnp.zeros((batch, length), bool).at[:, :40].set(True)
    noised = forward_process(jax.random.key(5), tokens, mask_token_id=M, src=src)
    assert not bool((noised.noise & src).any())
    # the mask id occurring in clean text is not noise: the boolean mask is what counts
    assert int(noised.noise.sum()) < noised.noise.size - 40 * batch
    counts = np.asarray(noised.noise[:, 40:].sum(axis=1))
    expected = np.asarray(noised.t) * (length - 40)
    std = np.sqrt(expected * (1 - np.asarray(noised.t)))
    assert np.all(np.abs(counts - expected) <= 5 * std + 1)


def test_apply_noise_and_fixed_rate_mask():
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    noise = jnp.array([[0, 1, 0, 0, 1, 1], [1, 0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(apply_noise(tokens, noise, 99),
                                  [[0, 99, 2, 3, 99, 99], [99, 7, 8, 9, 10, 11]])
    everything = sample_noise_mask(jax.random.key(0), jnp.ones(2), 6)
    assert bool(everything.all())


def test_exact_count_mask_counts_and_uniformity():
    eligible = jnp.tile(jnp.array([0, 1, 1, 0, 1, 1, 1], bool), (3000, 1))
    count = jnp.tile(jnp.array([0, 2, 5, 9]), 750)  # 9 > 5 eligible: all of them
    noise = jax.jit(sample_exact_count_mask)(jax.random.key(6), eligible, count)
    assert not bool((noise & ~eligible).any())
    np.testing.assert_array_equal(noise.sum(axis=1), np.minimum(count, 5))
    # with count 2, each eligible position is chosen with probability 2/5
    two = np.asarray(noise[1::4])[:, np.asarray(eligible[0])]
    assert stats.chisquare(two.sum(axis=0)).pvalue > 1e-3
