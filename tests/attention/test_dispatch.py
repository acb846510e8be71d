"""``attention(q, k, v, pattern, backend=...)``: backend choice and settings."""

import numpy as np
import pytest

from attn_testlib import make_inputs, make_pattern
from diffujax import attention as A


def test_auto_is_the_reference_on_cpu():
    q, k, v, _ = make_inputs(1, 24, 2, 1, 8)
    pattern = make_pattern("annealed_r0.3")
    assert A.resolve_backend(q, k, pattern) == "xla"
    np.testing.assert_array_equal(A.attention(q, k, v, pattern),
                                  A.reference_attention(q, k, v, pattern))


def test_config_and_explicit_backends():
    q, k, v, _ = make_inputs(1, 24, 2, 1, 8)
    pattern = make_pattern("causal")
    config = A.AttentionConfig(backend="pallas_tpu", interpret=True,
                               tpu_block_sizes=A.TpuBlockSizes(8, 8))
    assert A.resolve_backend(q, k, pattern, config) == "pallas_tpu"
    assert A.resolve_backend(q, k, pattern, config.replace(backend="xla")) == "xla"
    np.testing.assert_allclose(A.attention(q, k, v, pattern, config),
                               A.reference_attention(q, k, v, pattern), atol=1e-5)
    assert A.resolve_backend(q, k, pattern) == "xla"  # nothing global changed
    # Hashable: the config is static under jit (carried by the model config).
    assert hash(config) == hash(A.AttentionConfig(backend="pallas_tpu", interpret=True,
                                                  tpu_block_sizes=A.TpuBlockSizes(8, 8)))
    with pytest.raises(ValueError, match="not one of"):
        A.attention(q, k, v, pattern, backend="flash")
    with pytest.raises(ValueError, match="splash_block: 100"):
        A.attention(q, k, v, pattern, A.AttentionConfig(splash_block=100))
