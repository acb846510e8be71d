"""Reference attention in plain XLA: the ground truth for every kernel and the CPU default."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from diffujax.attention import residuals
from diffujax.attention.pattern import AttentionPattern, dense_mask


def reference_attention(q, k, v, pattern: AttentionPattern):
    """Softmax attention with a dense mask built from ``pattern``.

    q: ``[B, Lq, H, D]``; k, v: ``[B, Lk, KVH, D]`` with ``H`` a multiple of ``KVH`` (grouped-query
    attention: each K/V head serves ``H // KVH`` query heads, no repeated copy is made).
    Scores (scaled by ``D ** -0.5``) and softmax are float32; the output has q's dtype.
    """
    return masked_attention(q, k, v, dense_mask(pattern, q.shape[1], k.shape[1]))


def masked_attention(q, k, v, mask):
    """``reference_attention`` under an explicit boolean ``mask``, ``[Lq, Lk]`` or
    ``[B, Lq, Lk]`` (true: the query may see the key); also what decoding runs against its
    KV cache (``models/cache.py``)."""
    b, lq, h, d = q.shape
    kvh = k.shape[2]
    if h % kvh:
        raise ValueError(f"query heads {h} are not a multiple of key/value heads {kvh}")
    qg = q.reshape(b, lq, kvh, h // kvh, d)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) * d ** -0.5
    mask = mask[None, None, None] if mask.ndim == 2 else mask[:, None, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    # named for a remat policy (residuals.py); there is no log-sum-exp to name here
    return checkpoint_name(out.reshape(b, lq, h, d).astype(q.dtype), residuals.OUTPUT)
