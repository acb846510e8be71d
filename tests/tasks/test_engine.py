"""Batched, padded scoring and decoding equal the same computation on one unpadded row, and
equal plain implementations of the formulas on the model's logits with the same draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from diffujax.attention.pattern import causal, full
from diffujax.diffusion import conditional_nll, sample_confidence
from diffujax.tasks.engine import Engine, Row

from task_toys import MASK, logits_of, plain_reference_score

SEED = 5


LEVELS = 8


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(tiny_model, batch_size=3, seed=SEED)


@pytest.fixture(scope="module")
def rows():
    """Four rows (two batches of 3, the second padded with copies) over two length buckets."""
    rng = np.random.default_rng(1)
    shapes = [(5, 3), (12, 1), (25, 15), (3, 6)]
    return [Row.make(rng.integers(0, 60, c), rng.integers(0, 60, t), 100 + 7 * k)
            for k, (c, t) in enumerate(shapes)]


def test_diffusion_score_equals_a_plain_implementation_and_ignores_padding(engine, rows,
                                                                          tiny_model):
    batched = engine.diffusion_score(rows, num_levels=LEVELS)
    for row, value in zip(rows, batched):
        assert value == pytest.approx(plain_reference_score(tiny_model, row, seed=SEED, levels=LEVELS), rel=2e-5, abs=1e-5)


def test_ar_logprob_equals_a_plain_implementation(engine, rows, tiny_model):
    sums, counts, greedy = engine.ar_logprob(rows)
    for row, s, n, g in zip(rows, sums, counts, greedy):
        tokens = np.asarray(row.tokens)
        logp = special.log_softmax(logits_of(tiny_model, tokens, causal()), -1)
        span = np.flatnonzero(~np.asarray(row.fixed))
        assert s == pytest.approx(sum(logp[j - 1, tokens[j]] for j in span), rel=1e-5)
        assert n == len(span)
        assert g == all(logp[j - 1].argmax() == tokens[j] for j in span)


def test_llada_and_elbo_batched_equal_one_unpadded_row(engine, rows, tiny_model):
    m = tiny_model
    nll = engine.conditional_nll(rows, num_draws=4)
    nelbo, span = engine.conditional_elbo(rows, num_draws=4)
    # alone and unpadded: the shortest row (padded to 64 in its batch) and the one in the
    # second batch (padded with copies of itself)
    for row, a in [(rows[0], nll[0]), (rows[3], nll[3])]:
        tokens = jnp.asarray([row.tokens], jnp.int32)
        fixed = jnp.asarray([row.fixed])
        single = conditional_nll(m.apply_fn, m.params, tokens, fixed, jax.random.key(SEED),
                                 mask_token_id=MASK, num_draws=4, row_offset=row.row_id)
        assert a == pytest.approx(float(single[0]), rel=1e-5)
    single_engine = Engine(m, batch_size=1, seed=SEED)
    for row, a, n in [(rows[0], nelbo[0], span[0]), (rows[3], nelbo[3], span[3])]:
        alone, alone_span = single_engine.conditional_elbo([row], num_draws=4)
        assert a == pytest.approx(float(alone[0]), rel=1e-5) and n == alone_span[0]
        assert n == sum(not f for f in row.fixed)


def test_decoding_batched_equals_one_unpadded_row(engine, rows, tiny_model):
    m = tiny_model
    spans = engine.diffusion_decode(rows, steps=3)
    assert [len(s) for s in spans] == [sum(not f for f in r.fixed) for r in rows]
    for row, span in [(rows[0], spans[0]), (rows[3], spans[3])]:
        tokens = jnp.asarray([row.tokens], jnp.int32)
        fixed = jnp.asarray([row.fixed])
        out = sample_confidence(m.apply_fn, m.params, tokens, fixed, jax.random.key(SEED),
                                mask_token_id=MASK, steps=3, row_ids=jnp.asarray([row.row_id]))
        alone = np.asarray(out.tokens)[0][~np.asarray(row.fixed)]
        assert span == [int(t) for t in alone]
    # AR greedy decoding against a plain loop (one causal pass per token: position j - 1 only
    # sees the filled positions before j)
    for row, span in zip(rows, engine.ar_decode(rows)):
        x = list(row.tokens)
        start = row.fixed.index(False)
        for j in range(start, len(x)):
            x[j] = int(logits_of(m, x, causal())[j - 1].argmax())
        assert span == x[start:]


def test_on_a_mesh_the_engine_gives_the_one_device_numbers(tiny_ckpt, engine, rows):
    """data=2 x fsdp=2 x tensor=2 over the simulated devices: rows split over 4 batch shards
    (batches rounded up to 4 rows, padded with copies), parameters sharded as in training."""
    from diffujax.config import MeshSection, MeshShape
    from diffujax.parallel.mesh import make_layout
    from diffujax.runtime import load_for_inference

    section = MeshSection(shape=MeshShape(data=2, fsdp=2, tensor=2))
    model = load_for_inference(str(tiny_ckpt), layout=make_layout(section, jax.devices()[:8]))
    meshed = Engine(model, batch_size=3, seed=SEED)
    assert meshed.batch_size == 4
    np.testing.assert_allclose(meshed.diffusion_score(rows, num_levels=LEVELS),
                               engine.diffusion_score(rows, num_levels=LEVELS), rtol=1e-5)
    assert meshed.diffusion_decode(rows, steps=3) == engine.diffusion_decode(rows, steps=3)
