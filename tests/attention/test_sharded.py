"""Kernels on a mesh: ``attention()`` runs them under ``shard_map`` (batch over data x fsdp, heads
over tensor), interpret mode on the 8 simulated CPU devices, against the unsharded reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as PS

from attn_testlib import (make_inputs, make_pattern, out_and_grads, segment_ids,
                          two_stream_segment_ids)
from diffujax.attention import AttentionConfig, TpuBlockSizes, attention, reference_attention
from diffujax.attention.sharded import kernel_layout
from diffujax.parallel.mesh import Layout

SMALL = TpuBlockSizes(16, 16, 16, 16)


def _mesh(data, fsdp, tensor):
    return jax.make_mesh((data, fsdp, tensor), ("data", "fsdp", "tensor"),
                         axis_types=(AxisType.Auto,) * 3, devices=jax.devices()[:data * fsdp * tensor])


def _sharded_vs_reference(mesh, config, pattern, q, k, v, do, atol=3e-5):
    fn = lambda q, k, v, p: attention(q, k, v, p, config)  # noqa: E731
    with Layout(mesh).active():
        heads = NamedSharding(mesh, PS(("data", "fsdp"), None, "tensor", None))
        batch = NamedSharding(mesh, PS(("data", "fsdp")))
        args = [jax.device_put(x, heads if x.shape[2] % 2 == 0 else batch)
                for x in (q, k, v, do)]
        got = out_and_grads(fn, pattern, *args[:3], args[3])
        text = jax.jit(fn).lower(*args[:3], pattern).as_text()
    want = out_and_grads(reference_attention, pattern, q, k, v, do)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=1e-5,
                                   err_msg=name)
    return text


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa_kv_sharded", "mqa_kv_repeated"])
def test_pallas_tpu_under_shard_map(kv_heads):
    # 4 query heads on tensor=2: 2 K/V heads split 1 per device; 1 K/V head is repeated to 2.
    mesh = _mesh(2, 2, 2)
    b, length = 4, 40
    q, k, v, do = make_inputs(b, length, 4, kv_heads, 8, seed=7)
    pattern = make_pattern("annealed_r0.3", segment_ids(b, length))
    config = AttentionConfig(backend="pallas_tpu", interpret=True, tpu_block_sizes=SMALL)
    text = _sharded_vs_reference(mesh, config, pattern, q, k, v, do)
    assert "shard_map" in text or "sdy.manual_computation" in text


def test_pallas_tpu_two_stream_blocks_under_shard_map():
    # The static block fields and the scalars both survive the map's rebuild of the pattern.
    mesh = _mesh(2, 2, 2)
    b, stream = 4, 20
    q, k, v, do = make_inputs(b, 2 * stream, 4, 2, 8, seed=11)
    pattern = make_pattern("annealed_r0.3", two_stream_segment_ids(b, stream)).with_blocks(6, stream)
    config = AttentionConfig(backend="pallas_tpu", interpret=True, tpu_block_sizes=SMALL)
    _sharded_vs_reference(mesh, config, pattern, q, k, v, do)


def test_replicated_when_nothing_divides():
    # Batch 3 on data x fsdp = 4 and 3 heads on tensor = 2: every device computes the whole call;
    # the gradients must not be summed over the replicas.
    mesh = _mesh(2, 2, 2)
    q, k, v, do = make_inputs(3, 24, 3, 1, 8, seed=10)
    config = AttentionConfig(backend="pallas_tpu", interpret=True, tpu_block_sizes=SMALL)
    fn = lambda q, k, v, p: attention(q, k, v, p, config)  # noqa: E731
    pattern = make_pattern("causal")
    with Layout(mesh).active():
        got = out_and_grads(fn, pattern, q, k, v, do)
    want = out_and_grads(reference_attention, pattern, q, k, v, do)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=3e-5, rtol=1e-5,
                                   err_msg=name)


def test_splash_multi_head_form_under_shard_map():
    mesh = _mesh(2, 1, 2)
    b, length = 2, 256
    q, k, v, do = make_inputs(b, length, 4, 2, 16, seed=8)
    config = AttentionConfig(backend="splash", interpret=True, splash_block=128)
    _sharded_vs_reference(mesh, config, make_pattern("causal", segment_ids(b, length)),
                          q, k, v, do)


def test_splash_two_stream_blocks_under_shard_map():
    mesh = _mesh(2, 1, 2)
    b, stream = 2, 128
    q, k, v, do = make_inputs(b, 2 * stream, 4, 2, 16, seed=12)
    pattern = make_pattern("full", two_stream_segment_ids(b, stream)).with_blocks(48, stream)
    config = AttentionConfig(backend="splash", interpret=True, splash_block=128)
    _sharded_vs_reference(mesh, config, pattern, q, k, v, do)


def test_pallas_gpu_under_shard_map():
    mesh = _mesh(2, 1, 2)
    b, length = 2, 32
    q, k, v, do = make_inputs(b, length, 2, 2, 16, seed=9)
    config = AttentionConfig(backend="pallas_gpu", interpret=True)
    _sharded_vs_reference(mesh, config, make_pattern("full"), q, k, v, do)


def test_layout_rules():
    sd = jax.ShapeDtypeStruct
    qkv = lambda b, h, kvh: (sd((b, 64, h, 8), jnp.float32), sd((b, 64, kvh, 8), jnp.float32))
    with jax.set_mesh(_mesh(2, 2, 2)):
        lay = kernel_layout(*qkv(4, 8, 2))
        assert (lay.batch, lay.heads, lay.kv_repeat) == (("data", "fsdp"), ("tensor",), 1)
        assert kernel_layout(*qkv(4, 8, 1)).kv_repeat == 2  # MQA on tensor=2
        lay = kernel_layout(*qkv(3, 3, 1))  # nothing divides: every device computes everything
        assert (lay.batch, lay.heads, lay.axes) == ((), (), ("data", "fsdp", "tensor"))
        # A rule table that puts the batch on data only leaves fsdp replicated.
        lay = kernel_layout(*qkv(4, 8, 8), rules=(("activation_batch", "data"),
                                                        ("activation_heads", "tensor")))
        assert (lay.batch, lay.heads) == (("data",), ("tensor",))
    with jax.set_mesh(_mesh(1, 1, 1)):
        assert kernel_layout(*qkv(4, 8, 2)) is None  # one device: the kernel is called directly
    assert kernel_layout(*qkv(4, 8, 2)) is None  # no mesh
