"""Float32-exact categorical sampling (docs/algorithms.md §6). Reference: the same random bits
turned into an exponential race in float64 numpy, and chi-square tests (scipy) against float64
probabilities."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from diffujax.diffusion import (exponential_from_bits, race_winner, sample_categorical,
                                uniform_from_bits)
from diffujax.diffusion import filter_logits as _filter_logits


def _exponential64(hi, lo):
    """-log(1 - v) for v = (hi * 2^32 + lo) / 2^64, in float64 (1 - v from the exact integer)."""
    hi, lo = np.asarray(hi, np.uint64), np.asarray(lo, np.uint64)
    v = hi.astype(np.float64) * 2.0 ** -32 + lo.astype(np.float64) * 2.0 ** -64
    one_minus_v = (~hi & 0xFFFFFFFF).astype(np.float64) * 2.0 ** -32 + \
        ((~lo & 0xFFFFFFFF) + 1).astype(np.float64) * 2.0 ** -64
    with np.errstate(divide="ignore"):
        return np.where(v < 0.5, -np.log1p(-v), -np.log(one_minus_v))


def test_exponentials_keep_relative_precision_in_both_tails():
    bits = jax.random.bits(jax.random.key(0), (2, 100_000), jnp.uint32)
    top = 2 ** 32 - 1
    planted_hi = [0, 0, 0, 1, 255, 2 ** 20, top, top, top - 3, 2 ** 31, 2 ** 31 - 1]
    planted_lo = [1, 12345, 2 ** 31, 0, 7, 3, top - 9, 2 ** 20, 5, 0, top]
    hi = np.concatenate([np.asarray(bits[0]), planted_hi]).astype(np.uint32)
    lo = np.concatenate([np.asarray(bits[1]), planted_lo]).astype(np.uint32)
    got = np.asarray(exponential_from_bits(jnp.asarray(hi), jnp.asarray(lo)), np.float64)
    expected = _exponential64(hi, lo)
    assert expected.min() < 1e-18 and expected.max() > 40  # planted values reach both tails
    np.testing.assert_allclose(got, expected, rtol=3e-7)
    assert np.all(np.asarray(uniform_from_bits(jnp.asarray(hi), jnp.asarray(lo))) < 1.0)


def test_race_agrees_with_float64_even_in_the_far_tail():
    """Same bits, same winner as float64, including tokens with probability ~1e-17 that win
    only when their exponential is tiny (a float32 Gumbel from one uniform tops out at 16.6,
    so it could never pick them)."""
    vocab, draws = 64, 4000
    logits = np.concatenate([[0.0], -np.linspace(1, 36, vocab - 1)])
    bits = np.array(jax.random.bits(jax.random.key(1), (2, draws, vocab), jnp.uint32))
    tail = np.arange(draws) % 4 == 0  # plant a far-tail exponential in every 4th draw
    bits[0, tail, -1] = 0  # token 63, logit -36 (p ~ 2e-16): its E becomes < 5.6e-17
    bits[1, tail, -1] = bits[1, tail, -1] % 1024 + 1
    got = np.asarray(race_winner(jnp.asarray(logits, jnp.float32),
                                 exponential_from_bits(jnp.asarray(bits[0]), jnp.asarray(bits[1]))))
    expected = np.argmax(logits - np.log(_exponential64(bits[0], bits[1])), axis=-1)
    np.testing.assert_array_equal(got, expected)
    assert (got == vocab - 1).sum() > 0


def test_sampled_frequencies_match_a_heavy_tailed_distribution():
    vocab, draws = 512, 40_000
    probs = 1.0 / np.arange(1, vocab + 1) ** 1.3  # Zipf-like
    probs /= probs.sum()
    logits = jnp.asarray(np.log(probs) + 3.0, jnp.float32)  # unnormalised is fine
    tokens = jax.jit(lambda k: sample_categorical(k, jnp.broadcast_to(logits, (draws, vocab))))(
        jax.random.key(2))
    counts = np.bincount(np.asarray(tokens), minlength=vocab)
    # pool the tail into bins of expected count >= 20; the tail holds about 12% of the mass
    expected = probs * draws
    edges = [0]
    while edges[-1] < vocab:
        stop = edges[-1] + 1
        while stop < vocab and expected[edges[-1]:stop].sum() < 20:
            stop += 1
        edges.append(stop)
    observed = np.add.reduceat(counts, edges[:-1])
    wanted = np.add.reduceat(expected, edges[:-1])
    assert stats.chisquare(observed, wanted).pvalue > 1e-3
    assert abs(counts[100:].sum() - expected[100:].sum()) < 4 * np.sqrt(expected[100:].sum())


def test_filters():
    filter_logits = jax.jit(_filter_logits, static_argnames=("temperature", "top_k", "top_p"))
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    top2 = filter_logits(logits, top_k=2)
    np.testing.assert_array_equal(np.isfinite(top2), [[True, True, False, False]])
    nucleus = filter_logits(logits, top_p=0.7)  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    np.testing.assert_array_equal(np.isfinite(nucleus), [[True, True, False, False]])
    assert np.isfinite(filter_logits(logits, top_p=0.1)).sum() == 1
    np.testing.assert_allclose(filter_logits(logits, temperature=0.5), logits / 0.5)
    tokens = jax.jit(sample_categorical)(jax.random.key(3), jnp.broadcast_to(nucleus, (5000, 4)))
    assert set(np.unique(tokens)) == {0, 1}
    assert abs(float((tokens == 0).mean()) - 0.5 / 0.8) < 0.03
