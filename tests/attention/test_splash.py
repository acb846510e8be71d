"""JAX's bundled splash attention behind our contract (interpret mode on CPU)."""

import functools

import pytest

import numpy as np

from attn_testlib import (check_against_reference, make_inputs, make_pattern, segment_ids,
                          two_stream_segment_ids)
from diffujax.attention.pattern import dense_mask, full
from diffujax.attention import splash


@pytest.mark.parametrize("name,segmented,dense", [("causal", True, False), ("full", False, False),
                                                  ("annealed_r0.3", True, True)])
def test_matches_reference(name, segmented, dense):
    b, length = 2, 256  # splash needs multiples of 128; 2 query heads share 1 K/V head
    q, k, v, do = make_inputs(b, length, 2, 1, 16)
    pattern = make_pattern(name, segment_ids(b, length) if segmented else None)
    fn = functools.partial(splash.splash_attention, block=128, dense_annealed=dense,
                           interpret=True)
    check_against_reference(fn, pattern, q, k, v, do)


def test_refuses_what_it_cannot_do():
    q, k, v, _ = make_inputs(1, 200, 1, 1, 8)
    with pytest.raises(ValueError, match="multiple of 128"):
        splash.splash_attention(q, k, v, make_pattern("causal"), interpret=True)
    q, k, v, _ = make_inputs(1, 256, 1, 1, 8)
    with pytest.raises(ValueError, match="dense_annealed"):
        splash.splash_attention(q, k, v, make_pattern("annealed_r0.3"), interpret=True)


# Two streams of 128 (length 256) in splash tiles of 128, blocks that divide the stream (32) and
# that do not (48); one stream in blocks of 48. Annealed inside blocks: the dense-mask fallback.
BLOCKED = [("full", 48, 128, True), ("causal", 32, 128, False), ("full", 48, 0, False),
           ("annealed_r0.3", 48, 128, True)]


@pytest.mark.parametrize("name,block,stream,segmented", BLOCKED)
def test_block_diffusion_patterns_match_reference(name, block, stream, segmented):
    b, length = 2, 256
    q, k, v, do = make_inputs(b, length, 2, 1, 16, seed=4)
    seg = None
    if segmented:
        seg = two_stream_segment_ids(b, stream) if stream else segment_ids(b, length)
    pattern = make_pattern(name, seg).with_blocks(block, stream)
    fn = functools.partial(splash.splash_attention, block=128, interpret=True,
                           dense_annealed=name.startswith("annealed"))
    check_against_reference(fn, pattern, q, k, v, do)


def test_block_mask_is_static_and_computed_in_kernel():
    """The block tables come from the static mask; no mask block is stored (splash evaluates
    ``is_open`` in-kernel), and skipped tiles are exactly the closed ones of ``dense_mask``."""
    pattern = full().with_blocks(48, 256)
    mask = splash.static_mask(pattern, 512)
    np.testing.assert_array_equal(mask[128:256, 256:512],
                                  np.asarray(dense_mask(pattern, 512))[128:256, 256:512])
    kernel = splash.static_kernel("full", 512, 2, 128, True, block_size=48, stream_len=256)
    info = kernel.fwd_mask_info
    assert info.partial_mask_blocks is None and info.q_sequence is not None
    dense = np.asarray(dense_mask(pattern, 512)).reshape(4, 128, 4, 128)
    # Splash's grid walks, per q tile, the kv tiles ``data_next`` names where ``block_mask`` is
    # 1 (masked) or 2 (fully open); 0 entries are padding of the shrunk grid.
    status = np.zeros((4, 4), int)
    for i, (row_mask, row_next) in enumerate(zip(np.asarray(info.block_mask)[0],
                                                 np.asarray(info.data_next)[0])):
        for value, j in zip(row_mask, row_next):
            status[i, j] = max(status[i, j], value)
    np.testing.assert_array_equal(status > 0, dense.any((1, 3)))
    np.testing.assert_array_equal(status == 2, dense.all((1, 3)))
    assert (status == 0).sum() == 5  # the closed tiles of this pattern, skipped
    assert splash.static_kernel("full", 512, 2, 128, True, block_size=48,
                                stream_len=256) is kernel  # cached


def test_two_stream_length_is_checked():
    q, k, v, _ = make_inputs(1, 256, 1, 1, 8)
    with pytest.raises(ValueError, match="needs length 512, got 256"):
        splash.splash_attention(q, k, v, full().with_blocks(32, 256), interpret=True)
