"""``attention(q, k, v, pattern, backend=...)``: backend choice and settings."""

import numpy as np
import pytest

from attn_testlib import make_inputs, make_pattern
from diffujax.attention import (AttentionConfig, TpuBlockSizes, attention, dense_mask,
                                reference_attention, resolve_backend)


def numpy_attention(q, k, v, mask):
    """Softmax attention in float64 numpy, one query head at a time; K/V head ``h // group``
    serves query head ``h`` (GQA). The independent reference for the dispatch tests."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, length, heads, dim = q.shape
    group = heads // k.shape[2]
    out = np.zeros_like(q)
    for h in range(heads):
        scores = np.einsum("bqd,bkd->bqk", q[:, :, h], k[:, :, h // group]) / np.sqrt(dim)
        scores = np.where(mask, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, :, h] = np.einsum("bqk,bkd->bqd", probs / probs.sum(-1, keepdims=True),
                                 v[:, :, h // group])
    return out


@pytest.mark.parametrize("name", ["causal", "full", "annealed_r0.3"])
def test_auto_on_cpu_computes_attention(name):
    """``auto`` picks XLA on CPU and computes softmax attention under the pattern's mask: causal
    and full masks written out here; the annealed one read from ``dense_mask`` (the hash), which
    must open more than causal and less than full."""
    q, k, v, _ = make_inputs(2, 24, 4, 2, 8)
    pattern = make_pattern(name)
    assert resolve_backend(q, k, pattern) == "xla"
    tril = np.tril(np.ones((24, 24), bool))
    mask = {"causal": tril, "full": np.ones((24, 24), bool)}.get(name)
    if mask is None:
        mask = np.asarray(dense_mask(pattern, 24))
        assert (mask >= tril).all() and tril.sum() < mask.sum() < mask.size
    np.testing.assert_allclose(attention(q, k, v, pattern), numpy_attention(q, k, v, mask),
                               atol=2e-6, rtol=1e-5)


def test_config_and_explicit_backends():
    q, k, v, _ = make_inputs(1, 24, 2, 1, 8)
    pattern = make_pattern("causal")
    config = AttentionConfig(backend="pallas_tpu", interpret=True,
                             tpu_block_sizes=TpuBlockSizes(8, 8))
    assert resolve_backend(q, k, pattern, config) == "pallas_tpu"
    assert resolve_backend(q, k, pattern, config.replace(backend="xla")) == "xla"
    np.testing.assert_allclose(attention(q, k, v, pattern, config),
                               reference_attention(q, k, v, pattern), atol=1e-5)
    assert resolve_backend(q, k, pattern) == "xla"  # nothing global changed
    # Hashable: the config is static under jit (carried by the model config).
    assert hash(config) == hash(AttentionConfig(backend="pallas_tpu", interpret=True,
                                                tpu_block_sizes=TpuBlockSizes(8, 8)))
    with pytest.raises(ValueError, match="not one of"):
        attention(q, k, v, pattern, backend="flash")
    with pytest.raises(ValueError, match="splash_block: 100"):
        attention(q, k, v, pattern, AttentionConfig(splash_block=100))
