"""JAX's bundled splash attention behind our contract (interpret mode on CPU)."""

import functools

import pytest

from attn_testlib import check_against_reference, make_inputs, make_pattern, segment_ids
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
