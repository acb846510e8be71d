"""The device mesh, the ``Layout`` (a mesh with its logical-axis rules: the shardings derived from
logical names, process-local -> global data).

Axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with parameters and optimizer
state sharded along ``embed``) and ``tensor`` (heads, MLP and vocabulary). The batch is split over
``data`` x ``fsdp``. Any axis may be 1; one may be -1 to take the remaining devices.

Multi-slice TPU (several pods over DCN): set ``mesh.num_slices``; the ``data`` axis is then laid out
across slices (only gradients cross the slow DCN links, once per step) and the other axes stay
inside a slice, using ``mesh_utils.create_hybrid_device_mesh``.

    maybe_initialize_distributed(cfg.mesh)     # before anything touches a device
    layout = make_layout(cfg.mesh)             # the mesh and the logical-axis rules
    batch = layout.make_global_batch(local_numpy_batch)
    with layout.active():                      # tracing: activation constraints see both
        ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffujax.parallel.logical import BATCH as BATCH_AXES  # logical names of [B, L] batch arrays
from diffujax.parallel.logical import (DEFAULT_RULES, logical_to_spec, rules_in_effect,
                                       spec_axes)

AXES = ("data", "fsdp", "tensor")

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- the mesh


def resolve_shape(shape, num_devices: int) -> dict[str, int]:
    """Axis sizes of a ``MeshShape`` with the -1 axis filled in."""
    sizes = {a: int(getattr(shape, a)) for a in AXES}
    known = math.prod(s for s in sizes.values() if s != -1)
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh shape {sizes}: at most one axis may be -1")
    if free:
        if num_devices % known:
            raise ValueError(f"mesh shape {sizes}: {num_devices} devices are not a multiple of"
                             f" {known}")
        sizes[free[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh shape {sizes} needs {math.prod(sizes.values())} devices,"
                         f" but {num_devices} are available")
    return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh of a ``MeshSection``.

    Axes are ``Auto``: shardings are declared through the logical rules and propagated by XLA.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_shape(mesh_cfg.shape, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    auto = (AxisType.Auto,) * len(AXES)
    slices = mesh_cfg.num_slices
    try:
        if slices == 1:
            return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
        if sizes["data"] % slices:
            raise ValueError(f"mesh.shape.data={sizes['data']} must be a multiple of"
                             f" mesh.num_slices={slices}: the data axis is the one that spans"
                             " slices")
        ici = (sizes["data"] // slices, sizes["fsdp"], sizes["tensor"])
        grid = mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices)
    except NotImplementedError as e:
        # jax's TPU mesh builder: an axis size that is no product of the torus's own sides
        raise ValueError(f"mesh.shape {sizes} does not tile the slice's physical chip grid:"
                         f" each axis size must be a product of some of its sides"
                         f" ({str(e).split('.')[0]})") from e
    return Mesh(grid, AXES, axis_types=auto)


# ------------------------------------------------------------------------------- multi-process


def _cluster_env() -> bool:
    """Does the environment describe a multi-process job that ``jax.distributed`` can join?"""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return True
    return any(int(env.get(k, "1") or 1) > 1 for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def maybe_initialize_distributed(mesh_cfg) -> bool:
    """Join a multi-process job when the config (``mesh.distributed: true``, or ``auto`` with a
    coordinator) or the environment (``JAX_COORDINATOR_ADDRESS``, a multi-host TPU, SLURM, Open
    MPI) says so. Call it before any other JAX call; returns whether JAX is distributed.

    Explicit values come from the config first, then ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; whatever stays unset JAX detects itself.
    """
    mode = mesh_cfg.distributed
    if mode is False:
        return False
    if jax.distributed.is_initialized():
        return True
    env = os.environ

    def pick(value, name):
        if value is not None:
            return value
        return int(env[name]) if env.get(name) else None

    coordinator = mesh_cfg.coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    num_processes = pick(mesh_cfg.num_processes, "JAX_NUM_PROCESSES")
    process_id = pick(mesh_cfg.process_id, "JAX_PROCESS_ID")
    if mode == "auto" and not (coordinator or _cluster_env()):
        return False
    # Processes on CPU need a collective implementation to talk to each other (gloo ships with
    # jaxlib); the option only concerns the CPU client, so it is harmless on TPU and GPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


# -------------------------------------------------------------------------------------- the layout


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and the rule table that maps logical axis names onto it: everything the code needs
    to place an array. ``rules``: a tuple of ``(logical name, mesh axes)``, ``DEFAULT_RULES``
    unless given (``MeshSection.rule_table()`` for a run's)."""

    mesh: Mesh
    rules: tuple = DEFAULT_RULES

    def __post_init__(self):
        object.__setattr__(self, "rules", tuple(self.rules))

    @property
    def axis_sizes(self) -> dict[str, int]:
        return dict(zip(self.mesh.axis_names, self.mesh.axis_sizes))

    @contextlib.contextmanager
    def active(self):
        """Trace and run under this layout: jax's mesh and the rules that activation constraints
        (``logical.constrain``, the attention kernels' ``kernel_layout``) read. Those are called
        deep inside model code, so the layout reaches them through this one context rather than
        through every module's arguments."""
        with jax.set_mesh(self.mesh), rules_in_effect(self.rules):
            yield

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def spec(self, names, shape) -> P:
        """PartitionSpec of an array with logical axis ``names``; a mesh axis that does not divide
        its dimension is dropped (e.g. GPT-2's vocabulary of 50257 on ``tensor=2`` stays
        replicated)."""
        sizes = self.axis_sizes
        out = []
        for dim, entry in zip(shape, logical_to_spec(names, self.rules, sizes)):
            axes = spec_axes(entry)
            if axes and dim % math.prod(sizes[a] for a in axes):
                log.info("dimension %d (%s) is not divisible by mesh axes %s: kept replicated", dim,
                         names, axes)
                entry = None
            out.append(entry)
        return P(*out)

    def sharding(self, names, shape) -> NamedSharding:
        """``NamedSharding`` of an array with logical axis ``names`` (``spec``)."""
        return NamedSharding(self.mesh, self.spec(names, shape))

    @property
    def batch_sharding(self) -> NamedSharding:
        """Sharding of ``[B, L]`` batch arrays: batch over ``data`` x ``fsdp`` (per the rules)."""
        return NamedSharding(self.mesh, logical_to_spec(BATCH_AXES, self.rules, self.axis_sizes))

    @property
    def batch_shards(self) -> int:
        """How many ways the batch dimension is split across devices (batch sizes must be
        multiples of it)."""
        return math.prod(self.axis_sizes[a] for a in spec_axes(self.batch_sharding.spec[0]))

    def data_shard(self) -> tuple[int, int]:
        """``(index, count)``: this process loads block ``index`` of ``count`` equal, consecutive
        blocks of rows of the global batch (give them to the data pipeline's shard options).

        Usually ``(process_index, process_count)``; processes whose devices hold the same rows
        (when the batch is not split across all hosts, e.g. ``tensor`` spanning hosts) get the
        same index and must load the same data.
        """
        sharding = self.batch_sharding
        n = sharding.num_devices
        rows: dict[int, set] = {}
        for device, index in sharding.devices_indices_map((n, 1)).items():
            rows.setdefault(device.process_index, set()).add(
                (index[0].start or 0, n if index[0].stop is None else index[0].stop))
        spans = {}
        for pid, slices in rows.items():
            lo, hi = min(a for a, _ in slices), max(b for _, b in slices)
            if sum(b - a for a, b in slices) != hi - lo:
                raise ValueError(f"process {pid} holds non-consecutive batch rows {sorted(slices)}:"
                                 " reorder the mesh so each host's devices hold one block of the"
                                 " batch")
            spans[pid] = (lo, hi)
        blocks = sorted(set(spans.values()))
        return blocks.index(spans[jax.process_index()]), len(blocks)

    def make_global_batch(self, local_batch: dict) -> dict:
        """Global ``jax.Array`` s from this process's numpy batch ``{name: [B_local, ...]}``.

        Each process passes its block of rows, ``data_shard()``: the global batch is the blocks
        in index order, ``B = B_local * count``. No data crosses hosts.
        """
        sharding = self.batch_sharding
        out = {}
        for name, value in local_batch.items():
            value = np.asarray(value)
            spec = P(*sharding.spec[: value.ndim])  # 1-D per-sequence fields shard like the batch
            out[name] = jax.make_array_from_process_local_data(NamedSharding(self.mesh, spec),
                                                               value)
        return out


def make_layout(mesh_cfg, devices=None) -> Layout:
    """The ``Layout`` of a ``MeshSection``: ``make_mesh`` and the section's rule table."""
    return Layout(make_mesh(mesh_cfg, devices), mesh_cfg.rule_table())


def to_host(x) -> np.ndarray:
    """Host copy of an array, also when its shards live on several processes."""
    if not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
