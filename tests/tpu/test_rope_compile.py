"""RoPE as the TPU compiler sees it: the optimized program of ``apply_rope`` (with its tables)
for one v5p chip negates nothing (the rotate-half form ``concat(-x2, x1)`` compiles to a negate
of a half of q/k)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from diffujax.models import layers as L

from tpu_testlib import topology


def test_rope_compiles_without_negate():
    device = topology("v5p").devices[0]
    one = NamedSharding(jax.sharding.Mesh([device], ("d",)), P())
    x = jax.ShapeDtypeStruct((2, 256, 8, 128), jnp.bfloat16, sharding=one)
    positions = jax.ShapeDtypeStruct((2, 256), jnp.int32, sharding=one)
    inv_freq = L.rope_inverse_frequencies(128, 10000.0, None)

    def rope(x, positions):
        return L.apply_rope(x, *L.rope_tables(positions, inv_freq, x.dtype))

    hlo = jax.jit(rope).lower(x, positions).compile().as_text()
    ops = re.findall(r"= \S+ ([a-z-]+)\(", hlo)
    assert "multiply" in ops  # the program was read
    assert "negate" not in ops, hlo
