"""What the TPU (Mosaic) and GPU (Triton) flash kernels share: constants, the static
configuration of a call, the checks and padding of the operands, the pattern's scalar operand, and
the ``custom_vjp`` that ties a forward kernel to its two backward kernels.

Both kernels compute the same thing on different layouts; only the layout-specific parts (block
specs, grids, how ``delta`` is laid out) stay in ``tpu.py`` / ``gpu.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from diffujax.attention import residuals
from diffujax.attention.pattern import AttentionPattern, is_open
from diffujax.attention.tiles import TileRule

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


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """What is static about one call of a flash kernel (hashable: a ``custom_vjp`` nondiff
    argument); each backend adds its launch parameters in a subclass."""
    kind: str
    segmented: bool
    seq_len: int      # real length L
    padded_len: int   # Lp, a multiple of every block size
    bq: int
    bkv: int
    bq_bwd: int
    bkv_bwd: int
    scale: float
    groups: int       # query heads per K/V head
    interpret: Any
    block_size: int   # the pattern's static block structure (pattern.py)
    stream_len: int

    def __post_init__(self):
        self.rule  # refuses a two-stream length mismatch

    @property
    def rule(self) -> TileRule:
        return TileRule(self.kind, self.block_size, self.stream_len, self.seq_len)

    def pattern(self, s_ref) -> AttentionPattern:
        """The pattern inside a kernel: its static fields from here, its scalars read from the
        scalar operand."""
        return AttentionPattern(self.kind, seed=s_ref[0], step=s_ref[1], threshold=s_ref[2],
                                block_size=self.block_size, stream_len=self.stream_len)

    def allowed(self, pattern: AttentionPattern, q_idx, k_idx, q_seg, k_seg):
        """``is_open`` on a tile's indices, padded keys closed."""
        ok = is_open(pattern, q_idx, k_idx, q_seg, k_seg)
        if self.padded_len != self.seq_len:
            ok = ok & (k_idx < self.seq_len)
        return ok


def check_operands(q, k, v):
    """Refuse what the flash kernels do not take: q ``[B, L, H, D]``, k/v ``[B, L, KVH, D]``."""
    lq, h = q.shape[1], q.shape[2]
    lk, kvh = k.shape[1], k.shape[2]
    if lq != lk:
        raise ValueError(f"flash_attention is self-attention only: q length {lq} != kv {lk}")
    if h % kvh:
        raise ValueError(f"query heads {h} are not a multiple of key/value heads {kvh}")
    if k.shape != v.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} differ")


def pad_length(x, axis: int, length: int):
    """``x`` zero-padded along ``axis`` to ``length``."""
    if x.shape[axis] == length:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad)


def padded_segments(pattern: AttentionPattern, batch: int, seq_len: int, length: int):
    """The pattern's segment ids as int32 ``[B, length]`` (zero-padded), or ``None``."""
    if pattern.segment_ids is None:
        return None
    seg = jnp.asarray(pattern.segment_ids, jnp.int32)
    if seg.shape != (batch, seq_len):
        raise ValueError(f"segment_ids {seg.shape} != (batch, length) {(batch, seq_len)}")
    return pad_length(seg, 1, length)


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
        o = checkpoint_name(o, residuals.OUTPUT)
        lse = checkpoint_name(lse, residuals.LOGSUMEXP)
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
