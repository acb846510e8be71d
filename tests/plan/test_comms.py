"""Collectives charged on the interconnect: the HLO reader's groups, sizes and overlap, and the ring
model's seconds, against hand counts. References: small programs with explicit collectives
(``shard_map`` all-gather / psum) compiled by the real TPU compiler for v5e and v5p descriptions,
whose bytes and replica groups follow from the shapes and the mesh written in the test; the
seconds written out from the ring formula with the Cloud TPU link figures; and a hand-written HLO
module for the asynchronous forms."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffujax.parallel.topology import parse_slice, slice_devices
from diffujax.plan import comms, hlo
from diffujax.plan.analysis import _no_persistent_cache

MIB = 1 << 20


def _mesh(name: str, shape, axes, num_slices: int = 1) -> Mesh:
    """Devices ordered by (slice, x, y, z) so that the last mesh axis runs along y (2-D slices)
    or z (3-D): the physical dimension each axis covers is known by construction."""
    devices = sorted(slice_devices(parse_slice(name), num_slices),
                     key=lambda d: (getattr(d, "slice_index", 0), *d.coords))
    return Mesh(np.array(devices).reshape(shape), axes)


def _compiled_collectives(mesh, fn, in_spec, out_spec, shape):
    f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_spec, out_specs=out_spec))
    x = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, in_spec))
    with _no_persistent_cache():  # compile-only executables cannot be cached
        return hlo.collectives(f.lower(x).compile().as_text())


def test_gather_and_psum_on_a_v5e_line():
    # v5litepod-8 is 2 x 4 chips, no wraparound: axis b runs along the 4, axis a across the 2.
    spec = parse_slice("v5litepod-8")
    mesh = _mesh("v5litepod-8", (2, 4), ("a", "b"))

    def fn(x):  # x: [128, 256] per device
        gathered = jax.lax.all_gather(x, "b", tiled=True)  # [512, 256] f32 = 512 KiB
        return jax.lax.psum(gathered, "a")[:, :256]

    items = _compiled_collectives(mesh, fn, P("a", "b"), P(None, "b"), (256, 1024))
    by_kind = {c.kind: c for c in items}
    assert sorted(by_kind) == ["all-gather", "all-reduce"] and len(items) == 2
    gather, reduce = by_kind["all-gather"], by_kind["all-reduce"]
    size = 512 * 256 * 4
    assert (gather.bytes, gather.full_bytes, gather.form) == (size, size, "sync")
    assert gather.groups == [[0, 1, 2, 3], [4, 5, 6, 7]]  # mesh rows (device order = mesh order)
    assert reduce.groups == [[0, 4], [1, 5], [2, 6], [3, 7]]  # mesh columns
    assert reduce.full_bytes == size
    devices = list(mesh.devices.flat)
    link = 50e9  # v5e: 1600 Gbps per chip over 4 ports, one way
    # A line of 4 (no wraparound): S (n-1)/n over one link's worth; all-reduce twice that, n=2.
    assert comms.collective_seconds(gather, devices, spec) == pytest.approx(size * 3 / 4 / link)
    assert comms.collective_seconds(reduce, devices, spec) == pytest.approx(2 * size / 2 / link)
    charged = comms.charge(items, devices, spec)
    total = size * 3 / 4 / link + size / link
    assert charged["seconds"] == pytest.approx(total)
    assert charged["exposed_seconds"] == pytest.approx(total)  # synchronous: nothing hidden
    assert charged["by_kind"]["all-gather"]["bytes_per_step"] == size


def test_psum_over_a_v5p_torus_and_across_slices():
    # v5p-128: 4 x 4 x 4 chips with wraparound. A psum over the axis along z closes a ring
    # (two links one way, 2 x 100 GB/s); over all 64 chips the three dimensions add up.
    spec = parse_slice("v5p-128")
    mesh = _mesh("v5p-128", (16, 4), ("rest", "z"))
    devices = list(mesh.devices.flat)
    size = 64 * 256 * 4

    def along_z(x):
        return jax.lax.psum(x, "z")

    (item,) = _compiled_collectives(mesh, along_z, P("rest", "z"), P("rest"),
                                    (16 * 64, 4 * 256))
    assert (item.kind, item.full_bytes, item.group_size) == ("all-reduce", size, 4)
    assert item.groups[0] == [0, 1, 2, 3]
    assert comms.collective_seconds(item, devices, spec) == pytest.approx(
        2 * size * 3 / 4 / 200e9)

    def everywhere(x):
        return jax.lax.psum(x, ("rest", "z"))

    (item,) = _compiled_collectives(mesh, everywhere, P("rest", "z"), P(), (16 * 64, 4 * 256))
    assert item.group_size == 64
    assert comms.collective_seconds(item, devices, spec) == pytest.approx(
        2 * size * 63 / 64 / 600e9)

    # Two v5p-8 slices (2 x 2 x 1 each, no wraparound). The compiler reduces hierarchically:
    # a reduce-scatter within each slice (over x and y, one link each), the device's quarter
    # all-reduced across the 2 slices by the megascale runtime (50 Gbps per chip), then an
    # all-gather within the slice.
    spec8 = parse_slice("v5p-8")
    mesh2 = _mesh("v5p-8", (2, 4), ("slices", "chips"), num_slices=2)

    def both(x):
        return jax.lax.psum(x, ("slices", "chips"))

    items = _compiled_collectives(mesh2, both, P("slices", "chips"), P(), (2 * 64, 4 * 256))
    shape = [(c.kind, c.network, c.full_bytes, c.groups) for c in items]
    assert shape == [("reduce-scatter", "ici", size, [[0, 1, 2, 3]]),
                     ("all-reduce", "dcn", size // 4, []),
                     ("all-gather", "ici", size, [[0, 1, 2, 3]])]
    within = size * 3 / 4 / (2 * 100e9)
    across = 2 * (size / 4) / 2 / 6.25e9
    charged = comms.charge(items, list(mesh2.devices.flat), spec8)
    assert charged["seconds"] == pytest.approx(2 * within + across)
    # The same psum as one group over both slices, as the ring model charges it unsplit.
    whole = hlo.Collective("all-reduce", "x", "main", "", size, 1, [list(range(8))], size)
    assert comms.collective_seconds(whole, list(mesh2.devices.flat), spec8) == pytest.approx(
        2 * within + across)


def _gather_collectives(name: str, shape, axes, gather_over) -> list:
    """The collectives of one tiled all-gather of a [64, 512] bf16 shard per device over the mesh
    axes ``gather_over`` of a mesh over ``name``'s devices (``_mesh`` order)."""
    mesh = _mesh(name, shape, axes)
    f = jax.jit(jax.shard_map(lambda x: jax.lax.all_gather(x, gather_over, tiled=True) * 2,
                              mesh=mesh, in_specs=P(axes), out_specs=P(), check_vma=False))
    x = jax.ShapeDtypeStruct((64 * mesh.size, 512), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P(axes)))
    with _no_persistent_cache():
        return hlo.collectives(f.lower(x).compile().as_text())


