"""Blockwise (flash) attention for TPU in Pallas/Mosaic, with the attention pattern hashed in-kernel.

Why a kernel of our own: the annealed pattern (docs/algorithms.md §3) is a random ``L x L`` matrix
that changes every step. This kernel regenerates any tile of it from ``(seed, step, q, k)`` by
calling ``pattern.is_open`` on iota tile indices, so no ``L x L`` array is ever read or stored, and
the scalars ``seed/step/threshold`` arrive through scalar prefetch (SMEM): a new step or a new ratio
never recompiles.

Layout: the public entry takes ``[B, L, H, D]`` like the reference and works internally on
``[B, H, L, D]`` so every block is a ``(rows, D)`` tile with ``D`` on the lanes (the transposes are
plain XLA ops outside the kernels; a model that produces heads-major tensors could skip them).

Kernels (all with f32 online softmax / f32 accumulators, bf16 or f32 inputs):

- forward, grid ``(B, H, q blocks, kv blocks)``: writes ``o`` and the row log-sum-exp.
- dq, grid ``(B, H, q blocks, kv blocks)``.
- dk/dv, grid ``(B, KVH, kv blocks, group, q blocks)``: works on the transposed score tile
  ``k q^T`` so the per-query statistics (lse, delta) are lane rows and need no transpose, and
  accumulates over the ``H // KVH`` query heads of a group in VMEM: repeated K/V (or their
  gradients) never exist in HBM. In the forward and dq kernels each query head reads its group's
  K/V block through the index map (``h // group``).

Block classification (per ``(q block, kv block)``, from program ids and the SMEM threshold, by
``tiles.TileRule``: integer bounds of the pattern's rule, never the mask itself; which tiles that
skips or opens, for plain, blocked and two-stream patterns, is in ``tiles.py``):

- skipped (no compute, and the index map re-points the DMA at a block already resident so no copy
  is issued): kv blocks with no open entry (exact for ``causal``, ``full`` and ``annealed`` at
  ratio 0; above ratio 0 the hashed part counts as open). The keys a q block needs are at most
  two ranges of kv blocks (noisy, clean) and the queries a kv block serves two ranges of q
  blocks, which the index maps walk in order.
- unmasked fast path (no iota / hash / where): blocks the rule opens throughout (``annealed`` at
  threshold ``2^24`` as ``full``); never when segment ids are given (segment masks are data) or
  when the block holds padded keys.
- otherwise masked: ``is_open`` on the tile (the hash costs three murmur finalisers, the first two
  of which are computed on the scalar / per-row vector only, thanks to broadcasting).

Lengths that are not a multiple of the blocks are padded inside the wrapper; padded keys are
masked (by position) and padded query rows are cut off. Every real query row sees at least its
own key (diagonal), so no row is ever fully masked; rows that are fully masked would differ from
the reference (which spreads them uniformly), but none of the patterns produce them.

Block sizes are multiples of 128 by default (lanes); small multiples of 8 are accepted for tests
in interpret mode. The per-chip defaults below are the largest that Mosaic compiles within the
default scoped VMEM for head_dim 64 and 128 (``benchmarks/tpu_block_sizes.py``). What has been
verified, and on what, is in docs/kernels.md.

On a mesh, ``diffujax.attention.attention`` runs these kernels under ``jax.shard_map``
(``sharded.py``). Called under a user's own ``shard_map(check_vma=True)`` they declare their
outputs' varying axes (``_vma.py``); in interpret mode JAX's interpreter needs ``check_vma=False``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from diffujax.attention._vma import sds, unify
from diffujax.attention.config import TpuBlockSizes as BlockSizes
from diffujax.attention.flash_common import MASK_VALUE, NN as _NN, NT as _NT, div as _div
from diffujax.attention.flash_common import (KernelConfig, check_operands, flash_vjp,
                                             pad_length, padded_segments, pattern_scalars,
                                             row_sums)
from diffujax.attention.pattern import AttentionPattern
from diffujax.attention.tiles import tile_runs, tile_to_load

LANES = 128


# The largest blocks Mosaic compiles within the default scoped VMEM (16 MiB on v4/v5e/v5p, 32 MiB
# on v6e) for head_dim 64 and 128 at L = 2048 and 8192, bf16, the most VMEM-hungry variant
# (annealed + segment ids), measured with libtpu by ``benchmarks/tpu_block_sizes.py`` (rerun it
# after changing a kernel). Forward pair, then the backward pair shared by dq and dk/dv (dk/dv,
# with two f32 accumulators, is the limit). Fitting is not speed: time on the chip.
_DEFAULTS = {
    "v4": BlockSizes(1024, 2048, 1024, 1024),
    "v5e": BlockSizes(2048, 1024, 1024, 1024),
    "v5p": BlockSizes(1024, 2048, 1024, 1024),
    "v6e": BlockSizes(2048, 2048, 2048, 1024),
}


def default_block_sizes(device_kind: str | None = None) -> BlockSizes:
    """The block sizes for a chip (``device_kind`` as JAX spells it, e.g. ``"TPU v5 lite"``);
    ``None``: the first local device's."""
    if device_kind is None:
        device_kind = jax.devices()[0].device_kind
    kind = device_kind.lower()
    if "v6" in kind:
        return _DEFAULTS["v6e"]
    if "v5" in kind and ("lite" in kind or "v5e" in kind):
        return _DEFAULTS["v5e"]
    if "v5" in kind:
        return _DEFAULTS["v5p"]
    if "v4" in kind:
        return _DEFAULTS["v4"]
    return BlockSizes()


