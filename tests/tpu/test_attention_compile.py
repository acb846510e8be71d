"""The attention kernels compiled by the real TPU compiler for 4-chip v5e / v5p slices, under the
``shard_map`` that ``attention()`` wraps them in (batch over data x fsdp, heads over tensor), with
the per-chip default block sizes. Each case is forward + backward (``jax.value_and_grad``).

Cases cover every value at least once, not the cross product: patterns causal / full / annealed,
with and without segment ids, MHA / GQA / MQA (K/V repeated up to the tensor axis), L = 2048 and
8192, head_dim 64 and 128, both chips; splash for causal and full. Block diffusion: the
two-stream ``[x_t ; x_0]`` pattern (docs/algorithms.md §9), annealed inside blocks on the Pallas
kernel (blocks of 96, which divide neither the stream nor the tiles) and full inside blocks on
splash (its in-kernel ``BlockMask``), both picked by ``auto``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from diffujax.attention import AttentionConfig, AttentionPattern, attention, resolve_backend, tpu
from diffujax.attention.sharded import target_device
from diffujax.parallel.mesh import Layout

from tpu_testlib import collectives, hbm_bytes, mesh

BATCH, HEADS = 4, 8

# chip, backend, pattern, segments, kv_heads, L, head_dim
CASES = {
    "v5p-pallas-causal-gqa-L2048-D128": ("v5p", "pallas_tpu", "causal", False, 2, 2048, 128),
    "v5e-pallas-annealed-seg-mqa-L8192-D64": ("v5e", "auto", "annealed", True, 1, 8192, 64),
    "v5p-pallas-full-seg-mha-L2048-D64": ("v5p", "pallas_tpu", "full", True, 8, 2048, 64),
    "v5e-splash-causal-gqa-L2048-D128": ("v5e", "auto", "causal", False, 2, 2048, 128),
    "v5p-splash-full-seg-mha-L2048-D128": ("v5p", "splash", "full", True, 8, 2048, 128),
    "v5p-pallas-two-stream-annealed-seg-gqa-L4096-D128": ("v5p", "auto", "annealed", True, 2, 4096,
                                                          128),
    "v5e-splash-two-stream-full-seg-mha-L2048-D128": ("v5e", "auto", "full", True, 8, 2048, 128),
}
# case -> (block_size, stream_len) of its block-diffusion pattern
BLOCKS = {"v5p-pallas-two-stream-annealed-seg-gqa-L4096-D128": (96, 2048),
          "v5e-splash-two-stream-full-seg-mha-L2048-D128": (32, 1024)}


def _abstract_inputs(m, kind, segments, kv_heads, length, dim, blocks=(0, 0)):
    sd = jax.ShapeDtypeStruct
    heads = NamedSharding(m, P(("data", "fsdp"), None, "tensor", None))
    batch = NamedSharding(m, P(("data", "fsdp")))
    kv_sharding = heads if kv_heads % m.shape["tensor"] == 0 else batch
    q = sd((BATCH, length, HEADS, dim), jnp.bfloat16, sharding=heads)
    k = sd((BATCH, length, kv_heads, dim), jnp.bfloat16, sharding=kv_sharding)
    scalar = sd((), jnp.int32)
    seg = sd((BATCH, length), jnp.int32, sharding=batch) if segments else None
    pattern = AttentionPattern(kind, scalar, scalar, scalar, seg).with_blocks(*blocks)
    return q, k, k, pattern


def _compile_fwd_bwd(m, config, args):
    def loss(q, k, v, pattern):
        return attention(q, k, v, pattern, config).astype(jnp.float32).sum()

    with Layout(m).active():
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile()


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_compiles_sharded(case):
    chip, backend, kind, segments, kv_heads, length, dim = CASES[case]
    m = mesh(chip)
    args = _abstract_inputs(m, kind, segments, kv_heads, length, dim, BLOCKS.get(case, (0, 0)))
    config = AttentionConfig(backend=backend)
    with jax.set_mesh(m):
        chosen = resolve_backend(args[0], args[1], args[3], config)
    assert chosen == ("splash" if "splash" in case else "pallas_tpu")
    start = time.perf_counter()
    compiled = _compile_fwd_bwd(m, config, args)
    seconds = time.perf_counter() - start
    hlo = compiled.as_text()
    # Three Mosaic kernels (forward, dq, dk/dv) in the optimized program.
    assert hlo.count('custom_call_target="tpu_custom_call"') == 3, case
    # q/k/v arrive in the kernel's layout: nothing is gathered, nothing moves but the loss.
    # Only MQA's repeated K/V heads have their gradient copies summed across the tensor axis.
    found = collectives(hlo)
    if kv_heads % m.shape["tensor"] == 0:
        assert found == {}, found
    else:
        assert list(found) == ["all-reduce"], found
    mem = compiled.memory_analysis()
    per_device_scores = (BATCH // 2) * (HEADS // 2) * length * length * 4  # one f32 L x L
    assert mem.temp_size_in_bytes < per_device_scores / 4, (case, mem)  # flash: no L^2 tensor
    total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    assert total < hbm_bytes(chip)
    print(f"{case}: compiled in {seconds:.1f} s, temp {mem.temp_size_in_bytes / 2**20:.1f} MiB")


def test_auto_backend_and_block_sizes_follow_the_mesh():
    """Compiling for a TPU slice on a CPU host: ``auto`` and the default block sizes come from
    the mesh's chips, not from the host."""
    sd = jax.ShapeDtypeStruct
    q = sd((BATCH, 2048, HEADS, 128), jnp.bfloat16)
    causal, annealed = AttentionPattern("causal"), AttentionPattern("annealed")
    blocks = AttentionPattern("full").with_blocks(32, 1024)
    odd = sd((BATCH, 2 * 1000, HEADS, 128), jnp.bfloat16)
    for chip, kind in (("v5e", "TPU v5 lite"), ("v5p", "TPU v5")):
        with jax.set_mesh(mesh(chip)):
            assert target_device() == ("tpu", kind)
            assert resolve_backend(q, q, causal) == "splash"
            assert resolve_backend(q, q, annealed) == "pallas_tpu"
            # Block diffusion: splash has a static mask for causal/full inside blocks only.
            assert resolve_backend(q, q, blocks) == "splash"
            assert resolve_backend(q, q, annealed.with_blocks(32, 1024)) == "pallas_tpu"
            assert resolve_backend(odd, odd, blocks.with_blocks(32, 1000)) == "pallas_tpu"
    assert target_device()[0] == "cpu"
    assert resolve_backend(q, q, causal) == "xla"


def test_regression_bare_kernel_cannot_be_partitioned():
    """The failure the shard_map wrapper removes: a Mosaic kernel called straight inside an
    auto-sharded jit (as the models did) does not lower; through ``attention()`` it compiles."""
    m = mesh("v5p")
    args = _abstract_inputs(m, "causal", False, 8, 512, 128)
    bare = lambda q, k, v, p: tpu.flash_attention(q, k, v, p, block_sizes=tpu.BlockSizes())  # noqa
    with Layout(m).active():
        with pytest.raises(NotImplementedError, match="cannot be automatically partitioned"):
            jax.jit(bare).lower(*args)
        fixed = lambda q, k, v, p: attention(q, k, v, p, AttentionConfig(backend="pallas_tpu"))  # noqa
        hlo = jax.jit(fixed).lower(*args).compile().as_text()
    assert hlo.count('custom_call_target="tpu_custom_call"') == 1
