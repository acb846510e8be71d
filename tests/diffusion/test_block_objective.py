"""Block diffusion training and likelihood (docs/algorithms.md §9).

Reference: the block NELBO written from its definition, one block at a time. For block ``b`` the
model runs on ``[clean blocks < b, noisy block b]`` (a plain single-stream input, positions
``0..end-1``) under a mask built here in numpy (causal across blocks, open inside a block), and
every target ``j`` of block ``b`` is scored from that run's logits at ``j - 1``; cross-entropy,
``1 / t`` weights and the normalisations are float64 numpy. The vectorised two-stream
``[x_t ; x_0]`` pass must give the same loss on the same draws (the draws are read back from
``block_forward_process`` and checked on their own).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffujax.attention.pattern import annealed, dense_mask, full
from diffujax.diffusion import elbo_terms, loss_sums_from_logits
from diffujax.diffusion.blocks import (block_diffusion_loss_sums, block_forward_process,
                                       effective_block_size)
from diffujax.diffusion.noise import sample_block_t
from diffujax.models import GPT2Config, LlamaConfig, apply_fn_for, init_params

V, M = 40, 1
LLAMA = LlamaConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, mask_token_id=M)
GPT2 = GPT2Config(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
                  intermediate_size=64, max_positions=32, mask_token_id=M)


_APPLY = {}


def apply_for(config):
    """The model's forward pass, jitted once per config (the tests call it at many shapes)."""
    if config not in _APPLY:
        _APPLY[config] = jax.jit(apply_fn_for(config))
    return _APPLY[config]


@pytest.fixture(scope="module")
def params():
    return {"llama": init_params(LLAMA, seed=3), "gpt2": init_params(GPT2, seed=3)}


def _numpy_block_mask(length: int, n: int, segments=None) -> np.ndarray:
    """``[L, L]`` (or ``[B, L, L]``): key in an earlier block, or in the query's block."""
    q, k = np.arange(length)[:, None] // n, np.arange(length)[None, :] // n
    mask = k <= q
    if segments is not None:
        seg = np.asarray(segments)
        mask = mask[None] & (seg[:, :, None] == seg[:, None, :])
    return mask


def _run_with_mask(config, params, tokens, n, segments=None, positions=None, inner=None):
    """The model on ``tokens`` under the numpy block mask: run through the pattern whose dense
    mask it is (checked equal to the numpy mask first, so the reference rests on numpy).
    ``inner``: an annealed pattern instead of full attention inside a block; its mask must lie
    between the causal and the full block mask (the hashed entries are its own)."""
    segments_ = None if segments is None else jnp.asarray(segments)
    pattern = dataclasses.replace(inner or full(), segment_ids=segments_).with_blocks(n)
    mask = np.asarray(dense_mask(pattern, tokens.shape[1]))
    numpy_mask = _numpy_block_mask(tokens.shape[1], n, segments)
    if inner is None:
        np.testing.assert_array_equal(mask, numpy_mask)
    else:
        causal = np.tril(np.ones(numpy_mask.shape[-2:], bool))
        assert (mask <= numpy_mask).all() and (mask >= (numpy_mask & causal)).all()
        assert (mask != (numpy_mask & causal)).any() and (mask != numpy_mask).any()
    return np.asarray(apply_for(config)(params, jnp.asarray(tokens), pattern,
                                        _maybe(positions)), np.float64)


