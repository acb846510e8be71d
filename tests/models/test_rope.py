"""RoPE (``layers.rope_tables`` / ``apply_rope``) against the rotation written from its
definition, and the shape of the program it lowers to.

Rotate-half RoPE pairs entry ``i`` of a head's first half with entry ``i`` of its second half
and turns the pair ``(x1, x2)``, read as the complex number ``x1 + i x2``, by ``pos * inv_freq[i]``
radians. The reference below does exactly that with numpy's complex numbers.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffujax.models import layers as L


def rotated_by_complex_numbers(x, positions, inv_freq):
    """numpy reference: ``x [B, L, H, D]`` turned pairwise (``x[..., i]``, ``x[..., D/2 + i]``)."""
    half = x.shape[-1] // 2
    z = x[..., :half].astype(np.float64) + 1j * x[..., half:].astype(np.float64)
    angles = positions[:, :, None, None].astype(np.float64) * inv_freq.astype(np.float64)
    z = z * np.exp(1j * angles)
    return np.concatenate([z.real, z.imag], axis=-1)


@pytest.mark.parametrize("scaling", [None, ("linear", 2.0), ("llama3", 8.0, 1.0, 4.0, 16)])
def test_apply_rope_is_the_pairwise_rotation(scaling):
    rng = np.random.default_rng(0)
    b, length, heads, head_dim = 2, 12, 3, 16
    x = rng.standard_normal((b, length, heads, head_dim)).astype(np.float32)
    positions = rng.integers(0, 64, size=(b, length))  # packed / shifted positions too
    inv_freq = L.rope_inverse_frequencies(head_dim, 10000.0, scaling)
    cos, sin = L.rope_tables(jnp.asarray(positions), inv_freq, jnp.float32)
    assert cos.shape == sin.shape == (b, length, 1, head_dim // 2)
    got = np.asarray(L.apply_rope(jnp.asarray(x), cos, sin))
    want = rotated_by_complex_numbers(x, positions, np.asarray(inv_freq))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # a rotation: each pair keeps its length
    half = head_dim // 2
    np.testing.assert_allclose(np.hypot(got[..., :half], got[..., half:]),
                               np.hypot(x[..., :half], x[..., half:]), rtol=1e-5)


def _ops(text: str, op: str) -> int:
    return len(re.findall(rf"\b{re.escape(op)}\b", text))


def test_apply_rope_lowers_without_negate_and_with_one_join():
    """The forward is two products per half and one concatenate: no negated copy of ``x``
    (``concat(-x2, x1)``), and the tables are half width (no concatenate of the angles)."""
    x = jax.ShapeDtypeStruct((2, 8, 4, 32), jnp.bfloat16)
    positions = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    inv_freq = L.rope_inverse_frequencies(32, 10000.0, None)

    def rope(x, positions):
        return L.apply_rope(x, *L.rope_tables(positions, inv_freq, x.dtype))

    text = jax.jit(rope).lower(x, positions).as_text()  # StableHLO
    assert _ops(text, "stablehlo.negate") == 0, text
    assert _ops(text, "stablehlo.concatenate") == 1, text
