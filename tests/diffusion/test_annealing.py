"""Attention-mask annealing (docs/algorithms.md §3), as the training loop uses it through
``diffujax.attention.pattern``. References: the docs/algorithms.md ratio formula, the exact causal /
full masks (numpy ``tril`` / ``ones``) and the binomial distribution of the opened future
entries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffujax.attention.pattern import (anneal_end, anneal_ratio, annealed, dense_mask,
                                        for_training, is_annealing)

L = 64
FUTURE = np.triu(np.ones((L, L), bool), k=1)


_dense = jax.jit(dense_mask, static_argnums=1)


def _mask(pattern):
    return np.asarray(_dense(pattern, L))


def test_ratio_follows_the_spec():
    for step, steps, expected in [(0, 10, 0.1), (4, 10, 0.5), (9, 10, 1.0), (50, 10, 1.0),
                                  (0, 1, 1.0), (123, 0, 1.0)]:
        assert float(anneal_ratio(step, steps)) == pytest.approx(expected)


def test_ratio_zero_is_exactly_causal():
    for seed, step in [(0, 0), (3, 17), (12345, 999)]:
        np.testing.assert_array_equal(_mask(annealed(seed, step, 0.0)), np.tril(np.ones((L, L))))


def test_ratio_one_is_exactly_full():
    full_mask = np.ones((L, L), bool)
    np.testing.assert_array_equal(_mask(annealed(7, 3, 1.0)), full_mask)
    np.testing.assert_array_equal(_mask(for_training(9, anneal_steps=10, seed=7)), full_mask)
    np.testing.assert_array_equal(_mask(for_training(0, anneal_steps=1)), full_mask)  # SFT
    assert for_training(5, anneal_steps=0).kind == "full"


@pytest.mark.parametrize("anneal_steps", [0, 1, 2, 7, 100, 4099])
def test_the_phase_is_on_exactly_while_the_ratio_is_below_one(anneal_steps):
    """The host-side phase (integers, a static argument of the train step) against the ratio of
    the spec (float32, as the step computes it): the loop leaves the annealed pattern at the
    first step where it is all open, never before; off, the pattern is the plain full one."""
    steps = np.arange(anneal_steps + 3)
    ratios = np.asarray(anneal_ratio(jnp.asarray(steps), anneal_steps)) * np.ones(len(steps))
    phases = np.asarray([is_annealing(int(s), anneal_steps) for s in steps])
    np.testing.assert_array_equal(phases, ratios < 1)
    assert anneal_end(anneal_steps) == int(np.argmax(ratios >= 1))  # the first all-open step
    assert for_training(0, anneal_steps, seed=3, annealing=False).kind == "full"


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.5, 0.9])
def test_opened_fraction_matches_ratio(ratio):
    mask = _mask(annealed(1, 2, ratio))
    assert mask[~FUTURE].all()  # the causal part is always open
    opened, n = mask[FUTURE].sum(), FUTURE.sum()
    assert abs(opened - ratio * n) < 4 * np.sqrt(n * ratio * (1 - ratio))


def test_opened_fraction_over_steps_follows_the_ramp():
    steps = jnp.arange(0, 100, 7)
    masks = jax.vmap(lambda s: dense_mask(for_training(s, anneal_steps=100, seed=4), L))(steps)
    fractions = np.asarray(masks)[:, FUTURE].mean(axis=1)
    ratios = np.minimum(1, (np.asarray(steps) + 1) / 100)
    n = FUTURE.sum()
    assert np.all(np.abs(fractions - ratios) < 4 * np.sqrt(ratios * (1 - ratios) / n) + 1e-9)


def test_pattern_depends_on_seed_and_step_and_a_traced_step_gives_the_same():
    a = _mask(for_training(5, anneal_steps=10, seed=3))
    # the train step traces ``step``: under jit the same (seed, step) gives the same pattern
    traced = jax.jit(lambda s: dense_mask(for_training(s, anneal_steps=10, seed=3), L))(5)
    np.testing.assert_array_equal(a, np.asarray(traced))
    assert (a != _mask(for_training(6, anneal_steps=10, seed=3)))[FUTURE].any()
    assert (a != _mask(for_training(5, anneal_steps=10, seed=4)))[FUTURE].any()


def test_openings_are_nested_as_the_ratio_grows():
    """At a fixed (seed, step) a higher ratio only opens more entries (one hash, one threshold)."""
    low, high = _mask(annealed(2, 8, 0.2)), _mask(annealed(2, 8, 0.6))
    assert not (low & ~high).any()
