"""Block classification (skip / unmasked / masked) against the dense pattern, kernel by kernel.

A skipped block must be entirely closed and an unmasked one entirely open; for causal and
annealed-at-ratio-0 patterns the skipping must also be maximal (every fully closed block of the
future is skipped). Pure index arithmetic: no kernel runs here.
"""

import numpy as np
import pytest

from attn_testlib import make_pattern, segment_ids
from diffujax.attention import gpu, tpu, pattern as P

LENGTH, PADDED = 40, 48


def _truth(pattern):
    dense = np.zeros((PADDED, PADDED), bool)
    mask = np.asarray(P.dense_mask(pattern, LENGTH))
    dense[:LENGTH, :LENGTH] = mask if mask.ndim == 2 else mask.any(0)
    return dense


def _cfg(module, pattern, bq, bkv):
    common = dict(kind=pattern.kind, segmented=pattern.segment_ids is not None, seq_len=LENGTH,
                  padded_len=PADDED, bq=bq, bkv=bkv, bq_bwd=bq, bkv_bwd=bkv, scale=1.0,
                  groups=1, interpret=True)
    if module is tpu:
        return tpu._Cfg(**common, vmem_limit_bytes=None)
    return gpu._Cfg(**common, f32=True, num_warps=4, num_stages=1)


CASES = [(n, s) for n in ("causal", "full", "annealed_r0", "annealed_r0.3", "annealed_r1")
         for s in (False, True)]


@pytest.mark.parametrize("name,segmented", CASES)
@pytest.mark.parametrize("bq,bkv", [(16, 8), (8, 16), (16, 16)])
def test_tpu_block_status(name, segmented, bq, bkv):
    pattern = make_pattern(name, segment_ids(2, LENGTH) if segmented else None)
    dense, cfg = _truth(pattern), _cfg(tpu, pattern, bq, bkv)
    thr = int(pattern.threshold)
    for i in range(PADDED // bq):
        for j in range(PADDED // bkv):
            block = dense[i * bq:(i + 1) * bq, j * bkv:(j + 1) * bkv]
            real_rows = block[: max(0, min(bq, LENGTH - i * bq))]
            run, mask = (bool(x) for x in tpu._block_status(cfg, thr, i, j, bq, bkv))
            if not run:
                assert not block.any(), (i, j)
            elif not mask:
                assert real_rows.all(), (i, j)
            if name in ("causal", "annealed_r0") and not segmented and real_rows.size:
                assert run == bool(real_rows.any()), (i, j)  # maximal skipping
            if name in ("full", "annealed_r1") and not segmented and (j + 1) * bkv <= LENGTH:
                assert not mask, (i, j)  # the fast path is taken wherever it can be


@pytest.mark.parametrize("name,segmented", CASES)
def test_gpu_loop_ranges(name, segmented):
    bq, bkv = 16, 8
    pattern = make_pattern(name, segment_ids(2, LENGTH) if segmented else None)
    dense, cfg = _truth(pattern), _cfg(gpu, pattern, bq, bkv)
    thr = int(pattern.threshold)
    for i in range(-(-LENGTH // bq)):
        split, hi = (int(x) for x in gpu._kv_range(cfg, thr, i, bq, bkv))
        rows = dense[i * bq:min((i + 1) * bq, LENGTH)]
        assert rows[:, :split * bkv].all()
        assert not rows[:, hi * bkv:].any()
    for j in range(-(-LENGTH // bkv)):
        lo, split, nq = (int(x) for x in gpu._q_range(cfg, thr, j, bq, bkv))
        cols = dense[:LENGTH, j * bkv:(j + 1) * bkv]
        assert not cols[:lo * bq].any()
        assert cols[split * bq:].all()
        if name in ("causal", "annealed_r0") and not segmented:
            assert cols[lo * bq:(lo + 1) * bq].any()  # starts at the first useful q block
