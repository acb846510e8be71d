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
``tiles.TileRule``: integer bounds of the pattern's rule, never the mask itself):

- skipped (no compute, and the index map re-points the DMA at a block already resident so no copy
  is issued): kv blocks with no open entry. Exact for ``causal``, ``full`` and ``annealed`` at
  ratio 0; for ``annealed`` with threshold > 0 the hashed part (the future of the diagonal, or
  the inside of a block) counts as open. Without blocks that means: the future of the q block for
  causal (and annealed at ratio 0), padding only for the rest. With a pattern in diffusion
  blocks (``block_size``, docs/algorithms.md §9) also every later diffusion block; in the
  two-stream ``[x_t ; x_0]`` input also the noisy diffusion blocks other than a noisy query's
  own, every noisy key for a clean query, and the clean keys of a noisy query's own and later
  diffusion blocks. The keys a q block needs are then two ranges of kv blocks (noisy, clean) and
  the queries a kv block serves two ranges of q blocks, which the index maps walk in order.
- unmasked fast path (no iota / hash / where): kernel blocks the rule opens throughout (every one
  for ``full`` without diffusion blocks; those entirely below the diagonal; those inside one
  diffusion block, or one quadrant of the two streams, that its rule opens; ``annealed`` at
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
from diffujax.attention.flash_common import (flash_vjp, pattern_from_scalars, pattern_scalars,
                                             row_sums)
from diffujax.attention.pattern import AttentionPattern, is_open
from diffujax.attention.tiles import TileRule, tile_runs, tile_to_load

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
class _Cfg:
    """Everything static about one call (hashable: it is a ``custom_vjp`` nondiff argument)."""
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
    vmem_limit_bytes: int | None
    block_size: int = 0  # the pattern's static block structure (pattern.py)
    stream_len: int = 0

    @property
    def padded(self) -> bool:
        return self.padded_len != self.seq_len

    @property
    def rule(self) -> TileRule:
        return TileRule(self.kind, self.block_size, self.stream_len, self.seq_len)


def _block_metadata(**blocks: int) -> dict:
    """The kernel's tiles in its HLO custom call, as splash writes its own (``kernel_metadata``):
    ``diffujax plan`` reads them to charge the kernel from a roofline of its blocks."""
    return {"xprof_metadata": json.dumps(blocks)}


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


def _allowed(cfg: _Cfg, s_ref, q_idx, k_idx, q_seg, k_seg):
    pattern = pattern_from_scalars(cfg.kind, s_ref, cfg.block_size, cfg.stream_len)
    ok = is_open(pattern, q_idx, k_idx, q_seg, k_seg)
    if cfg.padded:
        ok = ok & (k_idx < cfg.seq_len)
    return ok


def _when_status(run, mask, body):
    """Run ``body(masked=...)`` under the right branch (two copies: the fast one has no mask)."""
    @pl.when(run & mask)
    def _():
        body(True)

    @pl.when(run & jnp.logical_not(mask))
    def _():
        body(False)


def _compiler_params(cfg: _Cfg, semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics,
                                vmem_limit_bytes=cfg.vmem_limit_bytes)


# ----------------------------------------------------------------------------------------------
# forward


def _fwd_kernel(cfg: _Cfg, s_ref, q_ref, k_ref, v_ref, *rest):
    if cfg.segmented:
        qseg_ref, kseg_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
    else:
        o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
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
            q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
            k_idx = j * bkv + lax.broadcasted_iota(jnp.int32, (1, bkv), 1)
            q_seg = _lanes(qseg_ref[...], bkv) if cfg.segmented else None
            k_seg = kseg_ref[...] if cfg.segmented else None
            s = jnp.where(_allowed(cfg, s_ref, q_idx, k_idx, q_seg, k_seg), s, MASK_VALUE)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - _lanes(m_new, bkv))
        alpha = jnp.exp(m_prev - m_new)
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_new
        pv = lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
        acc_scr[...] = acc_scr[...] * _lanes(alpha, acc_scr.shape[1]) + pv

    run, mask = _block_status(cfg, s_ref[2], i, j, bq, bkv)
    _when_status(run, mask, body)

    @pl.when(j == nk - 1)
    def _finish():
        l = l_scr[...]
        l = jnp.where(l == 0.0, 1.0, l)  # unreachable for our patterns; keeps padding finite
        o_ref[...] = (acc_scr[...] / _lanes(l, acc_scr.shape[1])).astype(o_ref.dtype)
        lse = m_scr[...] + jnp.log(l)  # (bq, LANES), lanes equal
        lse_ref[...] = lse.T[:1].astype(lse_ref.dtype)  # (1, bq): a lane row


