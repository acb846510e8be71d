"""What the TPU (Mosaic) and GPU (Triton) flash kernels share: constants, the pattern's scalar
operand, and the ``custom_vjp`` that ties a forward kernel to its two backward kernels.

Both kernels compute the same thing on different layouts; only the layout-specific parts (block
specs, grids, how ``delta`` is laid out) stay in ``tpu.py`` / ``gpu.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffujax.attention import residuals
from diffujax.attention.pattern import AttentionPattern

# Finite, so that (masked - masked) is 0, never NaN; far below any real score.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
NT = (((1,), (1,)), ((), ()))  # dot_general dimension numbers: a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


def div(x, n: int):
    """Truncating division of a non-negative traced int (``//`` lowers through ``sign``, which the
    kernels' scalar paths do not need)."""
    return lax.div(x, jnp.int32(n))


def pattern_scalars(pattern: AttentionPattern, size: int = 3) -> jax.Array:
    """``[seed, step, threshold]`` as int32 (zero-padded to ``size``): the kernels' scalar operand."""
    values = [jnp.asarray(x, jnp.int32).reshape(())
              for x in (pattern.seed, pattern.step, pattern.threshold)]
    return jnp.stack(values + [jnp.int32(0)] * (size - len(values)))


def pattern_from_scalars(kind: str, s_ref, block_size: int = 0,
                         stream_len: int = 0) -> AttentionPattern:
    """The pattern inside a kernel: its static fields from the kernel's configuration, its
    scalars read from the scalar operand."""
    return AttentionPattern(kind, seed=s_ref[0], step=s_ref[1], threshold=s_ref[2],
                            block_size=block_size, stream_len=stream_len)


def flash_vjp(forward, dq, dkv, delta):
    """``flash(cfg, scalars, q, k, v, seg) -> o`` with the flash backward.

    ``forward(cfg, scalars, q, k, v, seg) -> (o, lse)``; ``dq(cfg, scalars, q, k, v, do, lse,
    delta, seg)`` and ``dkv(...)`` the backward kernels; ``delta(o, do)`` the softmax-backward
    correction ``sum_d o * do`` (one f32 per query row) in the layout the kernels read.
    ``cfg`` is static (hashable); scalars and segment ids get no gradient. The forward rule names
    its residuals ``o`` and ``lse`` (``residuals.py``) so that a remat policy can save them.
    """
    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def flash(cfg, scalars, q, k, v, seg):
        return forward(cfg, scalars, q, k, v, seg)[0]

    def fwd(cfg, scalars, q, k, v, seg):
        o, lse = forward(cfg, scalars, q, k, v, seg)
        o, lse = residuals.name_output(o), residuals.name_logsumexp(lse)
        return o, (scalars, q, k, v, seg, o, lse)

    def bwd(cfg, res, do):
        scalars, q, k, v, seg, o, lse = res
        d = delta(o, do)
        grad_q = dq(cfg, scalars, q, k, v, do, lse, d, seg)
        grad_k, grad_v = dkv(cfg, scalars, q, k, v, do, lse, d, seg)
        return None, grad_q, grad_k, grad_v, None

    flash.defvjp(fwd, bwd)
    return flash


def row_sums(o, do) -> jax.Array:
    """``sum_d o * do`` in f32 over the last axis."""
    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