def reference_block_terms(config, params, x, noise, t, n, src=None, loss_mask=None,
                          segments=None, positions=None, inner=None):
    """Per row: weighted (sum of ce / t over noised targets), unweighted, noised and target
    counts, the block NELBO from its definition, one block at a time.

    Block ``b`` (positions ``start..end-1``) is the run on ``[x_0 before start, x_t of the
    block]``; the positions after ``end`` are filled with the clean tokens only so that every
    block's run has one shape (one compile, one batched call): the mask hides later blocks
    from every position ``< end``, so the filler changes no logit that is read.
    """
    x, noise, t = np.asarray(x), np.asarray(noise), np.asarray(t, np.float64)
    rows, length = x.shape
    src = np.zeros_like(noise) if src is None else np.asarray(src)
    loss_mask = np.ones_like(noise) if loss_mask is None else np.asarray(loss_mask)
    x_t = np.where(noise, M, x)
    starts = list(range(0, length, n))
    inputs = []
    for start in starts:
        end = min(start + n, length)
        inputs.append(np.concatenate([x[:, :start], x_t[:, start:end], x[:, end:]], axis=1))
    seg = None if segments is None else np.concatenate([segments] * len(starts))
    pos = None if positions is None else np.concatenate([positions] * len(starts))
    logits = _run_with_mask(config, params, np.concatenate(inputs), n, seg, pos, inner)
    logits = logits.reshape(len(starts), rows, length, -1)
    out = {k: np.zeros(rows) for k in ("weighted", "unweighted", "noised", "targets")}
    for blk, start in enumerate(starts):
        for b in range(rows):
            for j in range(max(start, 1), min(start + n, length)):
                if src[b, j] or not loss_mask[b, j]:
                    continue
                out["targets"][b] += 1
                if noise[b, j]:
                    row = logits[blk, b, j - 1]
                    ce = np.log(np.exp(row - row.max()).sum()) + row.max() - row[x[b, j]]
                    out["weighted"][b] += ce / t[b, j]
                    out["unweighted"][b] += ce
                    out["noised"][b] += 1
    return out


def normalised(terms, normalization):
    return dict(masked=terms["weighted"].sum() / terms["noised"].sum(),
                tokens=terms["weighted"].sum() / terms["targets"].sum(),
                sequence=np.mean(terms["weighted"] / np.maximum(terms["targets"], 1)),
                )[normalization]


def _maybe(x):
    return None if x is None else jnp.asarray(x)


