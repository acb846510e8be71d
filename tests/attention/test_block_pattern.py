"""The block-diffusion masks of ``pattern.py`` against plain Python loops written from
docs/algorithms.md §9 (the kernels' skipping and numerics are checked against ``dense_mask``, so
this pins ``dense_mask`` itself)."""

import numpy as np
import pytest

from diffujax.attention.pattern import AttentionPattern, _floor_div, dense_mask, pattern_hash


def _inside(kind, threshold, q, k):
    """The ``kind`` rule inside one block, on stream positions (§3 for annealed)."""
    if kind == "full" or k <= q:
        return True
    if kind == "causal":
        return False
    return int(pattern_hash(3, 9, q, k)) >> 8 < threshold


def _brute(kind, threshold, n, s, length):
    mask = np.zeros((length, length), bool)
    for q in range(length):
        for k in range(length):
            if not s:  # one stream: earlier blocks, and the own block by kind
                own = k // n == q // n and _inside(kind, threshold, q, k)
                mask[q, k] = k // n < q // n or own
                continue
            q_clean, k_clean = q >= s, k >= s
            qp, kp = q - s * q_clean, k - s * k_clean
            own = kp // n == qp // n and _inside(kind, threshold, qp, kp)
            if q_clean:  # clean queries: the clean stream, block-causally
                mask[q, k] = k_clean and (kp // n < qp // n or own)
            else:  # noisy queries: their own noisy block, and the clean earlier blocks
                mask[q, k] = kp // n < qp // n if k_clean else own
    return mask


@pytest.mark.parametrize("kind", ["causal", "full", "annealed"])
@pytest.mark.parametrize("block,stream,length", [(6, 20, 40), (8, 20, 40), (5, 20, 40),
                                                 (6, 0, 40)])
def test_block_masks_equal_the_rule_written_out(kind, block, stream, length):
    pattern = AttentionPattern(kind, 3, 9, 1 << 23).with_blocks(block, stream)
    want = _brute(kind, 1 << 23, block, stream, length)
    np.testing.assert_array_equal(np.asarray(dense_mask(pattern, length)), want)


def test_block_index_is_floor_division():
    """The kernels' division (no ``sign``, for Mosaic) is Python's ``//``, negatives included."""
    x = np.arange(-50, 50, dtype=np.int32)
    for n in (1, 3, 8, 20):
        np.testing.assert_array_equal(np.asarray(_floor_div(x, n)), x // n)