def _seg_forms(seg):
    """Segment ids [B, Lp] as a lane row ``[B, 1, Lp]`` and a lane-replicated column ``[B, Lp, 128]``."""
    return seg[:, None, :], jnp.broadcast_to(seg[:, :, None], (*seg.shape, LANES))


def _forward(cfg: _Cfg, scalars, q, k, v, seg):
    axes, (scalars, q, k, v, seg) = unify(scalars, q, k, v, seg)
    b, h, lp, d = q.shape
    kvh = k.shape[1]
    bq, bkv = cfg.bq, cfg.bkv
    g = cfg.groups
    grid = (b, h, lp // bq, lp // bkv)

    def q_map(bi, hi, i, j, s):
        return bi, hi, i, 0

    def kv_map(bi, hi, i, j, s):
        return bi, _div(hi, g), _kv_block(cfg, s[2], i, j, bq, bkv), 0

    in_specs = [pl.BlockSpec((None, None, bq, d), q_map),
                pl.BlockSpec((None, None, bkv, d), kv_map),
                pl.BlockSpec((None, None, bkv, d), kv_map)]
    args = [q, k, v]
    if cfg.segmented:
        seg_row, seg_col = _seg_forms(seg)
        in_specs += [pl.BlockSpec((None, bq, LANES), lambda bi, hi, i, j, s: (bi, i, 0)),
                     pl.BlockSpec((None, 1, bkv), lambda bi, hi, i, j, s: (
                         bi, 0, _kv_block(cfg, s[2], i, j, bq, bkv)))]
        args += [seg_col, seg_row]
    out_specs = [pl.BlockSpec((None, None, bq, d), q_map),
                 pl.BlockSpec((None, None, 1, bq), lambda bi, hi, i, j, s: (bi, hi, 0, i))]
    out_shape = [sds(q.shape, q.dtype, axes), sds((b, h, 1, lp), jnp.float32, axes)]
    itemsize = q.dtype.itemsize
    cost = pl.CostEstimate(flops=4 * b * h * lp * lp * d, transcendentals=b * h * lp * lp,
                           bytes_accessed=itemsize * (2 * b * h * lp * d
                                                      + 2 * b * kvh * lp * d * (lp // bq)))
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                            pltpu.VMEM((bq, LANES), jnp.float32),
                            pltpu.VMEM((bq, d), jnp.float32)]),
        out_shape=out_shape,
        compiler_params=_compiler_params(cfg, ("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=cfg.interpret,
        name="diffujax_flash_fwd",
        metadata=_block_metadata(block_q=bq, block_kv=bkv),
    )(scalars, *args)
    return o, lse


# ----------------------------------------------------------------------------------------------
# backward: dq


def _dq_kernel(cfg: _Cfg, s_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, *rest):
    if cfg.segmented:
        qseg_ref, kseg_ref, dq_ref, acc_scr, lse_scr, dl_scr = rest
    else:
        dq_ref, acc_scr, lse_scr, dl_scr = rest
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
            q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
            k_idx = j * bkv + lax.broadcasted_iota(jnp.int32, (1, bkv), 1)
            q_seg = _lanes(qseg_ref[...], bkv) if cfg.segmented else None
            k_seg = kseg_ref[...] if cfg.segmented else None
            s = jnp.where(_allowed(cfg, s_ref, q_idx, k_idx, q_seg, k_seg), s, MASK_VALUE)
        p = jnp.exp(s - _lanes(lse_scr[...], bkv))
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - _lanes(dl_scr[...], bkv))
        acc_scr[...] += lax.dot_general(ds.astype(k.dtype), k, _NN,
                                        preferred_element_type=jnp.float32)

    run, mask = _block_status(cfg, s_ref[2], i, j, bq, bkv)
    _when_status(run, mask, body)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (acc_scr[...] * cfg.scale).astype(dq_ref.dtype)


def _dq(cfg: _Cfg, scalars, q, k, v, do, lse, delta, seg):
    axes, (scalars, q, k, v, do, lse, delta, seg) = unify(scalars, q, k, v, do, lse, delta, seg)
    b, h, lp, d = q.shape
    bq, bkv = cfg.bq_bwd, cfg.bkv_bwd
    g = cfg.groups

    def q_map(bi, hi, i, j, s):
        return bi, hi, i, 0

    def kv_map(bi, hi, i, j, s):
        return bi, _div(hi, g), _kv_block(cfg, s[2], i, j, bq, bkv), 0

    def row_map(bi, hi, i, j, s):
        return bi, hi, 0, i

    in_specs = [pl.BlockSpec((None, None, bq, d), q_map),
                pl.BlockSpec((None, None, bkv, d), kv_map),
                pl.BlockSpec((None, None, bkv, d), kv_map),
                pl.BlockSpec((None, None, bq, d), q_map),
                pl.BlockSpec((None, None, 1, bq), row_map),
                pl.BlockSpec((None, None, 1, bq), row_map)]
    args = [q, k, v, do, lse, delta]
    if cfg.segmented:
        seg_row, seg_col = _seg_forms(seg)
        in_specs += [pl.BlockSpec((None, bq, LANES), lambda bi, hi, i, j, s: (bi, i, 0)),
                     pl.BlockSpec((None, 1, bkv), lambda bi, hi, i, j, s: (
                         bi, 0, _kv_block(cfg, s[2], i, j, bq, bkv)))]
        args += [seg_col, seg_row]
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, h, lp // bq, lp // bkv), in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, bq, d), q_map),
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32),
                            pltpu.VMEM((bq, LANES), jnp.float32),
                            pltpu.VMEM((bq, LANES), jnp.float32)]),
        out_shape=sds(q.shape, q.dtype, axes),
        compiler_params=_compiler_params(cfg, ("parallel", "parallel", "parallel", "arbitrary")),
        # three matmuls per score tile: q k^T, do v^T, ds k
        cost_estimate=pl.CostEstimate(flops=6 * b * h * lp * lp * d,
                                      transcendentals=b * h * lp * lp,
                                      bytes_accessed=q.dtype.itemsize * 6 * b * h * lp * d),
        interpret=cfg.interpret,
        name="diffujax_flash_dq",
        metadata=_block_metadata(block_q_dq=bq, block_kv_dq=bkv),
    )(scalars, *args)


