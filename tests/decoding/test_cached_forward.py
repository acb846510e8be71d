"""The cached forward pass (models/cache.py) against the family's ordinary forward pass on the
whole canvas (the reference), float32, every family: run chunk by chunk into a KV cache, the
logits of each chunk equal the canvas pass's logits at those positions to 1e-5."""

import jax
import numpy as np
import pytest

from diffujax.attention import causal, full
from diffujax.models import forward, forward_cached, init_cache
from tiny_models import CONFIGS, canvas, tiny_model

B, LEN = 3, 24
FAMILIES = list(CONFIGS)


def chunked(config, params, tokens, pattern, chunks):
    """Logits of ``tokens`` run through ``forward_cached`` in chunks of the given sizes."""
    cache = init_cache(config, tokens.shape[0], tokens.shape[1])
    step = jax.jit(lambda p, t, c, o: forward_cached(config, p, t, pattern, c, o),
                   donate_argnums=2)
    out, offset = [], 0
    for n in chunks:
        logits, cache = step(params, tokens[:, offset:offset + n], cache, offset)
        out.append(np.asarray(logits))
        offset += n
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_causal_chunks_equal_the_canvas_forward(family):
    """Blocks of 4, fed as prefill of 2 blocks, then one block at a time (a whole block's
    queries at once, bidirectional inside the block)."""
    config, params = tiny_model(family)
    tokens = canvas(B, LEN)
    pattern = full().with_blocks(4)
    want = np.asarray(forward(config, params, tokens, pattern))
    got = chunked(config, params, tokens, pattern, [8, 4, 4, 4, 4])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_token_by_token_equals_the_canvas_forward(family):
    """The AR case: a prompt prefilled at once, then one token per pass."""
    config, params = tiny_model(family)
    tokens = canvas(B, 12, seed=1)
    want = np.asarray(forward(config, params, tokens, causal()))
    got = chunked(config, params, tokens, causal(), [5] + [1] * 7)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_a_rewritten_block_replaces_its_stale_keys():
    """Decoding writes a block several times (noisy, then clean): the last write is what later
    blocks see, and slots past ``offset + n`` (stale) are never attended to."""
    config, params = tiny_model("llama")
    tokens = canvas(B, 12, seed=2)
    noisy = tokens.at[:, 4:8].set(config.mask_token_id)
    pattern = full().with_blocks(4)
    cache = init_cache(config, B, 12)
    _, cache = forward_cached(config, params, tokens[:, :4], pattern, cache, 0)
    _, cache = forward_cached(config, params, noisy[:, 4:12], pattern, cache, 4)  # stale 8..11
    _, cache = forward_cached(config, params, tokens[:, 4:8], pattern, cache, 4)
    last, _ = forward_cached(config, params, tokens[:, 8:12], pattern, cache, 8)
    want = forward(config, params, tokens, pattern)[:, 8:12]
    np.testing.assert_allclose(np.asarray(last), np.asarray(want), atol=1e-5, rtol=0)


def test_a_cache_beyond_the_model_positions_is_refused():
    config, params = tiny_model("llama")
    with pytest.raises(ValueError, match=r"^KV cache of 49 positions: must be 1\.\.48"):
        init_cache(config, 1, 49)
    gpt2, _ = tiny_model("gpt2")
    with pytest.raises(ValueError, match="KV cache of 64 positions"):
        init_cache(gpt2, 1, 64)
    with pytest.raises(ValueError, match="8 tokens do not fit a KV cache of 4"):
        forward_cached(config, params, canvas(1, 8), causal(), init_cache(config, 1, 4), 0)