def test_a_gather_over_a_whole_3d_torus_is_a_zero_filled_all_reduce():
    """Why the 7B config keeps fsdp to a plane of v5p-128: the TPU compiler turns an all-gather
    whose group spans the whole 4 x 4 x 4 torus into a zero-filled full-size buffer summed by an
    all-reduce (twice the bytes), but keeps it an all-gather over a 4 x 4 plane of it, and over
    all 32 chips of v5p-64 (2 x 4 x 4, no wraparound)."""
    shard = 64 * 512 * 2
    (plane,) = _gather_collectives("v5p-128", (4, 16), ("planes", "plane"), "plane")
    assert (plane.kind, plane.group_size, plane.full_bytes) == ("all-gather", 16, 16 * shard)
    assert plane.groups[0] == list(range(16))  # one x-coordinate: a y-z plane
    (whole,) = _gather_collectives("v5p-128", (4, 16), ("planes", "plane"), ("planes", "plane"))
    assert (whole.kind, whole.group_size, whole.full_bytes) == ("all-reduce", 64, 64 * shard)
    (line,) = _gather_collectives("v5p-64", (32,), ("all",), "all")
    assert (line.kind, line.group_size, line.full_bytes) == ("all-gather", 32, 32 * shard)


ASYNC_MODULE = """HloModule jit_step, is_scheduled=true

%ag_start (p0: bf16[16,64]) -> bf16[64,64] {
  %p0 = bf16[16,64]{1,0} parameter(0)
  ROOT %all-gather.7 = bf16[64,64]{1,0} all-gather(%p0), channel_id=9, replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}
}

%ag_step (p1: bf16[16,64], p2: bf16[8,64]) -> bf16[64,64] {
  %p1 = bf16[16,64]{1,0} parameter(0)
  %convolution.3 = bf16[8,64]{1,0} convolution(%p2, %p2), dim_labels=bf_io->bf
  ROOT %all-gather.8 = bf16[64,64]{1,0} all-gather(%p1), channel_id=9, replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}
}

%rs (input: f32[64,32]) -> f32[16,32] {
  %input = f32[64,32]{1,0} parameter(0)
  %all-reduce.2 = f32[64,32]{1,0} all-reduce(%input), channel_id=4, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  ROOT %dynamic-slice.1 = f32[16,32]{1,0} dynamic-slice(%all-reduce.2, %i, %j), dynamic_slice_sizes={16,32}
}

ENTRY %main (a: f32[64,32]) -> f32[16,32] {
  %a = f32[64,32]{1,0} parameter(0)
  %all-reduce-start.1 = f32[64,32]{1,0} all-reduce-start(%a), channel_id=3, replica_groups=mesh['x'=2,'y'=4] {'x'}, to_apply=%add
  %fusion.1 = f32[64,32]{1,0} fusion(%a), kind=kLoop, calls=%f1, backend_config={"estimated_cycles":"700"}
  %fusion.2 = f32[64,32]{1,0} fusion(%a), kind=kLoop, calls=%f2, backend_config={"estimated_cycles":"300"}
  %all-reduce-done.1 = f32[64,32]{1,0} all-reduce-done(%all-reduce-start.1)
  %async-collective-start = bf16[64,64]{1,0} fusion(%b), kind=kCustom, calls=%ag_start
  %continuation = bf16[64,64]{1,0} fusion(%b, %c), kind=kOutput, calls=%ag_step, backend_config={"estimated_cycles":"5000"}
  %fusion.3 = f32[64,32]{1,0} fusion(%a), kind=kLoop, calls=%f3, backend_config={"estimated_cycles":"1000"}
  %async-collective-done = bf16[64,64]{1,0} fusion(%b), kind=kCustom, calls=%ag_start
  %collective-permute.1 = f32[64,32]{1,0} collective-permute(%a), channel_id=5, source_target_pairs={{0,1},{1,0}}
  ROOT %fusion.9 = f32[16,32]{1,0} fusion(%a), kind=kCustom, calls=%rs
}
"""


