"""How attention is computed: backend, kernel block sizes, interpret mode.

One frozen (hashable) ``AttentionConfig`` travels in the model config, which is static under
``jax.jit``: the choice is part of the compiled function, never a global read while tracing. In a
run config it is the ``model.attention`` section::

    model:
      attention:
        backend: pallas_tpu  # auto | xla | pallas_tpu | splash | cudnn | pallas_gpu (experimental)
        tpu_block_sizes: {block_q: 1024, block_kv: 512}   # omitted: the per-chip defaults
        splash_block: 512

This module only holds plain dataclasses (no Pallas import), so configs load without the kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

BACKENDS = ("auto", "xla", "pallas_tpu", "splash", "cudnn", "pallas_gpu")


def _check_blocks(sizes, key: str, ok, requirement: str):
    for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
        value = getattr(sizes, name)
        if value is not None and not ok(value):
            raise ValueError(f"{key}.{name}: {value} must be {requirement}")


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
    """Tiles of the Pallas TPU kernel. ``*_bwd`` are used by both backward kernels (default: the
    forward ones). Multiples of 128 on a chip (lanes); small multiples of 8 in interpret mode."""
    block_q: int = 512
    block_kv: int = 512
    block_q_bwd: int | None = None
    block_kv_bwd: int | None = None
    vmem_limit_bytes: int | None = None  # None: Mosaic's default scoped VMEM limit

    def bwd(self) -> tuple[int, int]:
        return (self.block_q_bwd or self.block_q, self.block_kv_bwd or self.block_kv)

    def validate(self, key: str = "tpu_block_sizes"):
        _check_blocks(self, key, lambda v: v > 0 and v % 8 == 0, "a positive multiple of 8")


@dataclasses.dataclass(frozen=True)
class GpuBlockSizes:
    """Tiles of the Pallas Triton kernel (powers of two) and its launch parameters."""
    block_q: int = 64
    block_kv: int = 64
    block_q_bwd: int = 64
    block_kv_bwd: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def validate(self, key: str = "gpu_block_sizes"):
        _check_blocks(self, key, lambda v: v > 0 and v & (v - 1) == 0, "a power of two")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """``backend``: see ``diffujax.attention``. Block sizes ``None``: the defaults of the chip the
    program is compiled for (``tpu.default_block_sizes``). ``interpret``: run the Pallas kernels
    in interpret mode (CPU tests); ``True`` or a hashable ``pltpu.InterpretParams``."""
    backend: str = "auto"
    tpu_block_sizes: TpuBlockSizes | None = None
    gpu_block_sizes: GpuBlockSizes | None = None
    splash_block: int = 512
    interpret: Any = False

    def validate(self, key: str = "attention"):
        if self.backend not in BACKENDS:
            raise ValueError(f"{key}.backend: {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.splash_block <= 0 or self.splash_block % 128:
            raise ValueError(f"{key}.splash_block: {self.splash_block} must be a positive"
                             " multiple of 128")
        if self.tpu_block_sizes is not None:
            self.tpu_block_sizes.validate(f"{key}.tpu_block_sizes")
        if self.gpu_block_sizes is not None:
            self.gpu_block_sizes.validate(f"{key}.gpu_block_sizes")

    def replace(self, **changes) -> "AttentionConfig":
        return dataclasses.replace(self, **changes)
