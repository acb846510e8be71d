"""Pallas GPU (Triton) flash attention, interpret mode on CPU, against the XLA reference."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from attn_testlib import (BLOCKED_CASES, blocked_pattern, check_against_reference, make_inputs,
                          make_pattern, mask_reader, segment_ids)
from diffujax.attention import gpu
from diffujax.attention.pattern import annealed, causal, dense_mask, full

SMALL = gpu.BlockSizes(16, 16, 8, 16)


def kernel(block_sizes=SMALL):
    return functools.partial(gpu.flash_attention, block_sizes=block_sizes, interpret=True)


@pytest.mark.parametrize("name,segmented", [
    ("causal", False), ("full", True), ("annealed_r0", True), ("annealed_r0.3", False),
    ("annealed_r0.3", True), ("annealed_r1", False)])
def test_matches_reference_padded_gqa(name, segmented):
    b, length = 2, 40  # padded to 48 inside; 6 query heads over 2 K/V heads (group of 3)
    q, k, v, do = make_inputs(b, length, 6, 2, 16)
    pattern = make_pattern(name, segment_ids(b, length) if segmented else None)
    check_against_reference(kernel(), pattern, q, k, v, do)


@pytest.mark.parametrize("case", BLOCKED_CASES[::2], ids=[c[0] for c in BLOCKED_CASES[::2]])
def test_block_diffusion_patterns_match_reference(case):
    b, length = 2, 40  # two streams of 20, padded to 48
    q, k, v, do = make_inputs(b, length, 6, 2, 16, seed=6)
    check_against_reference(kernel(), blocked_pattern(case, b, length), q, k, v, do)


def test_exact_multiple_other_blocks():
    q, k, v, do = make_inputs(1, 64, 2, 2, 8, seed=1)
    check_against_reference(kernel(gpu.BlockSizes(32, 16, 16, 32)),
                            make_pattern("causal", segment_ids(1, 64)), q, k, v, do)


def test_in_kernel_hash_is_the_dense_pattern():
    read = mask_reader(kernel())
    for seed, step, ratio in [(0, 0, 0.5), (9, 4, 0.25)]:
        pattern = annealed(seed, step, ratio, segment_ids(2, 48))
        np.testing.assert_array_equal(read(pattern, 48, batch=2),
                                      np.asarray(dense_mask(pattern, 48)))


def test_block_sizes_must_be_powers_of_two():
    q, k, v, _ = make_inputs(1, 16, 1, 1, 8)
    with pytest.raises(ValueError, match="powers of two"):
        gpu.flash_attention(q, k, v, causal(), block_sizes=gpu.BlockSizes(24, 16, 16, 16),
                            interpret=True)


def test_cudnn_refuses_what_it_cannot_do():
    q, k, v, _ = make_inputs(1, 16, 2, 2, 8)
    with pytest.raises(ValueError):
        gpu.cudnn_attention(q, k, v, annealed(0, 0, 0.5))
    with pytest.raises(ValueError):
        gpu.cudnn_attention(q, k, v, causal(jnp.zeros((1, 16), jnp.int32)))
    with pytest.raises(ValueError, match="blocks"):
        gpu.cudnn_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                            v.astype(jnp.bfloat16), full().with_blocks(4, 8))
    with pytest.raises(ValueError, match="bf16"):
        gpu.cudnn_attention(q, k, v, causal())
