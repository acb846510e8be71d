"""One attention entry point for every model; backends plug in behind ``attention``.

Backends (``backend=`` argument, or the module default set by ``configure``):

- ``xla``: ``reference_attention`` with the dense mask; the ground truth and the CPU default.
- ``pallas_tpu``: the Pallas TPU flash kernel (``tpu.py``) with the pattern hashed in-kernel;
  every pattern, padding for any length.
- ``splash``: JAX's bundled splash attention (``splash.py``); causal/full (+ segment ids) from
  static block tables, annealed only through a dense ``[1, L, L]`` mask; length % 128 == 0.
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``; causal/full, no segment
  ids, bf16/f16.
- ``pallas_gpu``: the Pallas Triton kernel (``gpu.py``), every pattern.
- ``auto``: by platform. TPU: splash for causal/full when the length is a multiple of 128, else
  ``pallas_tpu``; annealed always ``pallas_tpu``. GPU: cuDNN where it applies, else
  ``pallas_gpu``. CPU: ``xla``. (The TPU/GPU choices are expectations, not measurements: see
  ``benchmarks/attention.py``.)

``interpret=True`` (``configure(interpret=True)`` or per call) runs the Pallas kernels in
interpret mode, so a CPU test or training step can execute the TPU/GPU kernels exactly.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax

from diffujax.attention import gpu, splash, tpu
from diffujax.attention.pattern import (AttentionPattern, anneal_ratio, annealed, causal,
                                        dense_mask, for_training, full, is_open)
from diffujax.attention.reference import reference_attention

BACKENDS = ("auto", "xla", "pallas_tpu", "splash", "cudnn", "pallas_gpu")

_settings: dict[str, Any] = {
    "backend": "auto",          # what backend="auto" resolves through first
    "interpret": False,         # False | True | pltpu.InterpretParams(...)
    "tpu_block_sizes": None,    # tpu.BlockSizes | None (per-chip defaults)
    "gpu_block_sizes": None,    # gpu.BlockSizes | None
    "splash_block": 512,
}


def configure(**settings) -> dict[str, Any]:
    """Set module defaults (``backend``, ``interpret``, ``tpu_block_sizes``, ``gpu_block_sizes``,
    ``splash_block``); returns the previous values of the keys given."""
    unknown = set(settings) - set(_settings)
    if unknown:
        raise ValueError(f"unknown attention settings {sorted(unknown)}; known: {sorted(_settings)}")
    if settings.get("backend", "auto") not in BACKENDS:
        raise ValueError(f"attention backend {settings['backend']!r} is not one of {BACKENDS}")
    previous = {k: _settings[k] for k in settings}
    _settings.update(settings)
    return previous


@contextlib.contextmanager
def attention_config(**settings):
    """``with attention_config(backend="pallas_tpu", interpret=True): ...``"""
    previous = configure(**settings)
    try:
        yield
    finally:
        _settings.update(previous)


def resolve_backend(q, k, pattern: AttentionPattern, backend: str = "auto") -> str:
    """The concrete backend ``attention`` will run for these inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        backend = _settings["backend"]
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    if platform == "tpu":
        if pattern.kind != "annealed" and q.shape[1] % 128 == 0 and q.shape[1] == k.shape[1]:
            return "splash"
        return "pallas_tpu"
    if platform in ("gpu", "cuda", "rocm"):
        if (pattern.kind != "annealed" and pattern.segment_ids is None
                and q.dtype.name in ("bfloat16", "float16")):
            return "cudnn"
        return "pallas_gpu"
    return "xla"


def attention(q, k, v, pattern: AttentionPattern, *, backend: str = "auto",
              interpret: Any = None):
    """q ``[B, L, H, D]``, k/v ``[B, L, KVH, D]`` -> ``[B, L, H, D]`` under ``pattern``."""
    chosen = resolve_backend(q, k, pattern, backend)
    interpret = _settings["interpret"] if interpret is None else interpret
    if chosen == "xla":
        return reference_attention(q, k, v, pattern)
    if chosen == "pallas_tpu":
        return tpu.flash_attention(q, k, v, pattern, block_sizes=_settings["tpu_block_sizes"],
                                   interpret=interpret)
    if chosen == "splash":
        return splash.splash_attention(q, k, v, pattern, block=_settings["splash_block"],
                                       dense_annealed=True, interpret=bool(interpret))
    if chosen == "pallas_gpu":
        return gpu.flash_attention(q, k, v, pattern, block_sizes=_settings["gpu_block_sizes"],
                                   interpret=bool(interpret))
    if backend == "auto":
        try:
            return gpu.cudnn_attention(q, k, v, pattern)
        except (ValueError, NotImplementedError):  # a shape/dtype cuDNN refuses: the kernel
            return gpu.flash_attention(q, k, v, pattern,
                                       block_sizes=_settings["gpu_block_sizes"])
    return gpu.cudnn_attention(q, k, v, pattern)


__all__ = ["AttentionPattern", "attention", "anneal_ratio", "annealed", "attention_config",
           "causal", "configure", "dense_mask", "for_training", "full", "is_open",
           "reference_attention", "resolve_backend", "BACKENDS"]
