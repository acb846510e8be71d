"""The cached block decoder (diffusion/decoding.py) against an uncached reference decoder.

The reference is written plainly: one row at a time, a Python loop over blocks and passes, and
every pass runs the *whole canvas* through the family's ordinary forward pass under
``full().with_blocks(N)`` (no cache), reading the prediction for position ``j`` at ``j - 1``
of that pass (so a block's first position reads the last position of the clean block before
it). It shares with the decoder only the commit rules and the candidate draws (the sampler's
definition, with the same keys), so it checks the cache, the prefill, the token shift across
blocks, the right padding of prompts of different lengths and the stopping rule.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffujax.attention import causal, full
from diffujax.diffusion.decoding import block_rule, canvas_length, decode_blocks
from diffujax.diffusion.sampling import draw_candidates, forbid
from diffujax.models import cached_fn_for, forward, init_cache
from tiny_models import CONFIGS, VOCAB, tiny_model

N, NEW = 4, 10
WIDE = 14  # prompt width of the single-row decodes of the batch test (one compiled shape)
PROMPTS = [[1, 5, 9], [1, 7, 3, 8, 20, 11], [1, 4, 4, 30, 12, 6, 2, 17, 9]]
SAMPLERS = {  # name -> (sampler, steps, threshold, temperature)
    "threshold": ("threshold", None, 0.12, 0.0),
    "confidence": ("confidence", 2, 0.9, 0.0),
    "confidence_sampled": ("confidence", 3, 0.9, 1.0),
    "ancestral": ("ancestral", 3, 0.9, 1.0),
}


@functools.lru_cache(maxsize=None)
def model(family):
    return tiny_model(family)


@functools.partial(jax.jit, static_argnums=0)
def canvas_forward(config, params, tokens, pattern):
    return forward(config, params, tokens, pattern)


def reference_row(config, params, prompt, key, row_id, *, block_size, new_tokens, sampler,
                  steps, threshold, temperature, eos=None):
    """Uncached decoding of one row; returns its generated tokens (``pad = eos`` after EOS)."""
    n, mask = block_size, config.mask_token_id
    p = len(prompt)
    x = np.full(canvas_length(p, new_tokens, n), mask, np.int32)
    x[:p] = prompt
    generate = np.arange(len(x)) >= p
    rule = (lambda step, masked, *_: masked) if n == 1 else block_rule(sampler, n, steps,
                                                                          threshold)
    row_key = jax.random.fold_in(key, row_id)
    for b in range(len(x) // n):
        span = slice(b * n, (b + 1) * n)
        masked = generate[span].copy()
        step = 0
        while masked.any():
            logits = np.asarray(canvas_forward(config, params, jnp.asarray(x[None]),
                                               full().with_blocks(n)))[0]
            predictions = logits[np.maximum(np.arange(b * n, (b + 1) * n) - 1, 0)]
            keys = jax.random.fold_in(jax.random.fold_in(row_key, b), step)
            candidates, confidence = draw_candidates(
                jax.random.fold_in(keys, 0)[None], forbid(jnp.asarray(predictions), mask)[None],
                temperature=temperature, top_k=None, top_p=None)
            commit = np.asarray(rule(jnp.int32(step), jnp.asarray(masked[None]), confidence,
                                     jax.random.fold_in(keys, 1)[None],
                                     jnp.asarray(generate[span][None])))[0] & masked
            x[span] = np.where(commit, np.asarray(candidates)[0], x[span])
            masked &= ~commit
            step += 1
        produced = x[p:(b + 1) * n]
        if (eos is not None and (produced == eos).any()) or (b + 1) * n >= p + new_tokens:
            break
    out = x[p:p + new_tokens].copy()
    if eos is not None and (out == eos).any():
        out[np.argmax(out == eos) + 1:] = eos
    return out


def cached_decode(config, params, prompts, key, *, block_size=N, new_tokens=NEW, row_ids=None,
                  width=None, **options):
    """``prompts`` right-padded to ``width`` columns (default: the longest), a cache of the
    length that width needs."""
    width = width or max(len(p) for p in prompts)
    prompt = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        prompt[i, :len(p)] = p
    cache = init_cache(config, len(prompts), canvas_length(width, new_tokens, block_size))
    return decode_blocks(cached_fn_for(config), params, jnp.asarray(prompt),
                         jnp.asarray([len(p) for p in prompts]), cache, key,
                         block_size=block_size, new_tokens=new_tokens,
                         mask_token_id=config.mask_token_id, row_ids=row_ids, **options)


def options_of(name):
    sampler, steps, threshold, temperature = SAMPLERS[name]
    return dict(sampler=sampler, steps=steps, threshold=threshold, temperature=temperature)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("family", list(CONFIGS))
def test_cached_decoding_commits_the_tokens_of_uncached_decoding(family, name):
    config, params = model(family)
    key = jax.random.key(3)
    out = cached_decode(config, params, PROMPTS, key, **options_of(name))
    for r, prompt in enumerate(PROMPTS):
        want = reference_row(config, params, prompt, key, r, block_size=N, new_tokens=NEW,
                             **options_of(name))
        np.testing.assert_array_equal(np.asarray(out.tokens[r]), want)
    # every block of the longest row: prefill 0 blocks (the shortest prompt is 3 < N), then
    # per block at least one denoising pass and a commit pass (none after the last block)
    blocks = canvas_length(len(PROMPTS[-1]), NEW, N) // N
    assert int(out.forwards) >= 1 + 2 * (blocks - 1)


def test_threshold_commits_several_tokens_per_pass_when_confident():
    """The threshold case above is not one token per pass in disguise: a low threshold makes
    the passes fewer than the generated positions."""
    config, params = model("llama")
    out = cached_decode(config, params, PROMPTS[:1], jax.random.key(3), sampler="threshold",
                        threshold=0.05)
    few = cached_decode(config, params, PROMPTS[:1], jax.random.key(3), sampler="threshold",
                        threshold=1.0)
    assert int(out.forwards) < int(few.forwards)


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_ar_decoder_equals_the_uncached_reference(temperature):
    config, params = model("qwen2")
    key = jax.random.key(4)
    out = cached_decode(config, params, PROMPTS, key, block_size=1, sampler="confidence", steps=1,
                        temperature=temperature)
    for r, prompt in enumerate(PROMPTS):
        want = reference_row(config, params, prompt, key, r, block_size=1, new_tokens=NEW,
                             sampler="confidence", steps=1, threshold=0.9, temperature=temperature)
        np.testing.assert_array_equal(np.asarray(out.tokens[r]), want)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_greedy_ar_decoder_is_argmax_of_repeated_causal_forwards(family):
    """The textbook loop: append the argmax of the last position of a full causal pass."""
    config, params = model(family)
    width = max(len(p) for p in PROMPTS)
    prompt = np.zeros((len(PROMPTS), width), np.int32)
    for i, p in enumerate(PROMPTS):
        prompt[i, :len(p)] = p
    cache = init_cache(config, len(PROMPTS), width + NEW)
    out = decode_blocks(cached_fn_for(config), params, jnp.asarray(prompt),
                        jnp.asarray([len(p) for p in PROMPTS]), cache, jax.random.key(0),
                        block_size=1, new_tokens=NEW, mask_token_id=None)
    for r, p in enumerate(PROMPTS):
        seq = list(p)
        for _ in range(NEW):
            logits = canvas_forward(config, params, jnp.asarray([seq]), causal())
            seq.append(int(np.argmax(np.asarray(logits)[0, -1])))
        np.testing.assert_array_equal(np.asarray(out.tokens[r]), seq[len(p):])
    assert int(out.forwards) == 1 + NEW - 1 + len(PROMPTS[-1]) - len(PROMPTS[0])


@pytest.mark.parametrize("name", ["threshold", "ancestral"])
def test_a_row_decodes_the_same_alone_and_in_a_batch_of_eight(name):
    config, params = model("llama")
    rng = np.random.default_rng(0)
    prompts = [[1] + rng.integers(3, VOCAB - 1, size=k).tolist() for k in (0, 2, 3, 5, 7, 8, 10,
                                                                         13)]
    order = rng.permutation(8)
    prompts = [prompts[i] for i in order]
    key = jax.random.key(5)
    batch = cached_decode(config, params, prompts, key, row_ids=jnp.arange(8) + 100,
                          **options_of(name))
    for r, prompt in enumerate(prompts):
        alone = cached_decode(config, params, [prompt], key, row_ids=jnp.asarray([100 + r]),
                              width=WIDE, **options_of(name))
        np.testing.assert_array_equal(np.asarray(batch.tokens[r]), np.asarray(alone.tokens[0]))


def test_tokens_do_not_depend_on_the_prompt_width_or_the_cache_length():
    """What the batch test above holds fixed (one compiled shape for all its single rows): a
    wider prompt array (prefill of more, garbage-holding blocks, rewritten later) and a longer
    cache (blocks past the end never decoded) change nothing."""
    config, params = model("qwen2")
    key = jax.random.key(6)
    options = options_of("confidence_sampled")
    base = cached_decode(config, params, PROMPTS, key, **options)
    wide = cached_decode(config, params, PROMPTS, key, width=WIDE + 3, **options)
    np.testing.assert_array_equal(np.asarray(base.tokens), np.asarray(wide.tokens))


def test_a_row_stops_at_eos_and_is_padded():
    """EOS = a token the unstopped greedy decoding of row 0 produces at its 6th position."""
    config, params = model("gpt2")
    key = jax.random.key(0)
    free = np.asarray(cached_decode(config, params, PROMPTS, key, sampler="confidence",
                                    steps=2).tokens)
    eos = int(free[0, 5])
    first = int(np.argmax(free[0] == eos))
    out = cached_decode(config, params, PROMPTS, key, sampler="confidence", steps=2,
                        eos_token_id=eos)
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(tokens[0, :first + 1], free[0, :first + 1])
    assert (tokens[0, first + 1:] == eos).all() and int(out.lengths[0]) == first + 1
    for r, prompt in enumerate(PROMPTS):
        want = reference_row(config, params, prompt, key, r, block_size=N, new_tokens=NEW,
                             sampler="confidence", steps=2, threshold=0.9, temperature=0.0, eos=eos)
        np.testing.assert_array_equal(tokens[r], want)
    # all rows stopping early saves passes
    alone = cached_decode(config, params, PROMPTS[:1], key, sampler="confidence", steps=2)
    stopped = cached_decode(config, params, PROMPTS[:1], key, sampler="confidence", steps=2,
                            eos_token_id=eos)
    if first < NEW - N:
        assert int(stopped.forwards) < int(alone.forwards)


def test_bad_inputs_are_refused_with_one_line():
    config, params = model("llama")
    prompt, lengths = jnp.ones((1, 3), jnp.int32), jnp.asarray([3])
    fn, key = cached_fn_for(config), jax.random.key(0)

    def run(cache_len, **kw):
        args = dict(block_size=N, new_tokens=NEW, mask_token_id=config.mask_token_id)
        return decode_blocks(fn, params, prompt, lengths, init_cache(config, 1, cache_len), key,
                             **{**args, **kw})

    with pytest.raises(ValueError, match=r"^KV cache of 18 positions: must be a multiple of"
                                         r" the block size 4 and at least 16"):
        run(18)
    with pytest.raises(ValueError, match="KV cache of 12 positions.*at least 16"):
        run(12)
    with pytest.raises(ValueError, match="sampler 'greedy' is not one of"):
        run(16, sampler="greedy")
    with pytest.raises(ValueError, match="confidence sampler needs steps >= 1"):
        run(16, sampler="confidence")
    with pytest.raises(ValueError, match="needs the mask token id"):
        run(16, mask_token_id=None)
    with pytest.raises(ValueError, match=r"threshold 1.5: must be in \(0, 1\]"):
        run(16, threshold=1.5)
