"""Training objective (docs/algorithms.md §2 steps 4-6) and the AR loss. Reference: a float64 numpy
loop written from the docs/algorithms.md formulas; gradient accumulation is checked against the
full-batch gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffujax.attention.pattern import causal, full
from diffujax.diffusion import (NoisedBatch, ar_loss_sums, diffusion_loss_sums, forward_process,
                                loss_sums_from_logits)
from diffusion_toys import mixing_apply

B, L, V, M = 4, 7, 11, 10


def _reference(logits, x, noise, t, src, loss_mask, normalization):
    """docs/algorithms.md §2.4-2.6 as loops in float64."""
    logits = np.asarray(logits, np.float64)
    x, noise, t = np.asarray(x), np.asarray(noise), np.asarray(t, np.float64)
    src, loss_mask = np.asarray(src), np.asarray(loss_mask)
    weighted = unweighted = noised = targets = 0.0
    per_sequence = []
    for b in range(B):
        seq_weighted = seq_targets = 0.0
        for i in range(L - 1):
            j = i + 1  # logits at i predict position i + 1
            if src[b, j] or not loss_mask[b, j]:
                continue
            seq_targets += 1
            if noise[b, j]:
                row = logits[b, i]
                ce = np.log(np.exp(row - row.max()).sum()) + row.max() - row[x[b, j]]
                seq_weighted += ce / t[b]
                unweighted += ce
                noised += 1
        weighted += seq_weighted
        targets += seq_targets
        per_sequence.append(seq_weighted / max(seq_targets, 1))
    loss = dict(masked=weighted / noised, tokens=weighted / targets,
                sequence=np.mean(per_sequence))[normalization]
    return loss, unweighted / noised, targets


def _case(dtype):
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(0), 5)
    logits = (3 * jax.random.normal(k1, (B, L, V))).astype(dtype)
    x = jax.random.randint(k2, (B, L), 0, V)
    x = x.at[0, 3].set(M)  # the mask id occurring in clean text, not noised below
    noise = jax.random.bernoulli(k3, 0.5, (B, L)).at[0, 3].set(False).at[:, 2].set(True)
    src = jnp.zeros((B, L), bool).at[1, :3].set(True).at[2, 5].set(True)
    noise = noise & ~src
    loss_mask = jnp.ones((B, L), bool).at[3, 5:].set(False)
    t = jax.random.uniform(k4, (B,), minval=0.05, maxval=1.0)
    return logits, x, NoisedBatch(t, noise, jnp.where(noise, M, x)), src, loss_mask


@pytest.mark.parametrize("normalization", ["masked", "tokens", "sequence"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_loss_matches_float64_reference(normalization, dtype):
    logits, x, noised, src, loss_mask = _case(dtype)
    sums = jax.jit(loss_sums_from_logits, static_argnames="normalization")(
        logits, x, noised, src=src, loss_mask=loss_mask, normalization=normalization)
    loss, unweighted, targets = _reference(logits.astype(jnp.float32), x, noised.noise, noised.t,
                                           src, loss_mask, normalization)
    np.testing.assert_allclose(sums.loss, loss, rtol=1e-5)
    metrics = sums.metrics()
    np.testing.assert_allclose(metrics["unweighted_masked_loss"], unweighted, rtol=1e-5)
    assert float(metrics["target_tokens"]) == targets


def test_unknown_normalization_is_rejected():
    logits, x, noised, src, _ = _case(jnp.float32)
    with pytest.raises(ValueError, match="normalization"):
        loss_sums_from_logits(logits, x, noised, normalization="mean")


def _mixing_params():
    return 0.5 * jax.random.normal(jax.random.key(1), (L, V, L, V))


def test_diffusion_loss_is_the_loss_of_its_own_forward_process():
    params, x = _mixing_params(), jax.random.randint(jax.random.key(2), (B, L), 0, M)
    key = jax.random.key(3)
    sums = jax.jit(lambda p: diffusion_loss_sums(
        mixing_apply, p, x, key, mask_token_id=M, pattern=full(), normalization="tokens",
        stratified=True))(params)
    loss, metrics = sums.loss, sums.metrics()

    @jax.jit
    def by_hand(p):
        noised = forward_process(key, x, mask_token_id=M, stratified=True)
        return loss_sums_from_logits(mixing_apply(p, noised.x_t, full()), x, noised,
                                     normalization="tokens")

    expected = by_hand(params)
    np.testing.assert_allclose(loss, expected.loss, rtol=1e-6)
    assert float(metrics["target_tokens"]) == B * (L - 1)


@pytest.mark.parametrize("normalization", ["masked", "tokens", "sequence"])
def test_gradient_accumulation_equals_full_batch(normalization):
    """Micro-batch sums, added and divided once, give the full-batch loss and gradient."""
    params = _mixing_params()
    x = jax.random.randint(jax.random.key(4), (8, L), 0, M)
    src = jnp.zeros((8, L), bool).at[::3, :2].set(True)
    key = jax.random.key(5)
    kwargs = dict(mask_token_id=M, pattern=full(), normalization=normalization, stratified=True)

    def numerator(p, tokens, source, offset):
        sums = diffusion_loss_sums(mixing_apply, p, tokens, key, src=source, row_offset=offset,
                                   global_batch=8, **kwargs)
        return sums.weighted, sums

    grad_fn = jax.jit(jax.grad(numerator, has_aux=True))
    total_grad, total = None, None
    for start in (0, 2, 4, 6):
        g, sums = grad_fn(params, x[start:start + 2], src[start:start + 2], start)
        total_grad = g if total_grad is None else total_grad + g
        total = sums if total is None else total + sums
    accumulated = total_grad / total.denominator

    def full_loss(p):
        return diffusion_loss_sums(mixing_apply, p, x, key, src=src, **kwargs).loss

    loss, grad = jax.jit(jax.value_and_grad(full_loss))(params)
    np.testing.assert_allclose(total.loss, loss, rtol=1e-5)
    np.testing.assert_allclose(accumulated, grad, rtol=1e-4, atol=1e-7)


def test_ar_loss_matches_reference():
    logits, x, _, _, loss_mask = _case(jnp.float32)
    seen = []

    def apply_fn(params, tokens, pattern):
        seen.append((pattern, np.asarray(tokens)))
        return logits

    sums = ar_loss_sums(apply_fn, None, x, loss_mask=loss_mask)
    loss, metrics = sums.loss, sums.metrics()
    [(pattern, tokens)] = seen  # one forward pass, causal, on the clean tokens
    assert pattern == causal() and np.array_equal(tokens, x)
    everything = jnp.ones((B, L), bool)
    expected, _, _ = _reference(logits, x, everything, np.ones(B), ~everything, loss_mask, "tokens")
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # every next-token target counts except the two that loss_mask drops (row 3, positions 5, 6)
    assert float(metrics["target_tokens"]) == B * (L - 1) - 2
