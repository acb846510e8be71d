"""The chunked cross-entropy (``objective.SplitHead``): the objective given the network's hidden
states and output head computes the same loss sums and gradients as given the full logits, for
LLaMA and GPT-2 with tied and untied heads, the full-sequence and the block objective; and its
compiled gradient holds less temporary memory than the one that materialises ``[B, L, V]``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffujax.attention.pattern import full
from diffujax.diffusion import (ar_nll_terms, block_diffusion_loss_sums, diffusion_loss_sums,
                                elbo_terms)
from diffujax.diffusion.objective import SplitHead, chunked_cross_entropy, shifted_cross_entropy
from diffujax.models import GPT2Config, LlamaConfig, apply_fn_for, init_params

B, L, V, MASK = 2, 21, 97, 96
CONFIGS = {
    "llama-untied": LlamaConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4,
                                num_kv_heads=2, intermediate_size=48, mask_token_id=MASK),
    "llama-tied": LlamaConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4,
                              num_kv_heads=2, intermediate_size=48, mask_token_id=MASK,
                              tie_word_embeddings=True),
    "gpt2-tied": GPT2Config(vocab_size=V, hidden_size=32, num_layers=2, num_heads=2,
                            num_kv_heads=2, intermediate_size=64, max_positions=64,
                            mask_token_id=MASK),
    "gpt2-untied": GPT2Config(vocab_size=V, hidden_size=32, num_layers=2, num_heads=2,
                              num_kv_heads=2, intermediate_size=64, max_positions=64,
                              mask_token_id=MASK, tie_word_embeddings=False),
}


def split_fn(apply_fn, chunk):
    """apply_fn returning a SplitHead of ``chunk`` positions (as the train step's, smaller)."""
    def split(*args, **kwargs):
        return SplitHead(*apply_fn(*args, split_head=True, **kwargs), chunk=chunk)
    return split


def tokens_for(seed=0):
    return jax.random.randint(jax.random.key(seed), (B, L), 0, MASK)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("objective", ["full", "blocks"])
def test_chunked_loss_and_gradients_equal_the_full_logits(name, objective):
    config = CONFIGS[name]
    params = init_params(config, seed=1)
    apply_fn = apply_fn_for(config)
    tokens = tokens_for()
    if objective == "full":
        loss = functools.partial(diffusion_loss_sums, tokens=tokens, key=jax.random.key(3),
                                 mask_token_id=MASK, pattern=full(), normalization="tokens")
    else:
        loss = functools.partial(block_diffusion_loss_sums, tokens=tokens, key=jax.random.key(3),
                                 block_size=7, mask_token_id=MASK, pattern=full(),
                                 normalization="tokens")

    def value_and_grad(fn):
        return jax.value_and_grad(lambda p: loss(fn, p).loss)(params)

    want, want_grads = value_and_grad(apply_fn)
    got, got_grads = value_and_grad(split_fn(apply_fn, chunk=8))  # 21 positions: 3 chunks, padded
    assert np.isfinite(want) and want > 0
    np.testing.assert_allclose(got, want, rtol=1e-6)
    flat_want, flat_got = jax.tree.leaves(want_grads), jax.tree.leaves(got_grads)
    assert len(flat_want) == len(flat_got)
    for g, w in zip(flat_got, flat_want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4,
                                   atol=1e-6 * float(np.abs(w).max()) + 1e-9)


@pytest.mark.parametrize("block_size", [0, 7])
def test_chunked_evaluation_terms_equal_the_full_logits(block_size):
    """The evaluators' per-sequence terms (the ELBO, full-sequence and block, and the AR NLL)."""
    config = CONFIGS["llama-tied"]
    params = init_params(config, seed=2)
    apply_fn, tokens = apply_fn_for(config), tokens_for(1)
    chunked = split_fn(apply_fn, chunk=64)  # longer than the sequence: one chunk of L
    for terms in (lambda fn: elbo_terms(fn, params, tokens, jax.random.key(5),
                                        mask_token_id=MASK, block_size=block_size),
                  lambda fn: ar_nll_terms(fn, params, tokens)):
        for got, want in zip(terms(chunked), terms(apply_fn), strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_chunked_cross_entropy_is_log_softmax_written_in_numpy():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 10, 6)).astype(np.float32)
    w = rng.standard_normal((6, 13)).astype(np.float32)
    targets = rng.integers(0, 13, size=(2, 10))
    ce = chunked_cross_entropy(SplitHead(jnp.asarray(hidden), lambda h: h @ w, chunk=4),
                               jnp.asarray(targets))
    logits = hidden.astype(np.float64) @ w
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(ce), want, rtol=1e-5, atol=1e-5)
    # and the shifted form against the full logits' own
    tokens = jnp.asarray(targets)
    np.testing.assert_allclose(
        shifted_cross_entropy(SplitHead(jnp.asarray(hidden), lambda h: h @ w, chunk=3), tokens),
        shifted_cross_entropy(jnp.asarray(hidden) @ w, tokens), rtol=1e-6)


def test_chunked_gradient_holds_less_temporary_memory():
    """CPU compile of the gradient, 512 positions x 2048 vocabulary: the full logits' float32
    [B, L, V] (and their gradient) are gone from the temporaries."""
    config = LlamaConfig(vocab_size=2048, hidden_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=2, intermediate_size=32, max_positions=512,
                         mask_token_id=2047)
    params = init_params(config, seed=0)
    apply_fn = apply_fn_for(config)
    tokens = jax.ShapeDtypeStruct((2, 512), jnp.int32)

    def temp_bytes(fn):
        def loss(p, t):
            return diffusion_loss_sums(fn, p, t, jax.random.key(0), mask_token_id=2047,
                                       pattern=full()).weighted
        compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full_bytes, chunked_bytes = temp_bytes(apply_fn), temp_bytes(split_fn(apply_fn, chunk=64))
    logits_bytes = 2 * 512 * 2048 * 4
    assert full_bytes >= logits_bytes  # the unchunked gradient holds [B, L, V] float32
    assert chunked_bytes < full_bytes - logits_bytes // 2, (chunked_bytes, full_bytes)
