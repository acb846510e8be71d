"""Building blocks shared by the families: norms, rotary embedding, MLPs, projections."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def rms_norm(x, scale, eps):
    """LLaMA RMSNorm: statistics in float32, scale applied after casting back (as HF does)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * xf.astype(x.dtype)


def layer_norm(x, scale, bias, eps):
    """GPT-2 LayerNorm, computed in float32."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: tuple | None):
    """Inverse frequencies of the rotary embedding, with Llama-3 or linear scaling (float32)."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv
    if scaling[0] == "linear":
        return inv / scaling[1]
    # Llama-3: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
    _, factor, low_ff, high_ff, original_len = scaling
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = original_len / low_ff, original_len / high_ff
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (original_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_tables(positions, inv_freq, dtype):
    """cos/sin ``[B, L, 1, head_dim]`` in Hugging Face's rotate-half layout."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on ``[B, L, heads, head_dim]`` (the layout HF checkpoints store q/k in)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def dense(x, w, spec: str):
    """einsum in the activations' dtype; weights cast from their parameter dtype."""
    return jnp.einsum(spec, x, w.astype(x.dtype))


def swiglu(x, w_gate, w_up, w_down):
    return dense(jax.nn.silu(dense(x, w_gate, "bld,df->blf")) * dense(x, w_up, "bld,df->blf"),
                 w_down, "blf,fd->bld")


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def scan_layers(block, x, stacked_params, remat: str = "none"):
    """Apply ``block(layer_params, x)`` for each slice of the stacked per-layer parameters."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat policy {remat!r} is not one of {tuple(REMAT_POLICIES)}")
    if remat != "none":
        block = jax.checkpoint(block, policy=REMAT_POLICIES[remat])
    x, _ = jax.lax.scan(lambda h, p: (block(p, h), None), x, stacked_params)
    return x


def dropout(x, rate: float, key):
    """Inverted dropout: zero each entry with probability ``rate``, scale the rest by
    ``1 / (1 - rate)`` (``rate == 0``: ``x`` unchanged)."""
    if rate <= 0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
