"""Reference parity of the confidence sampler: ``ranking="all"`` with
``confidence_temperature`` against a plain re-implementation of ``generate_samples`` from
HKUNLP/DiffuLLaMA (LLaMA-Factory/src/llamafactory/train/ddm/trainer.py), written as that loop
is written (one forward before the loop, then t = T-1..1: cutoff over all initially maskable
positions scored by the fresh prediction, strict ``<``, commit, forward), on the same weights
and the same candidate draws. The one deliberate difference kept on both sides: the mask token
is never a candidate (a revealed position must hold a real token)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffujax.diffusion import sample_categorical, sample_confidence
from diffusion_toys import mixing_apply

V, M, L = 7, 6, 9


def reference_loop(weights, canvas, src, key, *, steps, temperature, greedy):
    """``generate_samples(..., gsm=greedy)`` with ``logits_temp = temperature`` and shift, one
    row at a time (numpy, float32 logits from the same toy model)."""
    out = []
    for row, (x, fixed) in enumerate(zip(np.asarray(canvas), np.asarray(src))):
        row_key = jax.random.fold_in(key, row)
        init = ~fixed & (np.arange(L) > 0)

        def predict(xt, forward):
            logits = np.asarray(mixing_apply(weights, jnp.asarray(xt[None]), None))[0]
            logits = np.concatenate([logits[:1], logits[:-1]]).astype(np.float32)  # shift
            logits[:, M] = -np.inf
            tempered = logits / np.float32(temperature)
            scores = tempered - np.log(np.exp(tempered - tempered.max(-1, keepdims=True)).sum(
                -1, keepdims=True)) - tempered.max(-1, keepdims=True)
            if greedy:
                cand = logits.argmax(-1)
            else:
                draw_key = jax.random.fold_in(jax.random.fold_in(row_key, forward), 0)
                cand = np.asarray(sample_categorical(draw_key, jnp.asarray(tempered)))
            return cand, scores[np.arange(L), cand]

        xt = np.where(init, M, x)
        maskable = init.copy()
        cand, scores = predict(xt, 0)
        x0 = np.where(maskable, cand, xt)
        for forward, t in enumerate(range(steps - 1, 0, -1), start=1):
            cutoff_len = int(init.sum() * t / steps)
            ranked = np.where(init, scores, 1000.0)
            lowest = ranked < np.sort(ranked)[cutoff_len]
            commit = maskable & ~lowest
            xt[commit] = x0[commit]
            maskable &= lowest
            cand, scores = predict(xt, forward)
            x0 = np.where(maskable, cand, xt)
        out.append(x0)
    return np.stack(out)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(3)
    weights = jnp.asarray(rng.normal(0.0, 1.0, (L, V, L, V)), jnp.float32)
    canvas = jnp.asarray(rng.integers(0, M, (6, L)), jnp.int32)
    src = np.zeros((6, L), bool)
    src[:, 0] = True
    src[1, 1:3] = True  # a prefix
    src[2, -2:] = True  # a suffix (infilling)
    src[3, 4] = True  # a fixed token in the middle
    return weights, canvas, jnp.asarray(src)


@pytest.mark.parametrize("greedy,temperature,steps", [(True, 0.9, 4), (True, 0.5, 8),
                                                      (False, 1.0, 4), (False, 0.7, 5)])
def test_reference_ranking_equals_the_reference_loop(problem, greedy, temperature, steps):
    weights, canvas, src = problem
    key = jax.random.key(11)
    out = sample_confidence(mixing_apply, weights, canvas, src, key, mask_token_id=M,
                            steps=steps, temperature=0.0 if greedy else temperature,
                            ranking="all", confidence_temperature=temperature)
    expected = reference_loop(weights, canvas, src, key, steps=steps, temperature=temperature,
                              greedy=greedy)
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)


def test_reference_ranking_commits_at_least_the_schedule_and_differs(problem):
    weights, canvas, src = problem
    key, steps = jax.random.key(0), 8
    runs = {ranking: sample_confidence(mixing_apply, weights, canvas, src, key, mask_token_id=M,
                                       steps=steps, temperature=1.0, ranking=ranking)
            for ranking in ("masked", "all")}
    generate = ~np.asarray(src) & (np.arange(L) > 0)
    n = generate.sum(axis=1)
    for ranking, out in runs.items():
        commit = np.asarray(out.commit_step)
        for step in range(int(out.forwards)):
            still = (commit > step) & generate  # masked after the step
            nominal = n * (steps - 1 - step) // steps
            if ranking == "masked":
                np.testing.assert_array_equal(still.sum(axis=1), nominal)
            else:
                assert (still.sum(axis=1) <= nominal).all()
    assert int(runs["all"].forwards) <= int(runs["masked"].forwards)
    assert not np.array_equal(np.asarray(runs["all"].commit_step),
                              np.asarray(runs["masked"].commit_step))


def test_unknown_ranking_is_refused(problem):
    weights, canvas, src = problem
    with pytest.raises(ValueError, match="ranking 'best' is not one of"):
        sample_confidence(mixing_apply, weights, canvas, src, jax.random.key(0), mask_token_id=M,
                          steps=2, ranking="best")
