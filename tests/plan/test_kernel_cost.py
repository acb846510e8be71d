"""Pallas kernels charged from a roofline of their blocks. References: the FLOPs and HBM bytes of
each attention pass written out by hand from the shapes and block sizes of a small case (and the
FLOPs against the kernels' own ``pl.CostEstimate``), for the splash kernels and the diffujax
kernels as the real TPU compiler (libtpu, deviceless) compiles them for one v5p chip."""

import jax
import jax.numpy as jnp
import pytest

from diffujax.attention.config import TpuBlockSizes
from diffujax.attention.pattern import AttentionPattern
from diffujax.attention.splash import splash_attention
from diffujax.attention.tpu import flash_attention
from diffujax.parallel.topology import parse_slice, slice_devices
from diffujax.plan import estimate, hlo
from diffujax.plan.analysis import _no_persistent_cache

B, L, H, KVH, D = 1, 512, 4, 2, 128  # bf16: 2 bytes
ELEM = 2


def _kernels(attend) -> dict:
    """The kernel calls of the gradient of ``sum(attend(q, k, v))`` compiled for one v5p chip,
    by pass (fwd, dq, dkv)."""
    device = slice_devices(parse_slice("v5p-8"))[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    q = jax.ShapeDtypeStruct((B, L, H, D), jnp.bfloat16, sharding=sharding)
    kv = jax.ShapeDtypeStruct((B, L, KVH, D), jnp.bfloat16, sharding=sharding)

    def loss(q, k, v):
        return attend(q, k, v).astype(jnp.float32).sum()

    with _no_persistent_cache():
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile().as_text()
    calls = hlo.estimated_cycles(text).kernels
    return {p: next(c for c in calls if p in c.name) for p in ("dkv", "dq", "fwd")}


def _cost(call) -> tuple[float, float]:
    summary = estimate.kernel_summary(call)
    return summary["flops"], summary["bytes"]


def _seconds(flops, moved):
    v5p = parse_slice("v5p-8").generation
    peak = 459e12  # v5p bf16 per chip (Cloud TPU v5p page)
    return max(flops / peak, moved / v5p.hbm_bandwidth)


def test_diffujax_kernels_from_their_blocks():
    blocks = TpuBlockSizes(block_q=256, block_kv=128, block_q_bwd=128, block_kv_bwd=256)
    pattern = AttentionPattern("annealed", seed=1, step=3, threshold=1 << 20)
    calls = _kernels(lambda q, k, v: flash_attention(q, k, v, pattern, block_sizes=blocks))
    q_bytes, kv_bytes = B * H * L * D * ELEM, B * KVH * L * D * ELEM
    lse_bytes = B * H * L * 4  # one f32 per query row ([B, H, 1, L])

    fwd = calls["fwd"]
    assert fwd.metadata == {"block_q": 256, "block_kv": 128}
    flops, moved = _cost(fwd)
    assert flops == 4 * B * H * L * L * D == fwd.declared["flops"]
    # q read and o / lse written once; k and v streamed once per (query head, q block of 256).
    assert moved == q_bytes + q_bytes + lse_bytes + 2 * kv_bytes * (H // KVH) * (L // 256)
    assert estimate.kernel_summary(fwd)["steps"] == B * H * (L // 256) * (L // 128)

    dq = calls["dq"]
    flops, moved = _cost(dq)
    assert flops == 6 * B * H * L * L * D == dq.declared["flops"]
    # q, do, lse, delta in and dq out once; k, v once per (query head, q block of 128).
    assert moved == 3 * q_bytes + 2 * lse_bytes + 2 * kv_bytes * (H // KVH) * (L // 128)

    dkv = calls["dkv"]
    flops, moved = _cost(dkv)
    assert flops == 8 * B * H * L * L * D == dkv.declared["flops"]
    # k, v in and dk, dv out once; q, do, lse, delta once per kv block of 256.
    assert moved == 4 * kv_bytes + (2 * q_bytes + 2 * lse_bytes) * (L // 256)

    summaries = [estimate.kernel_summary(c) for c in calls.values()]
    seconds = estimate.kernel_seconds(summaries, parse_slice("v5p-8").generation, 459e12)
    assert seconds == pytest.approx(sum(_seconds(s["flops"], s["bytes"]) for s in summaries))


def test_splash_kernels_from_their_blocks():
    # splash runs per example on [H, L, D] with as many K/V heads as query heads here.
    def attend(q, k, v):
        rep = lambda x: jnp.repeat(x, H // KVH, axis=2)
        return splash_attention(q, rep(k), rep(v), AttentionPattern("full"), block=256)

    calls = _kernels(attend)
    assert calls["fwd"].metadata["block_q"] == 256 and calls["dq"].metadata["block_kv_dq"] == 256
    q_bytes = B * H * L * D * ELEM
    flops, moved = _cost(calls["fwd"])
    assert flops == 4 * B * H * L * L * D
    # o (bf16) and the row statistics (f32, 128 lanes per row: [H, L, 128]) written once, q read
    # once, k and v (H heads now) streamed once per q block of 256.
    outputs = q_bytes + H * L * 128 * 4
    assert moved == q_bytes + outputs + 2 * q_bytes * (L // 256)
    assert estimate.kernel_summary(calls["fwd"])["steps"] == H * (L // 256) ** 2
    assert _cost(calls["dq"])[0] == 6 * B * H * L * L * D
    assert _cost(calls["dkv"])[0] == 8 * B * H * L * L * D
