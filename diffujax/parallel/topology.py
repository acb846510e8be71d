"""Cloud TPU slices by their accelerator-type names, as compile-only device sets.

    spec = parse_slice("v5p-128")             # 64 chips, libtpu topology "v5p:4x4x4", 95 GiB each
    devices = slice_devices(spec, num_slices=2)  # 128 TPU devices, no hardware needed

Names follow Cloud TPU: ``v4-N`` and ``v5p-N`` count TensorCores (two per chip: ``v5p-8`` is 4
chips), ``v5litepod-N`` and ``v6e-N`` count chips. libtpu describes any of them on a machine
without TPUs (``jax.experimental.topologies``); the devices it returns carry the real chip kind,
coordinates and slice index, so ``jax.jit(...).lower(...).compile()`` runs the real TPU compiler.
JAX sees one device per chip (v4 / v5p as megacore), which is what the mesh is built from.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
from jax.experimental import topologies

from diffujax.parallel.tpu_env import quiet_libtpu_without_tpu

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Generation:
    prefix: str  # Cloud TPU name prefix (before "-N")
    libtpu: str  # libtpu topology prefix
    cores_per_chip: int  # what N counts per chip in "<prefix>-N"
    chip_config: str  # libtpu chip_config_name
    hbm_bytes: int  # per chip
    hbm_bandwidth: float  # bytes/s per chip
    ici_link_bandwidth: float  # bytes/s one way over one ICI link (a chip has 2 per dimension)
    dcn_bandwidth: float  # bytes/s per chip between slices (the host NICs shared by its chips)
    clock_hz: float | None  # TensorCore clock (the unit of the compiler's cycle estimates)
    layouts: dict  # chips -> physical layout
    torus_chips: int  # slices of at least this many chips have wraparound links (a torus)


_LAYOUTS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
               128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
               2048: (8, 16, 16), 4096: (16, 16, 16)}
_LAYOUTS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
               128: (8, 16), 256: (16, 16)}

# Per chip, from Cloud TPU's system-architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p,
# v6e): HBM, HBM bandwidth, clock. ICI per link and direction = the page's per-chip ICI figure over
# its ports: v4 2400 Gbps / 6 ports = 50 GB/s; v5e 1600 Gbps / 4 = 50 GB/s; v5p 1200 GB/s
# bidirectional / 6 / 2 = 100 GB/s; v6e 800 GB/s bidirectional / 4 / 2 = 100 GB/s. DCN per chip:
# v5p 50 Gbps (its page); v5e 2 x 100 Gbps NICs per 8-chip host = 25 Gbps; v6e 4 x 200 Gbps per
# 8 chips = 100 Gbps; v4 (no figure published per chip) taken as v5p's, 4 chips per host too.
# Wraparound: v4 / v5p slices of a full 4x4x4 cube or more are tori; v5e / v6e only the full
# 16x16 Pod.
GENERATIONS = (
    Generation("v4", "v4", 2, "megacore", 32 * GIB, 1.2e12, 50e9, 6.25e9, 1.05e9, _LAYOUTS_3D,
               64),
    Generation("v5litepod", "v5e", 1, "default", 16 * GIB, 0.819e12, 50e9, 3.125e9, 1.5e9,
               _LAYOUTS_2D, 256),
    Generation("v5p", "v5p", 2, "megacore", 95 * GIB, 2.765e12, 100e9, 6.25e9, 1.75e9,
               _LAYOUTS_3D, 64),
    # No published v6e clock on record here: plans report no step-time estimate for v6e.
    Generation("v6e", "v6e", 1, "default", 32 * GIB, 1.64e12, 100e9, 12.5e9, None, _LAYOUTS_2D,
               256),
)
ALIASES = {"v5e": "v5litepod"}  # "v5e-8" is what people say; Cloud TPU calls it v5litepod-8


@dataclasses.dataclass(frozen=True)
class SliceSpec:
    name: str  # canonical Cloud TPU accelerator type, e.g. "v5p-128"
    generation: Generation
    chips: int
    layout: tuple[int, ...]

    @property
    def topology(self) -> str:
        """The libtpu topology description, e.g. ``"v5p:4x4x4"``."""
        return f"{self.generation.libtpu}:{'x'.join(map(str, self.layout))}"

    @property
    def hbm_bytes(self) -> int:
        return self.generation.hbm_bytes

    @property
    def torus(self) -> bool:
        """Whether every dimension has wraparound links (a ring along it closes)."""
        return self.chips >= self.generation.torus_chips

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """Chips per host: 2x2x1 on v4 / v5p and on multi-host v5e / v6e slices, and every chip
        of a single-host v5e / v6e slice (up to 2x4)."""
        if len(self.layout) == 2 and self.chips <= 8:
            return (*self.layout, 1)
        return (2, 2, 1)


def valid_names() -> list[str]:
    return [f"{g.prefix}-{chips * g.cores_per_chip}" for g in GENERATIONS for chips in g.layouts]


def parse_slice(name: str) -> SliceSpec:
    """A Cloud TPU accelerator type (``v5p-128``, ``v5litepod-16``, ``v4-8``, ``v6e-8``; ``v5e-N``
    is accepted for ``v5litepod-N``) -> ``SliceSpec``; anything else is a ``ValueError`` listing
    the valid names."""
    prefix, _, count = str(name).strip().lower().rpartition("-")
    prefix = ALIASES.get(prefix, prefix)
    for g in GENERATIONS:
        if g.prefix == prefix and count.isdigit() and int(count) % g.cores_per_chip == 0:
            chips = int(count) // g.cores_per_chip
            if chips in g.layouts:
                return SliceSpec(f"{g.prefix}-{count}", g, chips, g.layouts[chips])
    raise ValueError(f"unknown TPU slice {name!r}; valid names: {', '.join(valid_names())}")


def slice_devices(spec: SliceSpec, num_slices: int = 1) -> list:
    """Compile-only TPU devices of ``num_slices`` copies of the slice (``slice_index`` set, as the
    hybrid DCN mesh expects). Needs libtpu (``pip install "jax[tpu]"``), not a TPU."""
    if num_slices < 1:
        raise ValueError(f"--num-slices must be >= 1, got {num_slices}")
    return list(_devices(spec.topology, spec.generation.chip_config, spec.chips_per_host_bounds,
                         num_slices))


@functools.lru_cache(maxsize=None)
def _devices(topology: str, chip_config: str, host_bounds, num_slices: int):
    # Compiling needs no TPU, so several planners (or a planner beside a training job) may load
    # libtpu at once: without this libtpu takes a machine-wide lock and the second one fails.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # libtpu otherwise asks what this machine is, fails, and prints screens of warnings; a
    # compile-only client needs none of it.
    quiet_libtpu_without_tpu()

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                            chip_config_name=chip_config,
                                            chips_per_host_bounds=host_bounds,
                                            num_slices=num_slices)
    except (RuntimeError, ImportError) as e:  # no libtpu, or one that does not know the chip
        raise ValueError(f"libtpu cannot describe TPU topology {topology!r} ({e}); install the"
                         f" TPU compiler with: pip install 'jax[tpu]=={jax.__version__}'") from None
    return tuple(desc.devices)


__all__ = ["GENERATIONS", "SliceSpec", "parse_slice", "slice_devices", "valid_names"]
