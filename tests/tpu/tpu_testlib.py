"""Abstract TPU slices for compile tests: 4-chip v5e and v5p meshes over (data, fsdp, tensor)."""

from __future__ import annotations

import functools
import re

import jax
from jax.experimental import topologies

# name -> (topology, chip config, HBM bytes per chip)
CHIPS = {
    "v5e": ("v5e:2x2", "default", 16 * 2**30),
    "v5p": ("v5p:2x2x1", "megacore", 95 * 2**30),
}
AXES = ("data", "fsdp", "tensor")


@functools.cache
def topology(chip: str):
    name, config, _ = CHIPS[chip]
    return topologies.get_topology_desc(platform="tpu", topology_name=name,
                                        chip_config_name=config, chips_per_host_bounds=(2, 2, 1))


@functools.cache
def mesh(chip: str, shape: tuple[int, int, int] = (1, 2, 2)) -> jax.sharding.Mesh:
    """A ``(data, fsdp, tensor)`` mesh over the chip's 4-chip topology (axes Auto, as in training)."""
    return topologies.make_mesh(topology(chip), shape, AXES)


def hbm_bytes(chip: str) -> int:
    return CHIPS[chip][2]


_COLLECTIVE = re.compile(r"= (.+?) (all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"collective-permute)(?:-start)?\(")


def collectives(hlo: str, *, scalars: bool = False) -> dict[str, list[str]]:
    """Collective ops in an optimized HLO text: kind -> result shapes. Scalar results (a loss
    summed over devices) are left out unless ``scalars``."""
    found: dict[str, list[str]] = {}
    for shape, kind in _COLLECTIVE.findall(hlo):
        if scalars or not re.fullmatch(r"\w+\[\]\S*", shape):
            found.setdefault(kind, []).append(shape)
    return found