def test_async_pairs_fusion_chains_and_group_spellings():
    items = {c.name: c for c in hlo.collectives(ASYNC_MODULE)}
    assert set(items) == {"all-reduce-done.1", "async-collective-start", "collective-permute.1",
                          "fusion.9"}
    pair = items["all-reduce-done.1"]
    # Async pair: the two fusions scheduled between start and done (700 + 300 cycles).
    assert (pair.kind, pair.form, pair.overlap_cycles) == ("all-reduce", "async", 1000)
    assert pair.groups == [[0, 4], [1, 5], [2, 6], [3, 7]]  # mesh x=2, y=4, grouped over x
    # The gather chain (one channel, three fusions) is one collective overlapping the
    # continuation's and fusion.3's cycles; iota groups [2,4]<=[4,2]T(1,0).
    chain = items["async-collective-start"]
    assert (chain.kind, chain.form, chain.overlap_cycles) == ("all-gather", "fusion", 6000)
    assert (chain.bytes, chain.full_bytes) == (64 * 64 * 2, 64 * 64 * 2)
    assert chain.groups == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # all-reduce + slice in one fusion: a reduce-scatter of the 64 x 32 f32 buffer.
    rs = items["fusion.9"]
    assert (rs.kind, rs.form, rs.bytes, rs.full_bytes) == ("reduce-scatter", "sync", 16 * 32 * 4,
                                                         64 * 32 * 4)
    assert rs.groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert items["collective-permute.1"].groups == [[0, 1], [1, 0]]


def test_overlap_hides_only_what_compute_covers():
    # v5e-8 at 1.5 GHz: the async all-reduce over 2 chips (8 KiB, 2 S / 2 over 50 GB/s) is far
    # shorter than its 1000 overlapped cycles; the sync reduce-scatter is all exposed.
    spec = parse_slice("v5litepod-8")
    devices = sorted(slice_devices(spec), key=lambda d: tuple(d.coords))
    items = hlo.collectives(ASYNC_MODULE)
    charged = comms.charge(items, devices, spec)
    pair = next(c for c in items if c.form == "async")
    once = comms.collective_seconds(pair, devices, spec)
    assert once == pytest.approx(2 * 64 * 32 * 4 / 2 / 50e9)
    hidden = min(once, 1000 / 1.5e9)
    assert charged["by_form"]["async"]["exposed_seconds"] == pytest.approx(once - hidden)
    sync = charged["by_form"]["sync"]
    assert sync["exposed_seconds"] == pytest.approx(sync["seconds"]) and sync["seconds"] > 0
    assert charged["exposed_seconds"] + charged["overlapped_seconds"] == pytest.approx(
        charged["seconds"])


