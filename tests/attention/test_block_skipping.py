"""Block classification (skip / unmasked / masked) against the dense pattern, kernel by kernel.

A skipped tile must be entirely closed and an unmasked one entirely open. For the patterns
without a hash in play (causal, full, annealed at ratio 0 and 1) skipping must also be maximal
(every fully closed tile is skipped), also for the blocked and two-stream patterns of block
diffusion. Pure index arithmetic, vectorised over the tile grid: no kernel runs here.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from attn_testlib import make_pattern, segment_ids
from diffujax.attention import gpu, tpu
from diffujax.attention.pattern import FULL_THRESHOLD, AttentionPattern, dense_mask

LENGTH, PADDED = 40, 48
EXACT = ("causal", "full", "annealed_r0", "annealed_r1")  # no hashed entry may be open


def _truth(pattern, length=LENGTH, padded=PADDED):
    dense = np.zeros((padded, padded), bool)
    plain = AttentionPattern(pattern.kind, pattern.seed, pattern.step, pattern.threshold,
                             block_size=pattern.block_size, stream_len=pattern.stream_len)
    dense[:length, :length] = np.asarray(dense_mask(plain, length))
    return dense


def _cfg(module, pattern, bq, bkv, length=LENGTH, padded=PADDED):
    common = dict(kind=pattern.kind, segmented=pattern.segment_ids is not None, seq_len=length,
                  padded_len=padded, bq=bq, bkv=bkv, bq_bwd=bq, bkv_bwd=bkv, scale=1.0,
                  groups=1, interpret=True, block_size=pattern.block_size,
                  stream_len=pattern.stream_len)
    if module is tpu:
        return tpu._Cfg(**common, vmem_limit_bytes=None)
    return gpu._Cfg(**common, f32=True, num_warps=4, num_stages=1)


def _tiles(dense, bq, bkv):
    """``[nq, nk, bq, bkv]`` view of the dense mask."""
    n = dense.shape[0]
    return dense.reshape(n // bq, bq, n // bkv, bkv).transpose(0, 2, 1, 3)


def _grid(bq, bkv, padded=PADDED):
    return np.meshgrid(np.arange(padded // bq), np.arange(padded // bkv), indexing="ij")


def _check_tpu(pattern, bq, bkv, length=LENGTH, padded=PADDED, quadrant_exact=False):
    dense, cfg = _truth(pattern, length, padded), _cfg(tpu, pattern, bq, bkv, length, padded)
    thr = jnp.int32(pattern.threshold)
    tiles = _tiles(dense, bq, bkv)
    rows_real = np.minimum(bq, np.maximum(0, length - bq * np.arange(padded // bq)))
    any_open = tiles.any((2, 3))
    all_open = np.array([[tiles[i, j, :rows_real[i]].all() for j in range(tiles.shape[1])]
                         for i in range(tiles.shape[0])])  # over the real query rows
    i, j = _grid(bq, bkv, padded)
    run, mask = (np.asarray(x) for x in tpu._block_status(cfg, thr, i, j, bq, bkv))
    assert not (any_open & ~run).any(), "an open tile is skipped"
    assert not (~mask & ~all_open).any(), "a tile with closed entries is not masked"
    name = pattern.kind if pattern.kind != "annealed" else f"annealed_r{float(pattern.threshold)}"
    if pattern.kind != "annealed" or int(pattern.threshold) in (0, FULL_THRESHOLD):
        np.testing.assert_array_equal(run, any_open, err_msg=f"{name}: skipping not maximal")
    if quadrant_exact and pattern.segment_ids is None:
        real = ((i + 1) * bq <= length) & ((j + 1) * bkv <= length)
        pure = _pure_tiles(pattern, bq, bkv, padded) & real
        if pattern.kind != "annealed" or int(pattern.threshold) in (0, FULL_THRESHOLD):
            np.testing.assert_array_equal(~mask[pure], all_open[pure])
    # DMA: a running step loads its own tile; a skipped one the tile already resident (the
    # previous step's) or, before the first running tile, that tile.
    _check_loads(np.asarray(tpu._kv_block(cfg, thr, i, j, bq, bkv)), run)
    i_t, j_t = np.meshgrid(np.arange(padded // bq), np.arange(padded // bkv), indexing="xy")
    loads_q = np.asarray(tpu._q_block(cfg, thr, i_t, j_t, bq, bkv))  # [nk, nq]
    _check_loads(loads_q, run.T)


def _check_loads(loads, run):
    for row_loads, row_run in zip(loads, run):
        used = np.flatnonzero(row_run)
        for step, (load, runs) in enumerate(zip(row_loads, row_run)):
            if runs:
                assert load == step
            elif used.size and used[0] < step:
                assert load == row_loads[step - 1]
            elif used.size:
                assert load == used[0]


def _pure_tiles(pattern, bq, bkv, padded):
    """Tiles inside one quadrant (noisy/clean queries x keys) of a two-stream pattern."""
    i, j = _grid(bq, bkv, padded)
    s = pattern.stream_len
    if not s:
        return np.ones(i.shape, bool)
    rows = (i * bq >= s) == ((i + 1) * bq - 1 >= s)
    cols = (j * bkv >= s) == ((j + 1) * bkv - 1 >= s)
    return rows & cols


CASES = [(n, s) for n in ("causal", "full", "annealed_r0", "annealed_r0.3", "annealed_r1")
         for s in (False, True)]
TILES = [(16, 8), (8, 16), (16, 16), (24, 8)]


@pytest.mark.parametrize("name,segmented", CASES)
@pytest.mark.parametrize("bq,bkv", TILES)
def test_tpu_block_status(name, segmented, bq, bkv):
    pattern = make_pattern(name, segment_ids(2, LENGTH) if segmented else None)
    _check_tpu(pattern, bq, bkv, quadrant_exact=True)
    if not segmented:
        dense, cfg = _truth(pattern), _cfg(tpu, pattern, bq, bkv)
        i, j = _grid(bq, bkv)
        _, mask = (np.asarray(x) for x in tpu._block_status(cfg, pattern.threshold, i, j, bq, bkv))
        if name in ("full", "annealed_r1"):  # the fast path wherever there is no padded key
            assert not mask[(j + 1) * bkv <= LENGTH].any()


# Block diffusion: one stream in blocks, and the two-stream [x_t ; x_0] input (stream 20, total
# 40) with blocks that divide the stream (1: autoregressive, 4, 5, 10, 20) and that do not (3, 6,
# 8, 32 > the stream).
BLOCKED = [(1, 0), (6, 0), (16, 0), (1, 20), (3, 20), (4, 20), (5, 20), (6, 20), (8, 20),
           (10, 20), (32, 20)]


@pytest.mark.parametrize("name", ["causal", "full", "annealed_r0", "annealed_r0.3",
                                  "annealed_r1"])
@pytest.mark.parametrize("block,stream", BLOCKED)
def test_tpu_block_status_blocked(name, block, stream):
    for bq, bkv in TILES:
        pattern = make_pattern(name).with_blocks(block, stream)
        _check_tpu(pattern, bq, bkv, quadrant_exact=True)
    segmented = make_pattern(name, segment_ids(2, LENGTH)).with_blocks(block, stream)
    _check_tpu(segmented, 16, 8)


@pytest.mark.parametrize("block,stream", [(4, 20), (6, 20), (6, 0)])
def test_tpu_block_status_unpadded_big_tiles(block, stream):
    # 40 = 2 x 20, no padding; tiles larger than the blocks and straddling the stream boundary.
    for bq, bkv in [(8, 8), (40, 8), (8, 40)]:
        _check_tpu(make_pattern("causal").with_blocks(block, stream), bq, bkv, padded=40)
        _check_tpu(make_pattern("full").with_blocks(block, stream), bq, bkv, padded=40)


def _check_gpu_ranges(pattern, bq, bkv):
    dense, cfg = _truth(pattern), _cfg(gpu, pattern, bq, bkv)
    thr = jnp.int32(pattern.threshold)
    exact = pattern.kind != "annealed" or int(pattern.threshold) in (0, FULL_THRESHOLD)
    nk, nq = -(-LENGTH // bkv), -(-LENGTH // bq)
    for i in range(nq):
        rows = dense[i * bq:min((i + 1) * bq, LENGTH)]
        seen = np.zeros(nk, int)
        for lo, hi, masked in gpu._kv_ranges(cfg, thr, i, bq, bkv):
            seen[int(lo):int(hi)] += 1
            if not masked:
                assert rows[:, int(lo) * bkv:int(hi) * bkv].all()
        assert seen.max() <= 1, "a kv block is visited twice"
        open_blocks = rows[:, :nk * bkv].reshape(len(rows), nk, bkv).any((0, 2))
        assert not (open_blocks & (seen == 0)).any(), "an open kv block is not visited"
        if exact and pattern.block_size and pattern.segment_ids is None:
            np.testing.assert_array_equal(seen == 1, open_blocks)
    for j in range(nk):
        cols = dense[:LENGTH, j * bkv:(j + 1) * bkv]
        seen = np.zeros(nq, int)
        for lo, hi, masked in gpu._q_ranges(cfg, thr, j, bq, bkv):
            seen[int(lo):int(hi)] += 1
            if not masked:
                assert cols[int(lo) * bq:int(hi) * bq].all()
        assert seen.max() <= 1, "a q block is visited twice"
        padded_cols = np.zeros((nq * bq, bkv), bool)
        padded_cols[:LENGTH] = cols
        open_blocks = padded_cols.reshape(nq, bq, bkv).any((1, 2))
        assert not (open_blocks & (seen == 0)).any(), "an open q block is not visited"


@pytest.mark.parametrize("name,segmented", CASES)
def test_gpu_loop_ranges(name, segmented):
    pattern = make_pattern(name, segment_ids(2, LENGTH) if segmented else None)
    _check_gpu_ranges(pattern, 16, 8)
    if name in ("causal", "annealed_r0") and not segmented:
        dense, cfg = _truth(pattern), _cfg(gpu, pattern, 16, 8)
        for j in range(LENGTH // 8):  # dk/dv starts at the first useful q block
            lo = int(gpu._q_ranges(cfg, pattern.threshold, j, 16, 8)[0][0])
            assert dense[lo * 16:(lo + 1) * 16, j * 8:(j + 1) * 8].any()


@pytest.mark.parametrize("block,stream", BLOCKED)
def test_gpu_loop_ranges_blocked(block, stream):
    for name in ("causal", "full", "annealed_r0.3"):
        for bq, bkv in [(16, 8), (8, 16)]:
            _check_gpu_ranges(make_pattern(name).with_blocks(block, stream), bq, bkv)
