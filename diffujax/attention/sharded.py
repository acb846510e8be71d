"""Attention kernels on a device mesh: ``jax.shard_map`` with specs from the logical-axis rules.

XLA cannot partition a Mosaic (or Triton) custom call: inside an auto-sharded ``jax.jit`` the
kernels must run per device. ``kernel_layout`` decides how the ``[B, L, H, D]`` operands split
over the active mesh, following the active rule table (``parallel.logical``):

- batch over the mesh axes of ``batch`` (``data`` x ``fsdp`` by default); segment ids likewise;
- query heads over the axes of ``heads`` (``tensor``); K/V heads over the same axes, since each
  K/V head must live on the device of the query heads it serves;
- length and head_dim whole (a sharded length would need ring attention, which no kernel does);
- the pattern scalars (seed, step, threshold) replicated.

An axis that does not divide its dimension is dropped for that dimension (its devices compute
the same values), as ``parallel.mesh.Layout.spec`` does for parameters.

GQA fallback: when the head axes (size ``T``) divide the query heads but not the K/V heads
(``KVH``; e.g. MQA, or 8 K/V heads on ``tensor=16``), K/V are repeated up to ``lcm(KVH, T)``
heads before the map (each device then holds ``lcm(KVH, T) / T`` of them; the gradient of the
repeat sums the copies). Group ``g = H / KVH`` query heads per K/V head stays consistent:
copy ``s`` of K/V head ``j`` serves query heads ``j*g + s*g/r ...`` for repeat factor ``r``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from diffujax.attention.flash_common import pattern_scalars
from diffujax.parallel.logical import QUERY as Q_NAMES  # q's dimensions [B, L, H, D]
from diffujax.parallel.logical import logical_to_spec, spec_axes


def target_device():
    """``(platform, device_kind)`` the program is being built for: the active mesh's devices
    (also an abstract TPU topology compiled on a CPU host), else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    if device is not None:
        return device.platform, device.device_kind
    return jax.default_backend(), jax.devices()[0].device_kind


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """How one attention call splits over the mesh (see the module docstring)."""
    mesh: object                  # the active AbstractMesh
    axes: tuple[str, ...]         # every mesh axis the map makes manual (unused ones: replicated)
    batch: tuple[str, ...]        # mesh axes of the batch dimension
    heads: tuple[str, ...]        # mesh axes of the (query and K/V) heads dimension
    kv_repeat: int                # K/V heads are repeated this many times first (GQA fallback)

    @property
    def head_shards(self) -> int:
        sizes = dict(zip(self.mesh.axis_names, self.mesh.axis_sizes))
        return math.prod(sizes[a] for a in self.heads)

    def spec(self, *, heads: bool = True) -> P:
        """``[B, L, H, D]`` (or ``[B, L]`` with ``heads=False``)."""
        b = self.batch or None
        if not heads:
            return P(b, None)
        return P(b, None, self.heads or None, None)

    def run(self, local, q, k, v, pattern, extra=(), extra_specs=()):
        """``local(q, k, v, pattern, *extra)`` on each device's block; ``[B, L, H, D]`` back."""
        if self.kv_repeat > 1:
            k, v = (jnp.repeat(x, self.kv_repeat, axis=2) for x in (k, v))
        scalars = pattern_scalars(pattern)
        seg = pattern.segment_ids

        def body(q, k, v, scalars, seg, *extra):
            # The static fields (kind, blocks) as they are; the traced ones from the map's inputs.
            local_pattern = dataclasses.replace(pattern, seed=scalars[0], step=scalars[1],
                                                threshold=scalars[2], segment_ids=seg)
            return local(q, k, v, local_pattern, *extra)

        qkv = self.spec()
        in_specs = (qkv, qkv, qkv, P(), None if seg is None else self.spec(heads=False),
                    *extra_specs)
        # check_vma=False: splash's block tables and the interpret-mode kernels are not
        # vma-typed; every output varies over exactly the axes of its spec, so nothing is lost.
        mapped = jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=qkv,
                               axis_names=frozenset(self.axes), check_vma=False)
        return mapped(q, k, v, scalars, seg, *extra)


def kernel_layout(q, k, rules=None) -> KernelLayout | None:
    """The layout of an attention call under the active mesh, or ``None`` without one (no mesh,
    one device, or already inside a ``shard_map`` over every axis): call the kernel directly.
    With a mesh the kernel always runs under the map, even when nothing divides (then every
    device computes the whole call): XLA cannot partition it."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    # Every axis not yet manual becomes manual, size-1 ones included: Mosaic refuses a call
    # under any axis left to the automatic partitioner.
    sizes = {name: size for name, size, kind in zip(mesh.axis_names, mesh.axis_sizes,
                                                    mesh.axis_types) if kind != AxisType.Manual}
    if not sizes or math.prod(mesh.axis_sizes) == 1:
        return None
    b, _, h, _ = q.shape
    kvh = k.shape[2]
    spec = logical_to_spec(Q_NAMES, rules, sizes)
    batch, heads = spec_axes(spec[0]), spec_axes(spec[2])
    if b % math.prod(sizes[a] for a in batch):
        batch = ()
    t = math.prod(sizes[a] for a in heads)
    if h % t:
        heads, t = (), 1
    repeat = math.lcm(kvh, t) // kvh
    return KernelLayout(mesh=mesh, axes=tuple(sizes), batch=batch, heads=heads,
                        kv_repeat=repeat)