# The shipped 7B run (its mesh, slice, dtypes, remat and flags) with 2 of its 32 layers, a short
# sequence, one micro-batch and a small vocabulary: each layer's matrices keep their 7B shapes,
# and the forms XLA picks depend on them (with shards of 128 rows or fewer per device a gradient
# can stay all-reduced whole: the tiny model's o_proj).
FSDP_SCRIPT = """
import collections, json, sys
from diffujax.parallel.tpu_env import quiet_libtpu_without_tpu, set_collective_flags
quiet_libtpu_without_tpu()
if sys.argv[1] == "flags":
    set_collective_flags("v5p")
from diffujax.config import load_config
from diffujax.models import param_specs
from diffujax.plan import hlo
from diffujax.plan.analysis import make_target
from diffujax.plan.programs import plan_model_config, programs_for
cfg = load_config("configs/diffullama_7b.yaml", [
    "plan.model.num_layers=2", "plan.model.vocab_size=1024", "data.seq_len=128",
    "data.global_batch=64", "optimizer.grad_accum_steps=1"])
model_cfg, _ = plan_model_config(cfg)
target = make_target(cfg, cfg.plan.topology)
(program,) = programs_for("train", cfg, model_cfg, target.layout)
items = hlo.collectives(program.lower().compile().as_text())
squeeze = lambda dims: tuple(d for d in dims if d != 1)
matrices = {k: s.shape[1:] for k, s in param_specs(model_cfg).items()
            if k.startswith("layers/") and len(s.shape) > 2}
names = collections.defaultdict(list)
for k, shape in matrices.items():
    names[squeeze(shape)].append(k)
runs = collections.defaultdict(collections.Counter)
for c in items:
    for _, dims in hlo.shape_dims(c.result):
        if squeeze(dims) in names:
            runs[squeeze(dims)][f"{c.kind}/{c.form}"] += c.runs
print(json.dumps(dict(layers=model_cfg.num_layers, mesh=dict(target.layout.mesh.shape),
                      whole=hlo.all_reduced_whole(items, matrices),
                      weights=[[names[s], dict(runs[s])] for s in names])))
"""


def _fsdp_weight_collectives(modes) -> dict:
    """``{mode: found}``: the collectives whose result is one layer's whole weight matrix in the
    shipped 7B train step on its slice (``FSDP_SCRIPT``), compiled without and with the flags in
    two fresh processes at once (libtpu reads its flags at start-up). ``found["weights"]`` lists
    ``[names sharing a shape, {kind/form: runs per step}]``."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("LIBTPU_INIT_ARGS", None)
    procs = {mode: subprocess.Popen([sys.executable, "-c", FSDP_SCRIPT, mode], env=env, cwd=root,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for mode in modes}
    found = {}
    for mode, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        assert "Unknown command line flag" not in err
        found[mode] = json.loads(out.strip().splitlines()[-1])
    return found


@pytest.mark.integration  # compiles in fresh processes (libtpu reads its flags at start)
def test_fsdp_gathers_weights_by_all_gathers_and_reduce_scatters_their_gradients():
    """In the shipped 7B step on v5p-128 every layer's weight matrix is gathered by all-gathers
    (none is a zero-filled full-size buffer summed by an all-reduce, the form the TPU compiler
    picks for a group spanning the whole 4 x 4 x 4 torus) and its gradient reduced by one
    reduce-scatter per layer; nothing is all-reduced whole. With the async collective flags
    (the plan's and the run's) gathers become collective fusions that overlap the matmuls."""
    for mode, found in _fsdp_weight_collectives(("plain", "flags")).items():
        assert found["whole"] == [], (mode, found["mesh"], found["whole"])
        layers = found["layers"]
        assert len(found["weights"]) >= 4, found  # q/k/v, o, gate/up, down shapes
        for names, runs in found["weights"]:
            kinds = collections.Counter()
            for kind_form, n in runs.items():
                kinds[kind_form.split("/")[0]] += n
            assert set(kinds) == {"all-gather", "reduce-scatter"}, (mode, names, runs)
            assert kinds["reduce-scatter"] == len(names) * layers, (mode, names, runs)
            assert kinds["all-gather"] >= len(names) * layers, (mode, names, runs)
        fused = [names for names, runs in found["weights"] if "all-gather/fusion" in runs]
        # Without the flags every gather is synchronous; with them some overlap the matmuls
        # (today not all: o_proj's and most of q/k/v's stay synchronous).
        assert bool(fused) == (mode == "flags"), (mode, found["weights"])
