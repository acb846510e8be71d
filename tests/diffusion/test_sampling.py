"""Samplers (docs/algorithms.md §6). References: the exact distribution of the T-step ancestral
sampler by enumeration (float64 numpy) with a chi-square test (scipy); the docs/algorithms.md rules
checked on recorded trajectories; argmax of a fixed logits table for the shift convention."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from diffujax.diffusion import (sample_ancestral, sample_confidence, sample_semi_ar,
                                sample_threshold)
from diffujax.diffusion.sampling import infill_canvas
from diffusion_toys import fixed_apply, mixing_apply, sequence_index, table_apply

# --- exact distribution of the ancestral sampler -------------------------------------------

K, M, V, L = 3, 3, 4, 4


def ancestral_distribution(table, x0, steps):
    """P(x_{1:}) of Algorithm 2 with ``steps`` steps: each position is revealed at a step drawn
    uniformly and independently (prob. 1/(s+1) at level s), all positions revealed at one step
    are drawn independently given the canvas before it; position i reads logits row i - 1."""
    probs = {}
    log_softmax = special.log_softmax(table, axis=-1)
    logp_of = lambda canvas: log_softmax[sequence_index(canvas, V)]
    for reveal_at in itertools.product(range(steps), repeat=L - 1):
        for x in itertools.product(range(K), repeat=L - 1):
            canvas, logp = np.array([x0, M, M, M]), 0.0
            for step in range(steps):
                now = [i for i in range(1, L) if reveal_at[i - 1] == step]
                current = logp_of(canvas)
                logp += sum(current[i - 1, x[i - 1]] for i in now)
                canvas[now] = [x[i - 1] for i in now]
            probs[x] = probs.get(x, 0.0) + np.exp(logp) / steps ** (L - 1)
    return probs


def test_ancestral_sampler_draws_from_its_exact_distribution():
    rng = np.random.default_rng(0)
    table = rng.normal(0.0, 1.5, (V ** L, L, V))
    table[..., M] = -1e9  # the model never proposes the mask token
    steps, rows = 3, 20_000
    canvas = jnp.tile(jnp.array([[1, 0, 0, 0]], jnp.int32), (rows, 1))
    src = jnp.zeros((rows, L), bool).at[:, 0].set(True)
    out = sample_ancestral(table_apply, jnp.asarray(table, jnp.float32), canvas, src,
                           jax.random.key(0), mask_token_id=M, steps=steps)
    assert int(out.forwards) <= steps
    exact = ancestral_distribution(table, 1, steps)
    outcomes = list(exact)
    codes = {x: n for n, x in enumerate(outcomes)}
    drawn = np.bincount([codes[tuple(r)] for r in np.asarray(out.tokens)[:, 1:]],
                        minlength=len(outcomes))
    expected = rows * np.array([exact[x] for x in outcomes])
    assert abs(expected.sum() - rows) < 1e-6
    assert stats.chisquare(drawn, expected).pvalue > 1e-3


# --- trajectory rules on an infilling canvas -----------------------------------------------

B, LEN, VOCAB, MASK = 5, 12, 7, 6
SRC = np.zeros((B, LEN), bool)
SRC[:, :3] = True  # prefix
SRC[:, -2:] = True  # suffix
SRC[1, 6] = True  # a fixed token in the middle
SRC[3, 3:10] = True  # nothing to generate in this row


@pytest.fixture(scope="module")
def mixing():
    weights = jax.random.normal(jax.random.key(1), (LEN, VOCAB, LEN, VOCAB))
    return weights.at[..., MASK].set(-30.0)


def _canvas():
    return jax.random.randint(jax.random.key(2), (B, LEN), 0, MASK)


SAMPLERS = {
    "ancestral": (sample_ancestral, dict(steps=6, temperature=1.0, top_k=3)),
    "confidence": (sample_confidence, dict(steps=4, temperature=1.0)),
    "semi_ar": (sample_semi_ar, dict(steps=2, block_length=3)),
    "threshold": (sample_threshold, dict(threshold=0.6, temperature=1.0)),
    "threshold_blocks": (sample_threshold, dict(threshold=0.3, block_length=2)),
}


def trajectory(canvas, out):
    """The canvas after each step, from ``commit_step`` (a generated position holds the mask
    token until the step that commits it, then its final token; a fixed one never changes)."""
    tokens, commit = np.asarray(out.tokens), np.asarray(out.commit_step)
    start = np.where(commit >= 0, MASK, np.asarray(canvas))
    return np.stack([np.where((commit >= 0) & (commit <= s), tokens, start)
                     for s in range(commit.max() + 1)])


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_trajectory_rules(mixing, name):
    sampler, kwargs = SAMPLERS[name]
    canvas = _canvas()
    out = sampler(mixing_apply, mixing, canvas, jnp.asarray(SRC), jax.random.key(3),
                  mask_token_id=MASK, **kwargs)
    tokens, commit = np.asarray(out.tokens), np.asarray(out.commit_step)
    history = trajectory(canvas, out)
    generate = ~SRC
    # fixed positions never change; every other position is committed exactly once, for good
    np.testing.assert_array_equal(tokens[SRC], np.asarray(canvas)[SRC])
    assert (commit[SRC] == -1).all() and (commit[generate] >= 0).all()
    assert (tokens[generate] != MASK).all()
    rows_with_work = generate.any(axis=1)
    np.testing.assert_array_equal(np.asarray(out.row_forwards)[~rows_with_work], 0)
    assert int(out.forwards) == np.asarray(out.row_forwards).max() == commit.max() + 1

    n = generate.sum(axis=1)
    still_masked = np.stack([(generate & (commit > s)).sum(axis=1) for s in range(len(history))])
    if name == "ancestral":  # each token is among the top 3 of its logits (row j - 1)
        start = np.where(generate, MASK, np.asarray(canvas))
        for b, j in zip(*np.nonzero(generate)):
            before = start[b] if commit[b, j] == 0 else history[commit[b, j] - 1, b]
            logits = np.asarray(mixing_apply(mixing, jnp.asarray(before[None]), None))[0, j - 1]
            assert tokens[b, j] in np.argsort(logits)[-3:]
    if name == "confidence":  # floor(N * s / T) left masked after each of the T steps
        steps = kwargs["steps"]
        np.testing.assert_array_equal(still_masked, [n * (steps - 1 - k) // steps
                                                     for k in range(steps)])
    if "block_length" in kwargs:  # a block is complete before the next one starts
        size = kwargs["block_length"]
        for b in range(B):
            order = commit[b][generate[b]]
            blocks = [order[i:i + size] for i in range(0, len(order), size)]
            assert all(x.max() < y.min() for x, y in zip(blocks, blocks[1:]))
    if name.startswith("threshold"):  # at least one commit per pass while something is masked
        before = np.vstack([n, still_masked[:-1]])
        assert ((before - still_masked >= 1) | (before == 0)).all()


def test_shift_convention_and_greedy_determinism():
    """Position j gets argmax of the logits at j - 1; greedy ignores the key."""
    table = jax.random.normal(jax.random.key(4), (LEN, VOCAB)).at[:, MASK].set(-1e9)
    canvas, src = _canvas(), jnp.asarray(SRC)
    outs = [sample_confidence(fixed_apply, table, canvas, src, jax.random.key(k),
                              mask_token_id=MASK, steps=7).tokens for k in (5, 6)]
    np.testing.assert_array_equal(outs[0], outs[1])
    predicted = np.concatenate([[-1], np.argmax(np.asarray(table), axis=-1)[:-1]])
    expected = np.where(SRC, np.asarray(canvas), predicted[None, :])
    np.testing.assert_array_equal(outs[0], expected)


@pytest.mark.parametrize("name", ["ancestral", "confidence", "threshold"])
def test_rows_do_not_depend_on_their_batch(mixing, name):
    sampler, kwargs = SAMPLERS[name]
    canvas, src, key = _canvas(), jnp.asarray(SRC), jax.random.key(7)
    together = sampler(mixing_apply, mixing, canvas, src, key, mask_token_id=MASK, **kwargs)
    for b in (0, 2):  # one row alone, told its index in the original batch
        alone = sampler(mixing_apply, mixing, canvas[b:b + 1], src[b:b + 1], key,
                        mask_token_id=MASK, row_ids=jnp.array([b]), **kwargs)
        np.testing.assert_array_equal(alone.tokens[0], together.tokens[b])


def test_threshold_decoding_needs_fewer_passes_on_a_confident_model():
    table = jnp.full((LEN, VOCAB), -8.0).at[jnp.arange(LEN), jnp.arange(LEN) % MASK].set(8.0)
    canvas, src = _canvas(), jnp.asarray(SRC)
    generated = (~SRC).sum(axis=1).max()
    greedy = sample_confidence(fixed_apply, table, canvas, src, jax.random.key(8),
                               mask_token_id=MASK, steps=generated)
    fast = sample_threshold(fixed_apply, table, canvas, src, jax.random.key(8),
                            mask_token_id=MASK, threshold=0.9)
    np.testing.assert_array_equal(fast.tokens, greedy.tokens)
    assert int(fast.forwards) == 1 and int(greedy.forwards) == generated


@pytest.mark.parametrize("sampler", [sample_ancestral, sample_confidence])
def test_the_mask_token_is_never_committed(sampler):
    """A model that puts almost all its mass on the mask token: every revealed position still
    holds a real token (the mask is excluded from the candidates, the rest renormalised)."""
    logits = np.zeros((L, V), np.float32)
    logits[:, M] = 30.0
    canvas = jnp.tile(jnp.array([[1, 0, 0, 0]], jnp.int32), (64, 1))
    src = jnp.zeros(canvas.shape, bool).at[:, 0].set(True)
    out = sampler(fixed_apply, jnp.asarray(logits), canvas, src, jax.random.key(3),
                  mask_token_id=M, steps=3)
    tokens = np.asarray(out.tokens)[:, 1:]
    assert (tokens != M).all() and (tokens < V).all()


def test_ancestral_steps_that_reveal_nothing_run_no_forward_pass():
    """With T = 32 steps and 3 masked positions most steps reveal nothing: only the steps that
    commit something cost a forward pass (the output is unchanged by skipping the others)."""
    rng = np.random.default_rng(1)
    table = rng.normal(0.0, 1.0, (V ** L, L, V)).astype(np.float32)
    canvas = jnp.array([[1, 0, 0, 0]], jnp.int32)
    src = jnp.zeros(canvas.shape, bool).at[:, 0].set(True)
    for seed in range(5):
        out = sample_ancestral(table_apply, jnp.asarray(table), canvas, src, jax.random.key(seed),
                               mask_token_id=M, steps=32)
        passes = len(set(np.asarray(out.commit_step)[0, 1:].tolist()))
        assert int(out.forwards) == passes <= 3
        assert (np.asarray(out.tokens)[0, 1:] != M).all()


@pytest.mark.parametrize("head, span, tail", [([5], 3, []), ([5, 6], 2, [7, 8]), ([4], 0, [2])])
def test_the_infill_canvas_masks_the_span_and_fixes_the_rest(head, span, tail):
    """The row generate and training-time samples fill, written out by hand."""
    tokens, src = infill_canvas(head, span, M, tail)
    assert tokens.dtype == np.int32
    assert tokens.tolist() == head + [M] * span + tail
    assert src.tolist() == [True] * len(head) + [False] * span + [True] * len(tail)
