"""Mesh construction, shardings from logical axes, global batches, sharded initialisation."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from diffujax.config import MeshSection, MeshShape
from diffujax.models import LlamaConfig, init_params, sharded_init
from diffujax.parallel.mesh import (Layout, make_layout, make_mesh, maybe_initialize_distributed,
                                    resolve_shape)

TINY = LlamaConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                   intermediate_size=64)


def test_resolve_shape():
    assert resolve_shape(MeshShape(1, -1, 2), 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert resolve_shape(MeshShape(-1, 1, 1), 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="needs 4 devices"):
        resolve_shape(MeshShape(2, 2, 1), 8)
    with pytest.raises(ValueError, match="not a multiple of 3"):
        resolve_shape(MeshShape(3, -1, 1), 8)


def test_make_mesh_has_auto_axes():
    mesh = make_mesh(MeshSection(shape=MeshShape(2, -1, 2)))
    assert dict(zip(mesh.axis_names, mesh.axis_sizes)) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    single = make_mesh(MeshSection(), jax.devices()[:1])
    assert single.axis_sizes == (1, 1, 1)


def test_a_mesh_that_does_not_tile_the_tpu_torus_is_one_line():
    """On v5p-128 (a 4x4x4 torus, the real TPU topology, deviceless) an axis of 8 is no product
    of the torus's sides: a ValueError naming mesh.shape, not jax's NotImplementedError."""
    from jax.experimental import topologies

    torus = topologies.get_topology_desc(platform="tpu", topology_name="v5p:4x4x4",
                                         chip_config_name="megacore",
                                         chips_per_host_bounds=(2, 2, 1)).devices
    with pytest.raises(ValueError, match=r"mesh.shape \{'data': 8, 'fsdp': 8, 'tensor': 1\} does"
                                         r" not tile .* \(Failed to find assignment.*\[4, 4, 4\]\)$"):
        make_mesh(MeshSection(shape=MeshShape(data=8, fsdp=-1, tensor=1)), torus)
    mesh = make_mesh(MeshSection(shape=MeshShape(data=4, fsdp=-1, tensor=1)), torus)
    assert mesh.axis_sizes == (4, 16, 1)


def test_spec_skips_axes_that_do_not_divide():
    mesh = make_mesh(MeshSection(shape=MeshShape(1, 4, 2)))
    layout = Layout(mesh)
    assert layout.spec(("vocab", "embed"), (64, 32)) == P("tensor", "fsdp")
    assert layout.spec(("vocab", "embed"), (50257, 32)) == P(None, "fsdp")  # GPT-2 vocab
    rules = (("embed", None), ("vocab", ("fsdp", "tensor")))
    assert Layout(mesh, rules).spec(("vocab", "embed"), (64, 32)) == P(("fsdp", "tensor"), None)


def test_global_batch_is_split_over_data_and_fsdp():
    layout = make_layout(MeshSection(shape=MeshShape(2, 2, 2)))
    tokens = np.arange(8 * 6, dtype=np.int32).reshape(8, 6)
    batch = layout.make_global_batch({"tokens": tokens, "src": tokens > 3})
    assert batch["tokens"].sharding == layout.batch_sharding
    assert batch["tokens"].sharding.spec == P(("data", "fsdp"), None)
    assert batch["tokens"].addressable_shards[0].data.shape == (2, 6)
    np.testing.assert_array_equal(batch["tokens"], tokens)
    assert layout.data_shard() == (0, 1)  # one process loads the whole batch
    assert layout.batch_shards == 4


def test_sharded_init_matches_plain_init():
    params = sharded_init(TINY, make_layout(MeshSection(shape=MeshShape(1, 4, 2))), seed=3)
    plain = init_params(TINY, seed=3)
    wq = params["layers"]["attn"]["q_proj"]["kernel"]
    assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
    assert wq.addressable_shards[0].data.shape == (1, 8, 2, 8)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)  # jit may round normals by 1 ulp


def test_distributed_stays_off_without_a_job(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
                 "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert maybe_initialize_distributed(MeshSection()) is False
    assert maybe_initialize_distributed(MeshSection(distributed=False)) is False