# ----------------------------------------------------------------------------------------------
# backward: dk, dv (transposed tiles: rows are keys, lanes are queries)


def _dkv_kernel(cfg: _Cfg, s_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, *rest):
    if cfg.segmented:
        qseg_ref, kseg_ref, dk_ref, dv_ref, dk_scr, dv_scr = rest
    else:
        dk_ref, dv_ref, dk_scr, dv_scr = rest
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
            q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (1, bq), 1)
            k_idx = j * bkv + lax.broadcasted_iota(jnp.int32, (bkv, 1), 0)
            q_seg = qseg_ref[...] if cfg.segmented else None
            k_seg = _lanes(kseg_ref[...], bq) if cfg.segmented else None
            st = jnp.where(_allowed(cfg, s_ref, q_idx, k_idx, q_seg, k_seg), st, MASK_VALUE)
        pt = jnp.exp(st - lse_ref[...])  # (bkv, bq) - (1, bq)
        dv_scr[...] += lax.dot_general(pt.astype(do.dtype), do, _NN,
                                       preferred_element_type=jnp.float32)
        dpt = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
        dst = pt * (dpt - dl_ref[...])
        dk_scr[...] += lax.dot_general(dst.astype(q.dtype), q, _NN,
                                       preferred_element_type=jnp.float32)

    run, mask = _block_status(cfg, s_ref[2], i, j, bq, bkv)
    _when_status(run, mask, body)

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

    def q_map(bi, hk, j, gi, i, s):
        return bi, hk * g + gi, _q_block(cfg, s[2], i, j, bq, bkv), 0

    def kv_map(bi, hk, j, gi, i, s):
        return bi, hk, j, 0

    def row_map(bi, hk, j, gi, i, s):
        return bi, hk * g + gi, 0, _q_block(cfg, s[2], i, j, bq, bkv)

    in_specs = [pl.BlockSpec((None, None, bq, d), q_map),
                pl.BlockSpec((None, None, bkv, d), kv_map),
                pl.BlockSpec((None, None, bkv, d), kv_map),
                pl.BlockSpec((None, None, bq, d), q_map),
                pl.BlockSpec((None, None, 1, bq), row_map),
                pl.BlockSpec((None, None, 1, bq), row_map)]
    args = [q, k, v, do, lse, delta]
    if cfg.segmented:
        seg_row, seg_col = _seg_forms(seg)
        in_specs += [pl.BlockSpec((None, 1, bq), lambda bi, hk, j, gi, i, s: (
                         bi, 0, _q_block(cfg, s[2], i, j, bq, bkv))),
                     pl.BlockSpec((None, bkv, LANES), lambda bi, hk, j, gi, i, s: (bi, j, 0))]
        args += [seg_row, seg_col]
    out_spec = pl.BlockSpec((None, None, bkv, d), kv_map)
    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, kvh, lp // bkv, g, lp // bq), in_specs=in_specs,
            out_specs=[out_spec, out_spec],
            scratch_shapes=[pltpu.VMEM((bkv, d), jnp.float32),
                            pltpu.VMEM((bkv, d), jnp.float32)]),
        out_shape=[sds(k.shape, k.dtype, axes), sds(v.shape, v.dtype, axes)],
        compiler_params=_compiler_params(
            cfg, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=8 * b * h * lp * lp * d,
                                      transcendentals=b * h * lp * lp,
                                      bytes_accessed=q.dtype.itemsize * 6 * b * h * lp * d),
        interpret=cfg.interpret,
        name="diffujax_flash_dkv",
        metadata=_block_metadata(block_q_dkv=bq, block_kv_dkv=bkv),
    )(scalars, *args)


