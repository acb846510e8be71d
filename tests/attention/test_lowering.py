"""The kernels lower for their real targets (Pallas -> Mosaic for TPU, Pallas -> Triton for GPU).

Cross-platform ``jax.export`` on CPU runs the Pallas lowering without a device: it catches
primitives a backend cannot lower (e.g. ``//`` on traced ints goes through ``sign``, which the TPU
lowering only handles for a known chip). It does not run Mosaic's or Triton's own compilers.
"""

import jax
import jax.numpy as jnp
import pytest

from diffujax.attention import gpu, tpu
from diffujax.attention.pattern import annealed, causal

B, L, H, KVH, D = 1, 1000, 4, 2, 128  # L not a multiple of the blocks; GQA


def _grad_fn(flash, **kw):
    def loss(q, k, v, p):
        return flash(q, k, v, p, **kw).astype(jnp.float32).sum()
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _export(fn, platform, pattern, **kw):
    sd = jax.ShapeDtypeStruct
    args = (sd((B, L, H, D), jnp.bfloat16), sd((B, L, KVH, D), jnp.bfloat16),
            sd((B, L, KVH, D), jnp.bfloat16), pattern)
    return jax.export.export(fn, platforms=[platform], **kw)(*args).mlir_module()


PATTERNS = {"causal": causal(), "annealed_segments": annealed(
    1, 2, 0.3, jnp.zeros((B, L), jnp.int32)),
    # block diffusion: two streams of 500, blocks of 96 (dividing neither streams nor tiles)
    "two_stream_annealed_segments": annealed(1, 2, 0.3, jnp.zeros((B, L), jnp.int32)
                                               ).with_blocks(96, L // 2)}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_tpu_kernels_lower_to_mosaic(name):
    fn = _grad_fn(tpu.flash_attention, block_sizes=tpu.BlockSizes(256, 512, 128, 256))
    assert _export(fn, "tpu", PATTERNS[name]).count("tpu_custom_call") == 3  # fwd, dq, dkv


@pytest.mark.parametrize("name", ["annealed_segments", "two_stream_annealed_segments"])
def test_gpu_kernels_lower_to_triton(name):
    fn = _grad_fn(gpu.flash_attention, block_sizes=gpu.BlockSizes(64, 64, 32, 64))
    triton = "__gpu$xla.gpu.triton"
    text = _export(fn, "cuda", PATTERNS[name],
                   disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)])
    assert text.count(triton) == 3
