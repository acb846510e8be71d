"""One attention entry point for every model; backends plug in behind ``attention``."""

from __future__ import annotations

from diffujax.attention.pattern import (AttentionPattern, anneal_ratio, annealed, causal,
                                        dense_mask, for_training, full, is_open)
from diffujax.attention.reference import reference_attention

BACKENDS = ("auto", "xla", "pallas_tpu", "splash", "cudnn", "pallas_gpu")


def attention(q, k, v, pattern: AttentionPattern, *, backend: str = "auto"):
    """q ``[B, L, H, D]``, k/v ``[B, L, KVH, D]`` -> ``[B, L, H, D]`` under ``pattern``."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    return reference_attention(q, k, v, pattern)


__all__ = ["AttentionPattern", "attention", "anneal_ratio", "annealed", "causal", "dense_mask",
           "for_training", "full", "is_open", "reference_attention", "BACKENDS"]
