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


def test_settings_and_explicit_backends():
    q, k, v, _ = make_inputs(1, 24, 2, 1, 8)
    pattern = make_pattern("causal")
    with A.attention_config(backend="pallas_tpu", interpret=True):
        assert A.resolve_backend(q, k, pattern) == "pallas_tpu"
        assert A.resolve_backend(q, k, pattern, "xla") == "xla"  # explicit beats the setting
        np.testing.assert_allclose(A.attention(q, k, v, pattern),
                                   A.reference_attention(q, k, v, pattern), atol=1e-5)
    assert A.resolve_backend(q, k, pattern) == "xla"  # restored
    with pytest.raises(ValueError, match="not one of"):
        A.attention(q, k, v, pattern, backend="flash")
    with pytest.raises(ValueError, match="unknown"):
        A.configure(block=1)
