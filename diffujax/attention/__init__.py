"""One attention entry point for every model; backends plug in behind ``attention``.

    attention(q, k, v, pattern, AttentionConfig(backend="pallas_tpu"))

The ``AttentionConfig`` (``config.py``: backend, block sizes, interpret mode) is frozen and
hashable; models carry it in their config, which is static under ``jax.jit``, so it is part of the
compiled function. Backends (every one but ``cudnn`` takes a pattern's static blocks,
``block_size`` / ``stream_len``: docs/algorithms.md §9, one stream in blocks or the two-stream
``[x_t ; x_0]`` input of length ``2 * stream_len``):

- ``xla``: ``reference_attention`` with the dense mask; the ground truth and the CPU default.
- ``pallas_tpu``: the Pallas TPU flash kernel (``tpu.py``) with the pattern hashed in-kernel;
  every pattern, padding for any length; tiles with no open entry are skipped (no compute, no
  copy) and tiles open throughout run unmasked (``tiles.py`` decides both from scalars).
- ``splash``: JAX's bundled splash attention (``splash.py``); causal/full (+ segment ids, in
  blocks as ``splash.BlockMask``, computed in-kernel) from static block tables, annealed (in
  blocks or not) only through a dense ``[1, L, L]`` mask; length % 128 == 0.
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``; causal/full without
  blocks, no segment ids, bf16/f16.
- ``pallas_gpu``: the Pallas Triton kernel (``gpu.py``), every pattern; closed tiles skipped,
  visited tiles of a blocked pattern masked. Experimental: never run on a GPU (docs/kernels.md).
- ``auto``: by the platform the program is built for (the active mesh's devices, so an abstract
  TPU topology on a CPU host counts as TPU). TPU: splash for causal/full (in blocks or not) when
  the length is a multiple of 128, else ``pallas_tpu``; annealed always ``pallas_tpu``. GPU: cuDNN
  where it applies, else ``pallas_gpu``. CPU: ``xla``. (The TPU/GPU choices are expectations, not
  measurements: docs/kernels.md.)

On a mesh (``jax.set_mesh``), every kernel backend runs under ``jax.shard_map`` with specs from
the active logical-axis rules (``sharded.py``: batch over data x fsdp, heads over tensor, GQA
fallback). ``xla`` needs no map: XLA partitions it like any other op.
"""

from __future__ import annotations

import functools

from diffujax.attention import gpu, splash, tpu
from diffujax.attention.config import (BACKENDS, AttentionConfig, GpuBlockSizes,
                                       TpuBlockSizes)
from diffujax.attention.pattern import (AttentionPattern, anneal_ratio, annealed, causal,
                                        dense_mask, for_training, full, is_open)
from diffujax.attention.reference import reference_attention
from diffujax.attention.sharded import kernel_layout, target_device

DEFAULT = AttentionConfig()


def resolve_backend(q, k, pattern: AttentionPattern, config: AttentionConfig = DEFAULT) -> str:
    """The concrete backend ``attention`` will run for these inputs."""
    config.validate()
    if config.backend != "auto":
        return config.backend
    platform = target_device()[0]
    if platform == "tpu":
        if pattern.kind != "annealed" and q.shape[1] % 128 == 0 and q.shape[1] == k.shape[1]:
            return "splash"
        return "pallas_tpu"
    if platform in ("gpu", "cuda", "rocm"):
        if (pattern.kind != "annealed" and pattern.segment_ids is None and not pattern.blocked
                and q.dtype.name in ("bfloat16", "float16")):
            return "cudnn"
        return "pallas_gpu"
    return "xla"


def attention(q, k, v, pattern: AttentionPattern, config: AttentionConfig = DEFAULT, *,
              backend: str | None = None):
    """q ``[B, L, H, D]``, k/v ``[B, L, KVH, D]`` -> ``[B, L, H, D]`` under ``pattern``.

    ``backend`` overrides ``config.backend`` (a shorthand for ``config.replace(backend=...)``).
    """
    if backend is not None:
        config = config.replace(backend=backend)
    chosen = resolve_backend(q, k, pattern, config)
    if chosen == "xla":
        return reference_attention(q, k, v, pattern)
    layout = kernel_layout(q, k)
    if chosen == "splash":
        return splash.splash_attention(q, k, v, pattern, block=config.splash_block,
                                       dense_annealed=True, interpret=bool(config.interpret),
                                       layout=layout)
    local = _local_kernel(chosen, config)
    if layout is None:
        return local(q, k, v, pattern)
    return layout.run(local, q, k, v, pattern)


def _local_kernel(chosen: str, config: AttentionConfig):
    """``fn(q, k, v, pattern)`` running backend ``chosen`` on one device's operands."""
    if chosen == "pallas_tpu":
        blocks = config.tpu_block_sizes or tpu.default_block_sizes(target_device()[1])
        return functools.partial(tpu.flash_attention, block_sizes=blocks,
                                 interpret=config.interpret)
    flash = functools.partial(gpu.flash_attention, block_sizes=config.gpu_block_sizes,
                              interpret=bool(config.interpret))
    if chosen == "pallas_gpu":
        return flash
    if config.backend == "cudnn":
        return gpu.cudnn_attention

    def cudnn_or_kernel(q, k, v, p):
        try:
            return gpu.cudnn_attention(q, k, v, p)
        except (ValueError, NotImplementedError):  # a shape/dtype cuDNN refuses: the kernel
            return flash(q, k, v, p)
    return cudnn_or_kernel


__all__ = ["AttentionConfig", "AttentionPattern", "BACKENDS", "GpuBlockSizes", "TpuBlockSizes",
           "anneal_ratio", "annealed", "attention", "causal", "dense_mask", "for_training", "full",
           "is_open", "reference_attention", "resolve_backend"]
