"""The "tokens" objective as a likelihood bound, by brute force (docs/algorithms.md §2.6 and 5).

Reference: exact enumeration in float64 numpy over a vocabulary of 3 real tokens plus the mask
and sequences of length 4 (position 0 given, 3 targets). For a masked set ``S`` of size ``k`` out
of ``m`` targets, ``P(S | t) = t^k (1 - t)^(m - k)``, so the expected weighted loss is
``sum_S c(k) sum_{i in S} ce_i(x_S)`` with ``c(k) = int_eps^1 t^(k-1) (1-t)^(m-k) dt / (1 - eps)``
(``= Beta(k, m-k+1)`` at ``eps = 0``). At ``eps = 0`` this equals the any-order autoregressive
NLL averaged over the ``m!`` orders, ``E_sigma[-log p_sigma(x)]``, which by Jensen upper-bounds
``-log p_model(x | x_0)`` of the model's reverse process (``p_model = E_sigma p_sigma``), and is
exactly ``-log p_data(x | x_0)`` when the model is the data's own posterior.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from diffujax.attention.pattern import full
from diffujax.diffusion import NoisedBatch, elbo_terms, per_sequence_terms, summarize_nll
from diffusion_toys import all_sequences, sequence_index, table_apply

K, M, V, L = 3, 3, 4, 4  # real tokens 0..2, mask 3
TARGETS = tuple(range(1, L))
SUBSETS = [s for r in range(1, L) for s in itertools.combinations(TARGETS, r)]
DATA = all_sequences(K, L)  # every clean sequence, x_0 included
CANVASES = all_sequences(V, L)  # every noised sequence


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    return z - special.logsumexp(z, axis=-1, keepdims=True)


def _noised(x, subset):
    x = np.array(x)
    x[list(subset)] = M
    return x


def subset_weight(k, eps):
    m = L - 1
    beta = special.beta(k, m - k + 1)
    return beta if eps == 0 else beta * (1 - special.betainc(k, m - k + 1, eps)) / (1 - eps)


def ce_of(table, x, subset):
    """sum over i in S of -log p(x_i | x_S) under the shift: logits row i - 1 predicts i."""
    logp = _log_softmax(table[sequence_index(_noised(x, subset), V)])
    return -sum(logp[i - 1, x[i]] for i in subset)


def exact_nelbo(table, x, eps=0.0):
    return sum(subset_weight(len(s), eps) * ce_of(table, x, s) for s in SUBSETS)


def order_log_probs(table, x):
    """log p_sigma(x_{1:} | x_0) for each reveal order sigma of the targets."""
    out = []
    for order in itertools.permutations(TARGETS):
        canvas, logp = _noised(x, TARGETS), 0.0
        for i in order:
            logp += _log_softmax(table[sequence_index(canvas, V)])[i - 1, x[i]]
            canvas[i] = x[i]
        out.append(logp)
    return np.array(out)


@pytest.fixture(scope="module")
def random_table():
    return np.random.default_rng(0).normal(0.0, 1.5, (V ** L, L, V))


def test_library_ce_matches_enumeration(random_table):
    """diffujax's shifted ce over a fixed noise set equals the enumeration's, for every (x, S)."""
    pairs = [(x, s) for x in DATA for s in SUBSETS]
    x = jnp.asarray(np.stack([p[0] for p in pairs]))
    noise = np.zeros(x.shape, bool)
    for row, (_, s) in enumerate(pairs):
        noise[row, list(s)] = True

    @jax.jit
    def terms(table, x, noise):
        x_t = jnp.where(noise, M, x)
        logits = table_apply(table, x_t, full())
        return per_sequence_terms(logits, x, NoisedBatch(jnp.ones(x.shape[0]), noise, x_t))

    got = terms(jnp.asarray(random_table, jnp.float32), x, jnp.asarray(noise))
    expected = [ce_of(random_table, *p) for p in pairs]
    np.testing.assert_allclose(got["unweighted"], expected, rtol=1e-5)


def test_objective_is_the_any_order_nll_and_bounds_the_model_nll(random_table):
    for x0 in range(K):
        total_mass = 0.0
        for x in DATA[DATA[:, 0] == x0]:
            nelbo = exact_nelbo(random_table, x)
            logp = order_log_probs(random_table, x)
            np.testing.assert_allclose(nelbo, -logp.mean(), rtol=1e-12)
            model_nll = -special.logsumexp(logp, b=1 / len(logp))
            assert nelbo >= model_nll - 1e-12
            total_mass += np.exp(-model_nll)
        # the reverse process is a (sub-)distribution: mass can go to the mask token itself
        assert total_mass <= 1 + 1e-12


def _posterior_table(p_data):
    """The optimal denoiser: at each masked position the data posterior given the visible
    tokens; logits at i - 1 predict position i. The mask token gets a negligible logit."""
    table = np.zeros((V ** L, L, V))
    table[..., M] = -60.0
    for canvas in CANVASES:
        visible = canvas != M
        consistent = np.all((DATA == canvas) | ~visible, axis=1)
        weights = p_data * consistent
        if weights.sum() == 0:
            continue
        for i in TARGETS:
            if canvas[i] == M:
                posterior = np.bincount(DATA[:, i], weights=weights, minlength=K) / weights.sum()
                table[sequence_index(canvas, V), i - 1, :K] = np.log(posterior)
    return table


def test_bound_is_tight_for_the_true_posterior():
    p_data = np.random.default_rng(1).dirichlet(np.full(len(DATA), 0.5))
    table = _posterior_table(p_data)
    p_x0 = np.bincount(DATA[:, 0], weights=p_data, minlength=K)
    conditional_nll = -np.log(p_data / p_x0[DATA[:, 0]])
    nelbo = np.array([exact_nelbo(table, x) for x in DATA])
    np.testing.assert_allclose(nelbo, conditional_nll, rtol=1e-9, atol=1e-9)
    entropy = (p_data * conditional_nll).sum()
    np.testing.assert_allclose((p_data * nelbo).sum(), entropy, rtol=1e-9)


def test_monte_carlo_elbo_converges_to_exact_expectation(random_table):
    eps, copies, draws = 1e-3, 150, 2
    data = DATA[DATA[:, 0] == 1]
    exact = np.mean([exact_nelbo(random_table, x, eps) for x in data]) / (L - 1)
    tokens = jnp.asarray(np.tile(data, (copies, 1)))
    run = jax.jit(lambda table, tokens, key: elbo_terms(
        table_apply, table, tokens, key, mask_token_id=M, num_draws=draws, eps=eps))
    nelbo, targets = run(jnp.asarray(random_table, jnp.float32), tokens, jax.random.key(0))
    np.testing.assert_array_equal(targets, L - 1)
    estimate = summarize_nll(nelbo, targets, num_draws=draws)
    assert estimate.num_tokens == tokens.shape[0] * (L - 1) and estimate.num_draws == draws
    assert abs(estimate.mean_nll - exact) < 4 * estimate.std_error, (estimate, exact)
    assert estimate.std_error < 0.05 * exact  # the check above has teeth
