"""GPU attention: cuDNN for causal/full, a Pallas (Triton) kernel with the in-kernel hash otherwise.

- ``cudnn_attention``: ``jax.nn.dot_product_attention(..., implementation="cudnn")`` (cuDNN flash
  attention; without ``implementation="cudnn"`` JAX would materialise the ``L x L`` scores). It
  takes causal/full without segment ids or blocks, bf16/f16 inputs; anything else is refused
  with a ``ValueError`` and the dispatcher picks the Pallas kernel.
- ``flash_attention``: a Pallas kernel lowered through Triton, forward and backward (``dq`` and
  ``dk/dv`` kernels), for every pattern: the annealed pattern is regenerated per tile by
  ``pattern.is_open`` on iota indices (bit-identical to ``dense_mask``), segment ids combine with
  every kind. Layout is the model's ``[B, L, H, D]`` (strided loads, no transposes).

Structure (one program per q block, resp. per kv block, looping over the other axis):
the loop over kv blocks is split into an unmasked range (blocks fully below the diagonal, or every
block for ``full`` / ratio 1) and a masked range; its upper end stops at the diagonal for causal
and for annealed at ratio 0 (the future is skipped, not masked). Block-diffusion patterns
(``block_size`` / ``stream_len``, docs/algorithms.md §9) loop over the at most two ranges of
blocks that can hold an open entry (``tiles.py``: exact for causal/full), all of them masked (a
conservative choice: no unmasked fast path for them here). ``dk/dv`` programs loop over the
``H // KVH`` query heads of their group and accumulate in registers: no repeated K/V.

Block sizes are powers of two (Triton); the defaults are untuned starting points. f32 inputs use
IEEE-precision dots (no TF32) to stay comparable with the reference.

Experimental: the Pallas kernel has never run on a GPU (docs/kernels.md says what is verified).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from diffujax.attention._vma import sds, unify
from diffujax.attention.config import GpuBlockSizes as BlockSizes
from diffujax.attention.flash_common import MASK_VALUE, NN as _NN, NT as _NT, div as _div
from diffujax.attention.flash_common import (KernelConfig, check_operands, flash_vjp,
                                             pad_length, padded_segments, pattern_scalars,
                                             row_sums)
from diffujax.attention.pattern import FULL_THRESHOLD, AttentionPattern
from diffujax.attention.tiles import tile_range


# ----------------------------------------------------------------------------------------------
# cuDNN


def cudnn_attention(q, k, v, pattern: AttentionPattern):
    """cuDNN flash attention for ``causal`` / ``full`` without segment ids (bf16 or f16)."""
    if pattern.kind == "annealed" or pattern.segment_ids is not None or pattern.blocked:
        raise ValueError("cudnn attention takes causal/full patterns without segment ids or "
                         "blocks")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"cudnn attention needs bf16/f16 inputs, got {q.dtype}")
    return jax.nn.dot_product_attention(q, k, v, is_causal=pattern.kind == "causal",
                                        implementation="cudnn")


# ----------------------------------------------------------------------------------------------
# Pallas / Triton


@dataclasses.dataclass(frozen=True)
class _Cfg(KernelConfig):
    f32: bool
    num_warps: int
    num_stages: int


def _cdiv(x, n: int):
    return _div(x + (n - 1), n)


def _dot(cfg: _Cfg, a, b, dims):
    prec = lax.Precision.HIGHEST if cfg.f32 else None
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _split_segments(cfg: _Cfg, refs):
    """``((q segment ref, k segment ref), the other refs)`` of a kernel's trailing arguments
    (``(None, None)`` without segment ids)."""
    return (refs[:2], refs[2:]) if cfg.segmented else ((None, None), refs)


def _kv_ranges(cfg: _Cfg, thr, i, bq: int, bkv: int):
    """For q block ``i``: the kv block ranges to visit, ``[(lo, hi, masked), ...]`` in order.

    Plain patterns: ``[0, split)`` needs no mask, ``[split, hi)`` is masked. Blocked patterns:
    the (at most two) ranges of kv blocks that can hold an open entry (``tiles.py``), masked."""
    if cfg.block_size:
        return _span_ranges(cfg.rule.key_spans(thr, i * bq, i * bq + (bq - 1)), bkv)
    length = cfg.seq_len
    nk = -(-length // bkv)
    whole = length // bkv  # kv blocks without padding
    causal_hi = jnp.minimum(_cdiv((i + 1) * bq, bkv), nk)
    causal_split = jnp.minimum(_div(i * bq + 1, bkv), whole)
    if cfg.kind == "full":
        hi, split = jnp.int32(nk), jnp.int32(whole)
    elif cfg.kind == "causal":
        hi, split = causal_hi, causal_split
    else:
        hi = jnp.where(thr > 0, nk, causal_hi)
        split = jnp.where(thr >= FULL_THRESHOLD, whole, causal_split)
    if cfg.segmented:
        split = jnp.int32(0)
    split = jnp.minimum(split, hi)
    return [(jnp.int32(0), split, False), (split, hi, True)]


def _q_ranges(cfg: _Cfg, thr, j, bq: int, bkv: int):
    """For kv block ``j``: the q block ranges to visit, ``[(lo, hi, masked), ...]``.

    Plain patterns: ``[lo, split)`` is masked, ``[split, nq)`` needs no mask. Blocked patterns:
    as ``_kv_ranges``."""
    if cfg.block_size:
        return _span_ranges(cfg.rule.query_spans(thr, j * bkv, j * bkv + (bkv - 1)), bq)
    length = cfg.seq_len
    nq = -(-length // bq)
    causal_lo = _div(j * bkv, bq)
    causal_split = _cdiv((j + 1) * bkv - 1, bq)  # first q block entirely at/after the diagonal
    if cfg.kind == "full":
        lo, split = jnp.int32(0), jnp.int32(0)
    elif cfg.kind == "causal":
        lo, split = causal_lo, causal_split
    else:
        lo = jnp.where(thr > 0, 0, causal_lo)
        split = jnp.where(thr >= FULL_THRESHOLD, lo, causal_split)
    if cfg.padded_len != length:
        split = jnp.where((j + 1) * bkv > length, nq, split)
    if cfg.segmented:
        split = jnp.int32(nq)
    split = jnp.minimum(jnp.maximum(split, lo), nq)
    return [(lo, split, True), (split, jnp.int32(nq), False)]


def _span_ranges(spans, tile: int):
    """Two spans (``tiles.py``) as two disjoint, ordered, masked ranges of tiles."""
    ranges, end = [], jnp.int32(0)
    for lo, hi in spans:
        first, last = tile_range((lo, hi), tile)
        present = lo <= hi
        start = jnp.where(present, jnp.maximum(first, end), end)  # a shared tile runs once
        end = jnp.where(present, jnp.maximum(last + 1, start), end)
        ranges.append((start, end, True))
    return ranges


def _fold_kv_blocks(cfg: _Cfg, s_ref, q_ref, k_ref, v_ref, seg_refs, bq: int, bkv: int,
                    update, carry):
    """``carry`` folded by ``update(carry, k, v, s)`` over the kv blocks that q block
    ``program_id(0)`` visits, ``s`` its scaled scores against q, masked in the masked ranges."""
    qseg_ref, kseg_ref = seg_refs
    i = pl.program_id(0)
    pattern = cfg.pattern(s_ref)
    q = q_ref[...]
    q_idx = i * bq + jnp.arange(bq, dtype=jnp.int32)[:, None]
    q_seg = qseg_ref[...][:, None] if cfg.segmented else None

    def step(masked, j, carry):
        start = pl.multiple_of(j * bkv, bkv)
        k = k_ref[pl.ds(start, bkv), :]
        v = v_ref[pl.ds(start, bkv), :]
        s = _dot(cfg, q, k, _NT) * cfg.scale
        if masked:
            k_idx = start + jnp.arange(bkv, dtype=jnp.int32)[None, :]
            k_seg = kseg_ref[pl.ds(start, bkv)][None, :] if cfg.segmented else None
            s = jnp.where(cfg.allowed(pattern, q_idx, k_idx, q_seg, k_seg), s, MASK_VALUE)
        return update(carry, k, v, s)

    for lo, hi, masked in _kv_ranges(cfg, s_ref[2], i, bq, bkv):
        carry = lax.fori_loop(lo, hi, functools.partial(step, masked), carry)
    return carry


def _fwd_kernel(cfg: _Cfg, s_ref, q_ref, k_ref, v_ref, *rest):
    seg_refs, (o_ref, lse_ref) = _split_segments(cfg, rest)
    bq = cfg.bq

    def update(carry, k, v, s):
        m, l, acc = carry
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(cfg, p.astype(v.dtype), v, _NN)
        return m_new, l, acc

    carry = (jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32),
             jnp.zeros((bq, q_ref.shape[-1]), jnp.float32))
    m, l, acc = _fold_kv_blocks(cfg, s_ref, q_ref, k_ref, v_ref, seg_refs, bq, cfg.bkv, update,
                                carry)
    l = jnp.where(l == 0.0, 1.0, l)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _dq_kernel(cfg: _Cfg, s_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, *rest):
    seg_refs, (dq_ref,) = _split_segments(cfg, rest)
    do = do_ref[...]
    lse, delta = lse_ref[...][:, None], dl_ref[...][:, None]

    def update(dq, k, v, s):
        p = jnp.exp(s - lse)
        ds = p * (_dot(cfg, do, v, _NT) - delta)
        return dq + _dot(cfg, ds.astype(k.dtype), k, _NN)

    dq = _fold_kv_blocks(cfg, s_ref, q_ref, k_ref, v_ref, seg_refs, cfg.bq_bwd, cfg.bkv_bwd,
                         update, jnp.zeros(q_ref.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(cfg: _Cfg, s_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, *rest):
    (qseg_ref, kseg_ref), (dk_ref, dv_ref) = _split_segments(cfg, rest)
    bq, bkv = cfg.bq_bwd, cfg.bkv_bwd
    j = pl.program_id(0)
    pattern = cfg.pattern(s_ref)
    k, v = k_ref[...], v_ref[...]
    k_idx = j * bkv + jnp.arange(bkv, dtype=jnp.int32)[:, None]
    k_seg = kseg_ref[...][:, None] if cfg.segmented else None
    ranges = _q_ranges(cfg, s_ref[2], j, bq, bkv)

    def step(g, masked, i, carry):
        dk, dv = carry
        start = pl.multiple_of(i * bq, bq)
        q = q_ref[pl.ds(start, bq), g, :]
        do = do_ref[pl.ds(start, bq), g, :]
        lse = lse_ref[g, pl.ds(start, bq)][None, :]
        delta = dl_ref[g, pl.ds(start, bq)][None, :]
        st = _dot(cfg, k, q, _NT) * cfg.scale  # (bkv, bq): keys on rows
        if masked:
            q_idx = start + jnp.arange(bq, dtype=jnp.int32)[None, :]
            q_seg = qseg_ref[pl.ds(start, bq)][None, :] if cfg.segmented else None
            st = jnp.where(cfg.allowed(pattern, q_idx, k_idx, q_seg, k_seg), st, MASK_VALUE)
        pt = jnp.exp(st - lse)
        dv = dv + _dot(cfg, pt.astype(do.dtype), do, _NN)
        dst = pt * (_dot(cfg, v, do, _NT) - delta)
        dk = dk + _dot(cfg, dst.astype(q.dtype), q, _NN)
        return dk, dv

    def group(g, carry):
        for lo, hi, masked in ranges:
            carry = lax.fori_loop(lo, hi, functools.partial(step, g, masked), carry)
        return carry

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, cfg.groups, group, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _call(cfg: _Cfg, kernel, grid, in_specs, seg_specs, out_specs, out_shape, args, name):
    """``kernel`` over ``grid``. ``args``: the scalars (one ``(4,)`` block), the operands of
    ``in_specs``, then the segment ids, passed (as q ids, then k ids: ``seg_specs``) if any."""
    *args, seg = args
    if cfg.segmented:
        in_specs, args = [*in_specs, *seg_specs], [*args, seg, seg]
    return pl.pallas_call(
        functools.partial(kernel, cfg), grid=grid, in_specs=[_SCALAR_SPEC, *in_specs],
        out_specs=out_specs, out_shape=out_shape, interpret=cfg.interpret, name=name,
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                                num_stages=cfg.num_stages),
    )(*args)


_SCALAR_SPEC = pl.BlockSpec((4,), lambda *_: (0,))


def _row_specs(cfg: _Cfg, bq: int, lp: int, d: int):
    """``(q, k/v, lane-row, segment)`` specs of the kernels on grid ``(q blocks, B, heads)``, the
    forward and dq: each query head reads its group's whole K/V."""
    g = cfg.groups
    return (pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
            pl.BlockSpec((None, lp, None, d), lambda i, bi, hi: (bi, 0, _div(hi, g), 0)),
            pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i)),
            [pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i)),
             pl.BlockSpec((None, lp), lambda i, bi, hi: (bi, 0))])