def _case(length, *, segments=False, prompt=False, padding=False, rows=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(2, V, (rows, length)).astype(np.int32)
    x[0, 4] = M  # the mask id occurring in clean text is not noise
    seg = src = loss_mask = None
    if segments:
        seg = np.zeros((rows, length), np.int32)
        seg[:, length // 3:] = 1
        seg[1, 2 * length // 3:] = 2
    if prompt:
        src = np.zeros((rows, length), bool)
        src[:, :5] = True
        src[2, :9] = True
    if padding:
        loss_mask = np.ones((rows, length), bool)
        loss_mask[1, -4:] = False
    return x, seg, src, loss_mask


def _positions(segments):
    """Packed documents' own positions: each segment counts from 0."""
    seg = np.asarray(segments)
    starts = np.concatenate([np.ones((len(seg), 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    index = np.arange(seg.shape[1])
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return (index - first).astype(np.int32)


CASES = [  # (family, length, block size, case options, normalisation)
    ("llama", 12, 4, {}, "masked"),
    ("llama", 13, 5, dict(segments=True), "tokens"),
    ("llama", 14, 4, dict(prompt=True, padding=True), "sequence"),
    ("llama", 11, 3, dict(prompt=True, segments=True), "masked"),
    ("llama", 9, 1, {}, "tokens"),
    ("gpt2", 13, 5, dict(prompt=True, segments=True), "tokens"),  # learned positions
    ("gpt2", 20, 4, {}, "masked"),  # two streams (40) beyond GPT-2's 32 learned positions
    ("llama", 14, 4, dict(segments=True, positions=True), "masked"),  # packed documents
]


def block_loss(config, params, x, key, *, segments=None, src=None, loss_mask=None,
               positions=None, **static):
    """``block_diffusion_loss_sums`` under jit (one compile instead of many eager ops)."""
    fn = jax.jit(lambda p, x, k, seg, src, lm, pos: block_diffusion_loss_sums(
        apply_fn_for(config), p, x, k, mask_token_id=M, pattern=full(seg), src=src,
        loss_mask=lm, positions=pos, **static))
    return fn(params, jnp.asarray(x), key, _maybe(segments), _maybe(src), _maybe(loss_mask),
              _maybe(positions))


def draws(x, key, *, src=None, **static):
    """``block_forward_process`` under jit: the draws the objective makes with ``key``."""
    fn = jax.jit(lambda x, k, src: block_forward_process(k, x, mask_token_id=M, src=src,
                                                         **static))
    return fn(jnp.asarray(x), key, _maybe(src))


@pytest.mark.parametrize("family, length, n, options, normalization", CASES,
                         ids=[f"{c[0]}-L{c[1]}-N{c[2]}-{'-'.join(c[3]) or 'plain'}"
                              for c in CASES])
def test_block_loss_equals_the_per_block_reference(params, family, length, n, options,
                                                   normalization):
    config, params = (LLAMA if family == "llama" else GPT2), params[family]
    options = dict(options)
    with_positions = options.pop("positions", False)
    x, seg, src, loss_mask = _case(length, **options)
    pos = _positions(seg) if with_positions else None
    key = jax.random.key(11)
    sums = block_loss(config, params, x, key, segments=seg, src=src, loss_mask=loss_mask,
                      positions=pos, block_size=n, normalization=normalization)
    noised = draws(x, key, src=src, block_size=n)
    ref = reference_block_terms(config, params, x, noised.noise, noised.t, n, src, loss_mask,
                                seg, pos)
    assert ref["noised"].sum() > 0
    np.testing.assert_allclose(float(sums.loss), normalised(ref, normalization), rtol=2e-5)
    np.testing.assert_allclose(float(sums.unweighted), ref["unweighted"].sum(), rtol=2e-5)
    assert float(sums.noised) == ref["noised"].sum()
    assert float(sums.targets) == ref["targets"].sum()


def test_noise_is_drawn_per_block_from_the_row_key():
    length, n, rows = 13, 4, 6
    x = jnp.asarray(np.random.default_rng(1).integers(2, V, (rows, length)), jnp.int32)
    src = jnp.zeros((rows, length), bool).at[:, :3].set(True)
    key = jax.random.key(5)
    whole = block_forward_process(key, x, block_size=n, mask_token_id=M, src=src)
    t = np.asarray(whole.t)
    blocks = np.arange(length) // n
    for k in range(4):  # one time per (row, block): constant inside a block, new for each
        assert (t[:, blocks == k] == t[:, [k * n]]).all()
    assert len(np.unique(t[:, ::n])) == rows * 4
    assert ((t >= 1e-3) & (t < 1)).all()
    noise = np.asarray(whole.noise)
    assert not noise[:, :3].any()  # src never noised
    np.testing.assert_array_equal(np.asarray(whole.x_t), np.where(noise, M, np.asarray(x)))
    # A row's draws do not depend on the batch it is in (rows 2..4 drawn as a micro-batch).
    part = block_forward_process(key, x[2:5], block_size=n, mask_token_id=M, src=src[2:5],
                                 row_offset=2)
    np.testing.assert_array_equal(np.asarray(part.t), t[2:5])
    np.testing.assert_array_equal(np.asarray(part.noise), noise[2:5])


def test_each_block_is_noised_at_its_own_rate():
    """Over many draws the fraction of noised positions of a block tracks that block's t."""
    rows, length, n = 256, 64, 16
    noised = block_forward_process(jax.random.key(2), jnp.zeros((rows, length), jnp.int32),
                                   block_size=n, mask_token_id=M)
    t = np.asarray(noised.t)[:, ::n]  # [rows, 4]
    rate = np.asarray(noised.noise).reshape(rows, length // n, n).mean(axis=2)
    residual = rate - t  # each rate is a mean of 16 Bernoulli(t) draws
    assert abs(residual.mean()) < 0.01
    assert np.corrcoef(rate.ravel(), t.ravel())[0, 1] > 0.9


def test_stratified_block_times_cover_the_unit_interval_per_block():
    rows, blocks = 8, 3
    t = np.asarray(sample_block_t(jax.random.key(0), rows, blocks, stratified=True))
    u = (t - 1e-3) / (1 - 1e-3)
    for k in range(blocks):  # u_{r,k} = (u0_k + r / B) mod 1: one point in each 1/B bin
        assert sorted(np.floor(u[:, k] * rows).astype(int)) == list(range(rows))
    assert len(np.unique(u[0])) == blocks  # an offset of its own per block
    part = sample_block_t(jax.random.key(0), 3, blocks, stratified=True, row_offset=5,
                          global_batch=rows)
    np.testing.assert_allclose(np.asarray(part), t[5:], rtol=1e-6)


@pytest.mark.parametrize("n", [4, 0], ids=["blocks", "whole-sequence"])
def test_complementary_views_cover_every_non_src_target_exactly_once(params, n):
    """Blocks of 4, and the full-sequence recipe (N = 0: one block, the reference's plain
    full-attention pass)."""
    config, params = LLAMA, params["llama"]
    length = 14
    x, seg, src, loss_mask = _case(length, prompt=True, padding=True)
    key = jax.random.key(8)
    views = draws(x, key, src=src, block_size=n, complementary=True)
    rows = x.shape[0]
    first, second = np.asarray(views.noise[:rows]), np.asarray(views.noise[rows:])
    np.testing.assert_array_equal(first ^ second, ~src)  # exactly one view, src in neither
    assert not (first & second).any()
    t = np.asarray(views.t)
    np.testing.assert_allclose(t[rows:], 1.0 - t[:rows], rtol=1e-6)
    assert (t >= 1e-3 - 1e-7).all() and (t <= 1 - 1e-3 + 1e-7).all()  # both views' 1/t <= 1000
    sums = block_loss(config, params, x, key, src=src, loss_mask=loss_mask, block_size=n,
                      complementary=True, normalization="tokens")
    both = np.concatenate([x, x])
    ref = reference_block_terms(config, params, both, views.noise, t, n or length,
                                np.concatenate([src, src]), np.concatenate([loss_mask] * 2))
    # each target supervised once over the pair: noised count = target count of one view
    assert ref["noised"].sum() == ref["targets"].sum() / 2 == float(sums.noised)
    np.testing.assert_allclose(float(sums.loss), normalised(ref, "tokens"), rtol=2e-5)


def test_block_size_zero_is_one_block_over_the_whole_sequence(params):
    """N = 0 (and N >= L): the single-stream pass under the given pattern, one t per row."""
    config, params = LLAMA, params["llama"]
    x = jnp.asarray(_case(10)[0])
    key = jax.random.key(4)
    assert effective_block_size(10, 10) == effective_block_size(0, 10) == 0
    assert effective_block_size(9, 10) == 9
    sums = block_diffusion_loss_sums(apply_for(config), params, x, key, block_size=0,
                                     mask_token_id=M, pattern=full(), normalization="tokens")
    noised = block_forward_process(key, x, block_size=0, mask_token_id=M)
    assert (np.asarray(noised.t) == np.asarray(noised.t)[:, :1]).all()
    logits = apply_for(config)(params, noised.x_t, full())
    expected = loss_sums_from_logits(logits, x, dataclasses.replace(noised, t=noised.t[:, 0]),
                                     normalization="tokens")
    np.testing.assert_allclose(float(sums.loss), float(expected.loss), rtol=1e-6)


def test_micro_batches_add_up_to_the_batch(params):
    config, params = LLAMA, params["llama"]
    x, seg, src, _ = _case(12, segments=True, prompt=True, rows=4)

    def sums(lo, hi):
        return block_loss(config, params, x[lo:hi], jax.random.key(1), segments=seg[lo:hi],
                          src=src[lo:hi], row_offset=lo, global_batch=4, block_size=5,
                          normalization="masked", stratified=True, complementary=True)

    whole, halves = sums(0, 4), sums(0, 2) + sums(2, 4)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(halves)):
        np.testing.assert_allclose(float(a), float(b), rtol=1e-5)


def test_block_elbo_terms_are_the_per_block_nelbo(params):
    """``elbo_terms`` with a block size: position 0 conditioned on, the per-row block NELBO of
    its draws (stratified t per block), equal to the reference on those draws."""
    config, params = LLAMA, params["llama"]
    x, _, src, loss_mask = _case(13, prompt=True, padding=True, rows=4)
    key = jax.random.key(9)
    nelbo, targets = elbo_terms(apply_for(config), params, jnp.asarray(x), key,
                                mask_token_id=M, src=jnp.asarray(src),
                                loss_mask=jnp.asarray(loss_mask), block_size=4)
    conditioned = src.copy()
    conditioned[:, 0] = True
    conditioned |= ~loss_mask
    draws = block_forward_process(jax.random.fold_in(key, 0), jnp.asarray(x), block_size=4,
                                  mask_token_id=M, src=jnp.asarray(conditioned), stratified=True)
    ref = reference_block_terms(config, params, x, draws.noise, draws.t, 4, conditioned,
                                loss_mask)
    np.testing.assert_allclose(np.asarray(nelbo), ref["weighted"], rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(targets), ref["targets"])


def test_eval_reports_the_block_bound_of_a_block_model(params):
    """``diffujax eval``'s ``evaluate`` on a model whose config says ``block_size``: the block
    NELBO of the reference on the same draws (rows numbered draw-major across batches, t
    stratified per block over all rows), its error bar over blocks of text."""
    from diffujax.diffusion import summarize_nll
    from diffujax.inference.perplexity import evaluate
    from diffujax.runtime import LoadedModel

    config = LLAMA.replace(block_size=4)
    model = LoadedModel(config, apply_fn_for(config), params["llama"], tokenizer=None)
    texts = _case(11, rows=3, seed=4)[0]
    est = evaluate(model, texts, objective="diffusion", draws=2, batch_size=4, seed=0)
    rows = np.tile(texts, (2, 1))
    first = np.zeros(rows.shape, bool)
    first[:, 0] = True
    noised = draws(rows, jax.random.fold_in(jax.random.key(0), 0), src=first, block_size=4,
                   stratified=True)
    ref = reference_block_terms(LLAMA, params["llama"], rows, noised.noise, noised.t, 4, first)
    expected = summarize_nll(ref["weighted"].reshape(2, 3).mean(axis=0), ref["targets"][:3],
                             num_draws=2)
    np.testing.assert_allclose(est.mean_nll, expected.mean_nll, rtol=1e-5)
    np.testing.assert_allclose(est.std_error, expected.std_error, rtol=1e-4)
    assert (est.num_tokens, est.num_sequences, est.num_draws) == (30, 3, 2)
    # --block-size 0 asks for the full-sequence bound of the same network: another number
    whole = evaluate(model, texts, objective="diffusion", draws=2, batch_size=4, seed=0,
                     block_size=0)
    assert abs(whole.mean_nll - est.mean_nll) > 1e-3


def test_annealing_inside_blocks_is_what_a_block_pass_sees(params):
    """While the mask anneals (docs/algorithms.md §3), the two streams open the same hashed
    entries inside a block as a single-stream pass over ``[x_0 of blocks < b, x_t of block b]``
    does: training sees what decoding under that pattern sees."""
    config, params = LLAMA, params["llama"]
    x, seg, _, _ = _case(13, segments=True)
    inner = annealed(seed=7, step=3, ratio=0.5)
    key = jax.random.key(2)
    fn = jax.jit(lambda p, x, k, seg: block_diffusion_loss_sums(
        apply_fn_for(config), p, x, k, block_size=5, mask_token_id=M,
        pattern=dataclasses.replace(inner, segment_ids=seg), normalization="tokens"))
    sums = fn(params, jnp.asarray(x), key, jnp.asarray(seg))
    noised = draws(x, key, block_size=5)
    ref = reference_block_terms(config, params, x, noised.noise, noised.t, 5, segments=seg,
                                inner=inner)
    np.testing.assert_allclose(float(sums.loss), normalised(ref, "tokens"), rtol=2e-5)
