"""Pallas TPU flash attention (interpret mode on CPU) against the XLA reference with the dense mask."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attn_testlib import (BLOCKED_CASES, PATTERN_NAMES, blocked_pattern, check_against_reference,
                          make_inputs, make_pattern, mask_reader, segment_ids)
from diffujax.attention import AttentionConfig, attention
from diffujax.attention.pattern import (AttentionPattern, annealed, causal, dense_mask,
                                        for_training, full)
from diffujax.attention import tpu
from diffujax.attention.reference import reference_attention

SMALL = tpu.BlockSizes(16, 16, 16, 8)  # forward 16x16, backward 16x8


def kernel(block_sizes=SMALL, interpret=True):
    return functools.partial(tpu.flash_attention, block_sizes=block_sizes, interpret=interpret)


@pytest.mark.parametrize("segmented", [False, True], ids=["plain", "segments"])
@pytest.mark.parametrize("name", PATTERN_NAMES)
def test_matches_reference_padded_gqa(name, segmented):
    # L = 40 is not a multiple of the blocks (padded to 48); 4 query heads share 2 K/V heads.
    b, length = 2, 40
    q, k, v, do = make_inputs(b, length, 4, 2, 16)
    pattern = make_pattern(name, segment_ids(b, length) if segmented else None)
    check_against_reference(kernel(), pattern, q, k, v, do)


@pytest.mark.parametrize("case", BLOCKED_CASES, ids=[c[0] for c in BLOCKED_CASES])
def test_block_diffusion_patterns_match_reference(case):
    # Length 40 (two streams of 20), padded to 48; tiles of 16 (backward 16 x 8) straddle the
    # blocks and the boundary between the streams.
    b, length = 2, 40
    q, k, v, do = make_inputs(b, length, 4, 2, 16, seed=6)
    check_against_reference(kernel(), blocked_pattern(case, b, length), q, k, v, do)


def test_block_diffusion_masks_in_kernel_are_the_dense_masks():
    read = mask_reader(kernel(tpu.BlockSizes(8, 16, 16, 8)))
    for name, block, stream in [("causal", 6, 24), ("full", 16, 24), ("annealed_r0.5", 6, 24),
                                ("full", 5, 0)]:
        pattern = make_pattern(name).with_blocks(block, stream)
        np.testing.assert_array_equal(read(pattern, 48)[0], np.asarray(dense_mask(pattern, 48)),
                                      err_msg=f"{name} {block} {stream}")


def test_two_stream_length_is_checked():
    q, k, v, _ = make_inputs(1, 40, 2, 1, 8)
    with pytest.raises(ValueError, match="needs length 48, got 40"):
        tpu.flash_attention(q, k, v, full().with_blocks(8, 24), interpret=True)


@pytest.mark.parametrize("blocks", [tpu.BlockSizes(16, 16, 16, 16), tpu.BlockSizes(32, 16, 8, 32),
                                    tpu.BlockSizes(64, 64, 64, 64)],
                         ids=["16x16", "32x16_bwd8x32", "one_block"])
def test_block_sizes_exact_multiple(blocks):
    b, length = 1, 64
    q, k, v, do = make_inputs(b, length, 2, 1, 8, seed=1)
    pattern = make_pattern("annealed_r0.3", segment_ids(b, length))
    check_against_reference(kernel(blocks), pattern, q, k, v, do)


def test_bf16_matches_reference():
    q, k, v, do = make_inputs(1, 48, 2, 2, 16, dtype=jnp.bfloat16, seed=2)
    check_against_reference(kernel(), make_pattern("annealed_r0.3"), q, k, v, do,
                            atol=3e-2, rtol=3e-2)


def test_in_kernel_hash_is_the_dense_pattern_and_scalars_do_not_recompile():
    length = 48
    traces = []

    def fn(q, k, v, p):
        traces.append(1)
        return tpu.flash_attention(q, k, v, p, block_sizes=SMALL, interpret=True)

    read = mask_reader(fn)
    seg = segment_ids(2, length)
    for seed, step, ratio in [(0, 0, 0.5), (1, 7, 0.5), (123, 99, 0.2), (5, 5, 0.9)]:
        pattern = annealed(seed, step, ratio, seg)
        np.testing.assert_array_equal(read(pattern, length, batch=2),
                                      np.asarray(dense_mask(pattern, length)))
    # One trace served every (seed, step, ratio): they are runtime (SMEM) scalars.
    assert len(traces) == 1
    for name in ("causal", "full"):
        pattern = make_pattern(name)
        np.testing.assert_array_equal(read(pattern, length)[0],
                                      np.asarray(dense_mask(pattern, length)))


def test_tpu_semantics_interpreter():
    # pltpu.InterpretParams: simulated VMEM/SMEM, uninitialised memory is NaN, two cores take the
    # "parallel" grid axes in random order: catches missing scratch init and cross-core races.
    # (Slow: ~20 s for this tiny case, hence a single test.)
    params = pltpu.InterpretParams(num_cores_or_threads=2, random_seed=0, detect_races=True)
    q, k, v, do = make_inputs(1, 16, 2, 1, 8, seed=3)
    pattern = make_pattern("annealed_r0.3", segment_ids(1, 16))
    check_against_reference(kernel(tpu.BlockSizes(8, 8, 8, 8), params), pattern, q, k, v, do)


def test_training_step_through_dispatch():
    """Loss and parameter gradients of a tiny attention layer: kernel (interpret) == reference."""
    b, length, dm, h, kvh, d = 2, 40, 32, 4, 2, 8
    kx, kp = jax.random.split(jax.random.PRNGKey(4))
    x = jax.random.normal(kx, (b, length, dm))
    ks = jax.random.split(kp, 4)
    params = dict(wq=jax.random.normal(ks[0], (dm, h * d)) / dm ** 0.5,
                  wk=jax.random.normal(ks[1], (dm, kvh * d)) / dm ** 0.5,
                  wv=jax.random.normal(ks[2], (dm, kvh * d)) / dm ** 0.5,
                  wo=jax.random.normal(ks[3], (h * d, dm)) / (h * d) ** 0.5)

    def loss(params, x, pattern, config: AttentionConfig):
        q = (x @ params["wq"]).reshape(b, length, h, d)
        k = (x @ params["wk"]).reshape(b, length, kvh, d)
        v = (x @ params["wv"]).reshape(b, length, kvh, d)
        o = attention(q, k, v, pattern, config).reshape(b, length, h * d)
        return jnp.mean((o @ params["wo"] - x) ** 2)

    pattern = for_training(jnp.int32(30), anneal_steps=100, seed=3,
                           segment_ids=segment_ids(b, length))
    kernel_cfg = AttentionConfig(backend="pallas_tpu", interpret=True, tpu_block_sizes=SMALL)
    got = jax.jit(jax.value_and_grad(loss), static_argnums=3)(params, x, pattern, kernel_cfg)
    want = jax.jit(jax.value_and_grad(loss), static_argnums=3)(params, x, pattern,
                                                              AttentionConfig(backend="xla"))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for name in params:
        np.testing.assert_allclose(got[1][name], want[1][name], atol=1e-5, rtol=1e-4,
                                   err_msg=name)


def test_layout_padding_rules():
    assert tpu._layout(40, (16, 16, 16, 8)) == (48, (16, 16, 16, 8))
    assert tpu._layout(1000, (512, 512, 512, 256)) == (1024, (512, 512, 512, 256))
    assert tpu._layout(4096, (1024, 512, 512, 512)) == (4096, (1024, 512, 512, 512))
    # Short sequences: blocks shrink to the 8-aligned length (a whole-axis block).
    assert tpu._layout(100, (512, 512, 512, 256)) == (104, (104, 104, 104, 104))
    assert tpu._layout(300, (128, 512, 128, 128)) == (304, (304, 304, 304, 304))
    with pytest.raises(ValueError, match="multiples of 8"):
        tpu._layout(64, (12, 16, 16, 16))


def test_rejects_bad_shapes():
    q, k, v, _ = make_inputs(1, 16, 3, 2, 8)
    with pytest.raises(ValueError, match="multiple"):
        tpu.flash_attention(q, k, v, causal(), interpret=True)
    q, k, v, _ = make_inputs(1, 16, 2, 1, 8)
    with pytest.raises(ValueError, match="self-attention"):
        tpu.flash_attention(q, k[:, :8], v[:, :8], causal(), interpret=True)


def test_default_block_sizes_per_chip():
    # JAX's device kinds -> the table measured by benchmarks/tpu_block_sizes.py.
    assert tpu.default_block_sizes("TPU v5 lite") is tpu._DEFAULTS["v5e"]
    assert tpu.default_block_sizes("TPU v5") is tpu._DEFAULTS["v5p"]
    assert tpu.default_block_sizes("TPU v5p") is tpu._DEFAULTS["v5p"]
    assert tpu.default_block_sizes("TPU v6 lite") is tpu._DEFAULTS["v6e"]
    assert tpu.default_block_sizes("TPU v4") is tpu._DEFAULTS["v4"]
    assert tpu.default_block_sizes("cpu") == tpu.BlockSizes()
    for kind in ("TPU v4", "TPU v5 lite", "TPU v5p", "TPU v6 lite", "cpu"):
        bs = tpu.default_block_sizes(kind)
        assert all(x % 128 == 0 for x in (bs.block_q, bs.block_kv, *bs.bwd()))
    # Short sequences shrink the large defaults to one block; long ones tile exactly.
    blocks = tpu._DEFAULTS["v6e"]
    assert tpu._layout(1024, (blocks.block_q, blocks.block_kv, *blocks.bwd()))[0] == 1024
    assert tpu._layout(8192, (blocks.block_q, blocks.block_kv, *blocks.bwd()))[0] == 8192


def test_inside_shard_map():
    """Data-parallel use under ``jax.shard_map``. Interpret mode needs ``check_vma=False`` (JAX's
    interpreter slices varying operands with unvarying grid indices); compiled kernels declare
    their outputs' varying axes (``_vma.py``)."""
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (tests/conftest.py simulates 8 CPU devices)")
    from jax.sharding import PartitionSpec as PS
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:2])
    b, length = 2, 24
    q, k, v, do = make_inputs(b, length, 2, 1, 8, seed=5)
    seg = segment_ids(b, length)

    def local(q, k, v, seg, scalars):
        pattern = AttentionPattern("annealed", scalars[0], scalars[1], scalars[2], seg)
        return tpu.flash_attention(q, k, v, pattern, block_sizes=SMALL, interpret=True)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(PS("data"),) * 4 + (PS(),),
                            out_specs=PS("data"), check_vma=False)
    pattern = annealed(3, 4, 0.3, seg)
    scalars = tpu.pattern_scalars(pattern)
    got = jax.jit(jax.grad(lambda q, k, v: jnp.sum(sharded(q, k, v, seg, scalars) * do),
                           argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(lambda q, k, v: jnp.sum(reference_attention(q, k, v, pattern) * do),
                    argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=3e-5, rtol=1e-5)