# ----------------------------------------------------------------------------------------------
# custom_vjp on the heads-major, padded layout


# delta as a lane row per (batch, head): [B, H, 1, Lp], like lse.
_flash = flash_vjp(_forward, _dq, _dkv, lambda o, do: row_sums(o, do)[:, :, None, :])


def kernel_config(kind: str, segmented: bool, seq_len: int, head_dim: int, groups: int,
                  block_sizes: BlockSizes, *, scale: float | None = None,
                  interpret: Any = False, block_size: int = 0, stream_len: int = 0) -> _Cfg:
    """The static configuration of the three kernels for one call shape (also what
    ``benchmarks/tpu_block_sizes.py`` compiles the kernels with, one by one).
    ``block_size`` / ``stream_len``: the pattern's blocks (``AttentionPattern``)."""
    bq_b, bkv_b = block_sizes.bwd()
    lp, (bq, bkv, bq_b, bkv_b) = _layout(
        seq_len, (block_sizes.block_q, block_sizes.block_kv, bq_b, bkv_b))
    TileRule(kind, block_size, stream_len, seq_len)  # refuses a two-stream length mismatch
    return _Cfg(kind=kind, segmented=segmented, seq_len=seq_len, padded_len=lp, bq=bq, bkv=bkv,
                bq_bwd=bq_b, bkv_bwd=bkv_b,
                scale=float(head_dim ** -0.5 if scale is None else scale), groups=groups,
                interpret=interpret, vmem_limit_bytes=block_sizes.vmem_limit_bytes,
                block_size=block_size, stream_len=stream_len)


def flash_attention(q, k, v, pattern: AttentionPattern, *, scale: float | None = None,
                    block_sizes: BlockSizes | None = None, interpret: Any = False):
    """Pallas TPU flash attention; same contract as ``reference_attention``.

    q ``[B, L, H, D]``, k/v ``[B, L, KVH, D]`` (self-attention: equal lengths), ``H % KVH == 0``.
    ``interpret``: ``True`` (fast generic interpreter, runs on CPU) or a ``pltpu.InterpretParams``
    (the TPU-semantics interpreter: slower, checks more).
    """
    b, lq, h, d = q.shape
    lk, kvh = k.shape[1], k.shape[2]
    if lq != lk:
        raise ValueError(f"flash_attention is self-attention only: q length {lq} != kv {lk}")
    if h % kvh:
        raise ValueError(f"query heads {h} are not a multiple of key/value heads {kvh}")
    if k.shape != v.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} differ")
    if block_sizes is None:
        block_sizes = default_block_sizes() if jax.default_backend() == "tpu" else BlockSizes()
    cfg = kernel_config(pattern.kind, pattern.segment_ids is not None, lq, d, h // kvh,
                        block_sizes, scale=scale, interpret=interpret,
                        block_size=pattern.block_size, stream_len=pattern.stream_len)
    lp = cfg.padded_len

    def prep(x):
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, lp - lq), (0, 0))) if lp != lq else x

    seg = None
    if cfg.segmented:
        seg = jnp.asarray(pattern.segment_ids, jnp.int32)
        if seg.shape != (b, lq):
            raise ValueError(f"segment_ids {seg.shape} != (batch, length) {(b, lq)}")
        if lp != lq:
            seg = jnp.pad(seg, ((0, 0), (0, lp - lq)))
    out = _flash(cfg, pattern_scalars(pattern), prep(q), prep(k), prep(v), seg)
    return jnp.swapaxes(out[:, :, :lq], 1, 2)