@dataclasses.dataclass(frozen=True)
class _Cfg(KernelConfig):
    vmem_limit_bytes: int | None


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _layout(seq_len: int, blocks: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """Padded length and the (possibly shrunk) blocks for a sequence of ``seq_len``."""
    for b in blocks:
        if b <= 0 or b % 8:
            raise ValueError(f"attention block sizes must be positive multiples of 8, got {blocks}")
    short = _round_up(seq_len, 8)
    if max(blocks) >= short:
        # Short sequence: blocks no larger than the (8-aligned) sequence; one block if they do
        # not tile it. A block equal to the whole padded axis is always a legal TPU block.
        blocks = tuple(min(b, short) for b in blocks)
        if any(short % b for b in blocks):
            blocks = tuple(short for _ in blocks)
        return short, blocks
    return _round_up(seq_len, math.lcm(*blocks)), blocks


def _lanes(x, n: int):
    """A lane-replicated ``(rows, LANES)`` statistic as ``(rows, n)``."""
    w = x.shape[1]
    if n == w:
        return x
    if n < w:
        return x[:, :n]
    if n % w == 0:
        return jnp.tile(x, (1, n // w))
    return jnp.broadcast_to(x[:, :1], (x.shape[0], n))


def _block_status(cfg: _Cfg, thr, i, j, bq: int, bkv: int):
    """``(run, needs_mask)`` for q block ``i`` x kv block ``j``: traced scalar booleans."""
    rule = cfg.rule
    q_lo, k_lo = i * bq, j * bkv
    run = tile_runs(rule.key_spans(thr, q_lo, q_lo + (bq - 1)), j, bkv)
    if cfg.segmented:
        return run, jnp.bool_(True)
    open_ = rule.fully_open(thr, q_lo, q_lo + (bq - 1), k_lo, k_lo + (bkv - 1))
    return run, jnp.logical_not(open_)


def _kv_block(cfg: _Cfg, thr, i, j, bq: int, bkv: int):
    """The kv block to DMA for grid point (i, j): skipped blocks re-point at a needed one."""
    q_lo = i * bq
    return tile_to_load(cfg.rule.key_spans(thr, q_lo, q_lo + (bq - 1)), j, bkv)


def _q_block(cfg: _Cfg, thr, i, j, bq: int, bkv: int):
    """The q block to DMA for grid point (kv block j, q block i) of the dk/dv kernel."""
    k_lo = j * bkv
    return tile_to_load(cfg.rule.query_spans(thr, k_lo, k_lo + (bkv - 1)), i, bq)


def _run_tile(cfg: _Cfg, s_ref, i, j, bq: int, bkv: int, body):
    """Run ``body(masked=...)`` on q block ``i`` x kv block ``j`` unless it is skipped (two copies:
    the fast one has no mask)."""
    run, mask = _block_status(cfg, s_ref[2], i, j, bq, bkv)

    @pl.when(run & mask)
    def _():
        body(True)

    @pl.when(run & jnp.logical_not(mask))
    def _():
        body(False)


def _split_segments(cfg: _Cfg, refs):
    """``(segment refs or None, the other refs)`` of a kernel's trailing arguments."""
    return (refs[:2], refs[2:]) if cfg.segmented else (None, refs)


def _mask(cfg: _Cfg, s_ref, s, q_lo, k_lo, seg_refs, keys_on_rows: bool = False):
    """Score tile ``s`` (queries on rows; keys with ``keys_on_rows``) with its closed entries at
    ``MASK_VALUE``. ``seg_refs``: the segment ids of the rows as a lane-replicated column, then
    those of the columns as a lane row."""
    rows, cols = s.shape
    row_idx = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    col_idx = lax.broadcasted_iota(jnp.int32, (1, cols), 1)
    q_idx, k_idx = (q_lo + col_idx, k_lo + row_idx) if keys_on_rows else (q_lo + row_idx,
                                                                          k_lo + col_idx)
    q_seg = k_seg = None
    if cfg.segmented:
        row_seg, col_seg = _lanes(seg_refs[0][...], cols), seg_refs[1][...]
        q_seg, k_seg = (col_seg, row_seg) if keys_on_rows else (row_seg, col_seg)
    return jnp.where(cfg.allowed(cfg.pattern(s_ref), q_idx, k_idx, q_seg, k_seg), s, MASK_VALUE)


def _seg_operands(cfg: _Cfg, seg) -> list:
    """Segment ids [B, Lp] as a lane-replicated column ``[B, Lp, 128]`` and a lane row
    ``[B, 1, Lp]`` (the kernels read the ids of their rows, then of their columns)."""
    if not cfg.segmented:
        return []
    return [jnp.broadcast_to(seg[:, :, None], (*seg.shape, LANES)), seg[:, None, :]]


def _row_specs(cfg: _Cfg, d: int, bq: int, bkv: int, backward: bool):
    """``(in_specs, q spec, lane-row spec)`` of the kernels on grid ``(B, H, q blocks, kv
    blocks)``, the forward and dq: each query head reads its group's K/V at the kv block to
    load."""
    g = cfg.groups

    def kv_block(i, j, s):
        return _kv_block(cfg, s[2], i, j, bq, bkv)

    q_spec = pl.BlockSpec((None, None, bq, d), lambda bi, hi, i, j, s: (bi, hi, i, 0))
    kv_spec = pl.BlockSpec((None, None, bkv, d),
                           lambda bi, hi, i, j, s: (bi, _div(hi, g), kv_block(i, j, s), 0))
    row_spec = pl.BlockSpec((None, None, 1, bq), lambda bi, hi, i, j, s: (bi, hi, 0, i))
    specs = [q_spec, kv_spec, kv_spec] + ([q_spec, row_spec, row_spec] if backward else [])
    if cfg.segmented:
        specs += [pl.BlockSpec((None, bq, LANES), lambda bi, hi, i, j, s: (bi, i, 0)),
                  pl.BlockSpec((None, 1, bkv), lambda bi, hi, i, j, s: (bi, 0, kv_block(i, j, s)))]
    return specs, q_spec, row_spec


def _pallas(cfg: _Cfg, kernel, grid, in_specs, out_specs, out_shape, scratch, operands, *,
            matmuls: int, elements_accessed: int, name: str, **blocks: int):
    """One of the three kernels over ``grid`` (its first three axes parallel, the rest
    reductions). ``operands``: the scalars, then q ``[B, H, Lp, D]``, then the rest."""
    b, h, lp, d = operands[1].shape
    semantics = ("parallel",) * 3 + ("arbitrary",) * (len(grid) - 3)
    return pl.pallas_call(
        functools.partial(kernel, cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_specs,
            scratch_shapes=scratch),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics,
                                             vmem_limit_bytes=cfg.vmem_limit_bytes),
        # one multiply-add per score entry and head_dim for each matmul of a score tile
        cost_estimate=pl.CostEstimate(
            flops=2 * matmuls * b * h * lp * lp * d, transcendentals=b * h * lp * lp,
            bytes_accessed=operands[1].dtype.itemsize * elements_accessed),
        interpret=cfg.interpret,
        name=name,
        # the tiles, as splash writes its own (``kernel_metadata``): ``diffujax plan`` reads
        # them to charge the kernel from a roofline of its blocks
        metadata={"xprof_metadata": json.dumps(blocks)},
    )(*operands)


# ----------------------------------------------------------------------------------------------
# forward


def _fwd_kernel(cfg: _Cfg, s_ref, q_ref, k_ref, v_ref, *rest):
    seg_refs, (o_ref, lse_ref, m_scr, l_scr, acc_scr) = _split_segments(cfg, rest)
    bq, bkv = cfg.bq, cfg.bkv
    i, j = pl.program_id(2), pl.program_id(3)
    nk = pl.num_programs(3)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def body(masked: bool):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.scale
        if masked:
            s = _mask(cfg, s_ref, s, i * bq, j * bkv, seg_refs)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - _lanes(m_new, bkv))
        alpha = jnp.exp(m_prev - m_new)
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_new
        pv = lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
        acc_scr[...] = acc_scr[...] * _lanes(alpha, acc_scr.shape[1]) + pv

    _run_tile(cfg, s_ref, i, j, bq, bkv, body)

    @pl.when(j == nk - 1)
    def _finish():
        l = l_scr[...]
        l = jnp.where(l == 0.0, 1.0, l)  # unreachable for our patterns; keeps padding finite
        o_ref[...] = (acc_scr[...] / _lanes(l, acc_scr.shape[1])).astype(o_ref.dtype)
        lse = m_scr[...] + jnp.log(l)  # (bq, LANES), lanes equal
        lse_ref[...] = lse.T[:1].astype(lse_ref.dtype)  # (1, bq): a lane row


def _forward(cfg: _Cfg, scalars, q, k, v, seg):
    axes, (scalars, q, k, v, seg) = unify(scalars, q, k, v, seg)
    b, h, lp, d = q.shape
    kvh = k.shape[1]
    bq, bkv = cfg.bq, cfg.bkv
    in_specs, q_spec, row_spec = _row_specs(cfg, d, bq, bkv, backward=False)
    return _pallas(
        cfg, _fwd_kernel, (b, h, lp // bq, lp // bkv), in_specs, [q_spec, row_spec],
        [sds(q.shape, q.dtype, axes), sds((b, h, 1, lp), jnp.float32, axes)],
        [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
         pltpu.VMEM((bq, d), jnp.float32)],
        [scalars, q, k, v, *_seg_operands(cfg, seg)],
        matmuls=2, elements_accessed=2 * b * h * lp * d + 2 * b * kvh * lp * d * (lp // bq),
        name="diffujax_flash_fwd", block_q=bq, block_kv=bkv)


# ----------------------------------------------------------------------------------------------
# backward: dq


def _dq_kernel(cfg: _Cfg, s_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, *rest):
    seg_refs, (dq_ref, acc_scr, lse_scr, dl_scr) = _split_segments(cfg, rest)
    bq, bkv = cfg.bq_bwd, cfg.bkv_bwd
    i, j = pl.program_id(2), pl.program_id(3)
    nk = pl.num_programs(3)

    @pl.when(j == 0)
    def _init():
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
        # lse/delta arrive as lane rows (1, bq); make lane-replicated columns once per q block.
        lse_scr[...] = jnp.broadcast_to(lse_ref[...], (LANES, bq)).T
        dl_scr[...] = jnp.broadcast_to(dl_ref[...], (LANES, bq)).T

    def body(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.scale
        if masked:
            s = _mask(cfg, s_ref, s, i * bq, j * bkv, seg_refs)
        p = jnp.exp(s - _lanes(lse_scr[...], bkv))
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - _lanes(dl_scr[...], bkv))
        acc_scr[...] += lax.dot_general(ds.astype(k.dtype), k, _NN,
                                        preferred_element_type=jnp.float32)

    _run_tile(cfg, s_ref, i, j, bq, bkv, body)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (acc_scr[...] * cfg.scale).astype(dq_ref.dtype)


def _dq(cfg: _Cfg, scalars, q, k, v, do, lse, delta, seg):
    axes, (scalars, q, k, v, do, lse, delta, seg) = unify(scalars, q, k, v, do, lse, delta, seg)
    b, h, lp, d = q.shape
    bq, bkv = cfg.bq_bwd, cfg.bkv_bwd
    in_specs, q_spec, _ = _row_specs(cfg, d, bq, bkv, backward=True)
    return _pallas(
        cfg, _dq_kernel, (b, h, lp // bq, lp // bkv), in_specs, q_spec,
        sds(q.shape, q.dtype, axes),
        [pltpu.VMEM((bq, d), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
         pltpu.VMEM((bq, LANES), jnp.float32)],
        [scalars, q, k, v, do, lse, delta, *_seg_operands(cfg, seg)],
        matmuls=3, elements_accessed=6 * b * h * lp * d,  # q k^T, do v^T, ds k
        name="diffujax_flash_dq", block_q_dq=bq, block_kv_dq=bkv)


# ----------------------------------------------------------------------------------------------
# backward: dk, dv (transposed tiles: rows are keys, lanes are queries)


def _dkv_kernel(cfg: _Cfg, s_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, *rest):
    seg_refs, (dk_ref, dv_ref, dk_scr, dv_scr) = _split_segments(cfg, rest)
    bq, bkv = cfg.bq_bwd, cfg.bkv_bwd
    j, gi, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    ng, nq = pl.num_programs(3), pl.num_programs(4)

    @pl.when((gi == 0) & (i == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def body(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        st = lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32) * cfg.scale
        if masked:
            st = _mask(cfg, s_ref, st, i * bq, j * bkv, seg_refs, keys_on_rows=True)
        pt = jnp.exp(st - lse_ref[...])  # (bkv, bq) - (1, bq)
        dv_scr[...] += lax.dot_general(pt.astype(do.dtype), do, _NN,
                                       preferred_element_type=jnp.float32)
        dpt = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
        dst = pt * (dpt - dl_ref[...])
        dk_scr[...] += lax.dot_general(dst.astype(q.dtype), q, _NN,
                                       preferred_element_type=jnp.float32)

    _run_tile(cfg, s_ref, i, j, bq, bkv, body)

    @pl.when((gi == ng - 1) & (i == nq - 1))
    def _finish():
        dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dkv(cfg: _Cfg, scalars, q, k, v, do, lse, delta, seg):
    axes, (scalars, q, k, v, do, lse, delta, seg) = unify(scalars, q, k, v, do, lse, delta, seg)
    b, h, lp, d = q.shape
    kvh = k.shape[1]
    bq, bkv = cfg.bq_bwd, cfg.bkv_bwd
    g = cfg.groups

    def q_block(i, j, s):
        return _q_block(cfg, s[2], i, j, bq, bkv)

    q_spec = pl.BlockSpec((None, None, bq, d),
                          lambda bi, hk, j, gi, i, s: (bi, hk * g + gi, q_block(i, j, s), 0))
    kv_spec = pl.BlockSpec((None, None, bkv, d), lambda bi, hk, j, gi, i, s: (bi, hk, j, 0))
    row_spec = pl.BlockSpec((None, None, 1, bq),
                            lambda bi, hk, j, gi, i, s: (bi, hk * g + gi, 0, q_block(i, j, s)))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    if cfg.segmented:
        in_specs += [pl.BlockSpec((None, bkv, LANES), lambda bi, hk, j, gi, i, s: (bi, j, 0)),
                     pl.BlockSpec((None, 1, bq),
                                  lambda bi, hk, j, gi, i, s: (bi, 0, q_block(i, j, s)))]
    return _pallas(
        cfg, _dkv_kernel, (b, kvh, lp // bkv, g, lp // bq), in_specs, [kv_spec, kv_spec],
        [sds(k.shape, k.dtype, axes), sds(v.shape, v.dtype, axes)],
        [pltpu.VMEM((bkv, d), jnp.float32), pltpu.VMEM((bkv, d), jnp.float32)],
        [scalars, q, k, v, do, lse, delta, *_seg_operands(cfg, seg)],
        matmuls=4, elements_accessed=6 * b * h * lp * d,
        name="diffujax_flash_dkv", block_q_dkv=bq, block_kv_dkv=bkv)


# ----------------------------------------------------------------------------------------------
# custom_vjp on the heads-major, padded layout


# delta as a lane row per (batch, head): [B, H, 1, Lp], like lse.
_flash = flash_vjp(_forward, _dq, _dkv, lambda o, do: row_sums(o, do)[:, :, None, :])


def kernel_config(kind: str, segmented: bool, seq_len: int, head_dim: int, groups: int,
                  block_sizes: BlockSizes, *, interpret: Any = False, block_size: int = 0,
                  stream_len: int = 0) -> _Cfg:
    """The static configuration of the three kernels for one call shape (also what
    ``benchmarks/tpu_block_sizes.py`` compiles the kernels with, one by one).
    ``block_size`` / ``stream_len``: the pattern's blocks (``AttentionPattern``)."""
    bq_b, bkv_b = block_sizes.bwd()
    lp, (bq, bkv, bq_b, bkv_b) = _layout(
        seq_len, (block_sizes.block_q, block_sizes.block_kv, bq_b, bkv_b))
    return _Cfg(kind=kind, segmented=segmented, seq_len=seq_len, padded_len=lp, bq=bq, bkv=bkv,
                bq_bwd=bq_b, bkv_bwd=bkv_b, scale=float(head_dim ** -0.5), groups=groups,
                interpret=interpret, vmem_limit_bytes=block_sizes.vmem_limit_bytes,
                block_size=block_size, stream_len=stream_len)


def flash_attention(q, k, v, pattern: AttentionPattern, *, block_sizes: BlockSizes | None = None,
                    interpret: Any = False):
    """Pallas TPU flash attention; same contract as ``reference_attention``.

    q ``[B, L, H, D]``, k/v ``[B, L, KVH, D]`` (self-attention: equal lengths), ``H % KVH == 0``.
    ``interpret``: ``True`` (fast generic interpreter, runs on CPU) or a ``pltpu.InterpretParams``
    (the TPU-semantics interpreter: slower, checks more).
    """
    check_operands(q, k, v)
    b, lq, h, d = q.shape
    if block_sizes is None:
        block_sizes = default_block_sizes() if jax.default_backend() == "tpu" else BlockSizes()
    cfg = kernel_config(pattern.kind, pattern.segment_ids is not None, lq, d, h // k.shape[2],
                        block_sizes, interpret=interpret, block_size=pattern.block_size,
                        stream_len=pattern.stream_len)
    lp = cfg.padded_len
    seg = padded_segments(pattern, b, lq, lp)
    q, k, v = (pad_length(jnp.swapaxes(x, 1, 2), 2, lp) for x in (q, k, v))
    out = _flash(cfg, pattern_scalars(pattern), q, k, v, seg)
    return jnp.swapaxes(out[:, :, :lq], 1, 2)