def _forward(cfg: _Cfg, scalars, q, k, v, seg):
    axes, args = unify(scalars, q, k, v, seg)
    b, lp, h, d = q.shape
    q_spec, kv_spec, row_spec, seg_specs = _row_specs(cfg, cfg.bq, lp, d)
    out_shape = [sds(q.shape, q.dtype, axes), sds((b, h, lp), jnp.float32, axes)]
    return _call(cfg, _fwd_kernel, (lp // cfg.bq, b, h), [q_spec, kv_spec, kv_spec], seg_specs,
                 [q_spec, row_spec], out_shape, args, "diffujax_gpu_flash_fwd")


def _dq(cfg: _Cfg, scalars, q, k, v, do, lse, delta, seg):
    axes, args = unify(scalars, q, k, v, do, lse, delta, seg)
    b, lp, h, d = q.shape
    q_spec, kv_spec, row_spec, seg_specs = _row_specs(cfg, cfg.bq_bwd, lp, d)
    return _call(cfg, _dq_kernel, (lp // cfg.bq_bwd, b, h),
                 [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec], seg_specs,
                 q_spec, sds(q.shape, q.dtype, axes), args, "diffujax_gpu_flash_dq")


def _dkv(cfg: _Cfg, scalars, q, k, v, do, lse, delta, seg):
    axes, args = unify(scalars, q, k, v, do, lse, delta, seg)
    b, lp, h, d = q.shape
    kvh = k.shape[2]
    bkv, g = cfg.bkv_bwd, cfg.groups
    q_spec = pl.BlockSpec((None, lp, g, d), lambda j, bi, hk: (bi, 0, hk, 0))
    kv_spec = pl.BlockSpec((None, bkv, None, d), lambda j, bi, hk: (bi, j, hk, 0))
    row_spec = pl.BlockSpec((None, g, lp), lambda j, bi, hk: (bi, hk, 0))
    seg_specs = [pl.BlockSpec((None, lp), lambda j, bi, hk: (bi, 0)),
                 pl.BlockSpec((None, bkv), lambda j, bi, hk: (bi, j))]
    out_shape = [sds(k.shape, k.dtype, axes), sds(v.shape, v.dtype, axes)]
    return _call(cfg, _dkv_kernel, (lp // bkv, b, kvh),
                 [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec], seg_specs,
                 [kv_spec, kv_spec], out_shape, args, "diffujax_gpu_flash_dkv")


# delta as [B, H, Lp], like lse.
_flash = flash_vjp(_forward, _dq, _dkv, lambda o, do: jnp.swapaxes(row_sums(o, do), 1, 2))


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def flash_attention(q, k, v, pattern: AttentionPattern, *, block_sizes: BlockSizes | None = None,
                    interpret: Any = False):
    """Pallas GPU (Triton) flash attention; same contract as ``reference_attention``."""
    check_operands(q, k, v)
    b, lq, h, d = q.shape
    bs = block_sizes or BlockSizes()
    blocks = (bs.block_q, bs.block_kv, bs.block_q_bwd, bs.block_kv_bwd)
    if not all(_pow2(x) for x in blocks):
        raise ValueError(f"Triton block sizes must be powers of two, got {blocks}")
    if not _pow2(d) and not interpret:
        raise ValueError(f"the Triton kernel needs a power-of-two head_dim, got {d}")
    short = max(8, 1 << (lq - 1).bit_length())  # shrink blocks for short sequences
    blocks = tuple(min(x, short) for x in blocks)
    lp = -(-lq // max(blocks)) * max(blocks)
    cfg = _Cfg(pattern.kind, pattern.segment_ids is not None, lq, lp, *blocks,
               scale=float(d ** -0.5), groups=h // k.shape[2],
               interpret=interpret, block_size=pattern.block_size,
               stream_len=pattern.stream_len, f32=q.dtype == jnp.float32,
               num_warps=bs.num_warps, num_stages=bs.num_stages)
    seg = padded_segments(pattern, b, lq, lp)
    q, k, v = (pad_length(x, 1, lp) for x in (q, k, v))
    # Four scalars: the operand is one (4,) block for Triton.
    return _flash(cfg, pattern_scalars(pattern, 4), q, k, v, seg)[:, :lq]
