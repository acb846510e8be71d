"""Building blocks shared by the families: the operations (norms, rotary embedding, dropout) and
the Flax NNX modules built from them (embedding, norms, attention, MLPs), each taking its weights
from the family's weight table (``params.Weights``), the scan over a stacked block, and the
network around that block (``DecoderLM``)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from diffujax.attention import attention, residuals
from diffujax.models.cache import KVCache, scan_layers_cached, visible_keys
from diffujax.models.params import Weights
from diffujax.parallel.logical import LOGITS, QUERY, constrain


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
    """cos/sin ``[B, L, 1, head_dim / 2]``: one entry per rotated pair (``apply_rope``)."""
    angles = (positions.astype(jnp.float32)[..., None] * inv_freq)[:, :, None, :]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on ``[B, L, heads, head_dim]`` (the layout HF checkpoints store q/k in):
    entry ``i`` of the first half and ``i`` of the second are rotated as one pair by angle
    ``i``. Each half is computed from the half-width tables and the two are joined once; no
    negated copy of ``x``, no full-width tables (measured with the TPU compiler: fewer ops and
    bytes than the rotate-half form ``x * cos + concat(-x2, x1) * sin``, and than joining the
    halves through a stacked ``[..., 2, half]`` axis)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


_POLICIES = jax.checkpoint_policies

# What the backward pass of a scanned layer may read from the forward instead of recomputing it,
# in order of ever more recompute (and ever less memory): everything; every matmul without batch
# dimensions (the projections) and the attention kernel's output and log-sum-exp, so the
# attention forward never runs twice; the projections only (attention, norms and activations
# recomputed); nothing (the layer's input only: the whole layer runs twice).
REMAT_POLICIES = {
    "none": None,
    "dots_with_attention": _POLICIES.save_from_both_policies(
        _POLICIES.dots_with_no_batch_dims_saveable,
        _POLICIES.save_only_these_names(*residuals.NAMES)),
    "dots": _POLICIES.dots_with_no_batch_dims_saveable,
    "full": _POLICIES.nothing_saveable,
}


def scan_layers(block: nnx.Module, step, x, xs=None, remat: str = "none", scan: bool = True):
    """Run ``step(layer, x, xs_i) -> x`` once per layer of ``block``, an NNX module whose weights
    are stacked on a leading layers axis: the module is split once, and ``lax.scan`` merges each
    layer's slice of its state back into a one-layer module (the split/merge form of
    ``nnx.scan``). ``xs``: per-layer inputs scanned beside the weights (dropout keys), or None.
    ``remat``: the rematerialisation policy of each layer's step (``REMAT_POLICIES``).
    ``scan=False``: the same steps unrolled (``unrolled_layers``)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat policy {remat!r} is not one of {tuple(REMAT_POLICIES)}")
    graphdef, state = nnx.split(block)

    def body(h, sliced):
        layer_state, layer_xs = sliced
        return step(nnx.merge(graphdef, layer_state), h, layer_xs), None

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
    if not scan:
        return unrolled_layers(body, x, (state, xs))
    x, _ = jax.lax.scan(body, x, (state, xs))
    return x


def unrolled_layers(body, x, stacked):
    """``lax.scan(body, x, stacked)[0]`` as a Python loop over the layers: every stacked leaf is
    split once into its layers (``lax.split``, whose transpose is one ``concatenate`` of the
    layers' gradients). Each layer's activations saved for the backward pass are then buffers
    of their own, not slices written into (and read back out of) a scan's stacked buffers;
    the program grows with the number of layers."""
    leaves, tree = jax.tree.flatten(stacked)
    count = leaves[0].shape[0]
    per_leaf = [jax.lax.split(leaf, (1,) * count) for leaf in leaves]
    for i in range(count):
        layer = [jax.lax.squeeze(parts[i], (0,)) for parts in per_leaf]
        x, _ = body(x, jax.tree.unflatten(tree, layer))
    return x


def layer_keys(key, num_layers: int):
    """One key per layer, ``fold_in(key, i)``: scanned beside the layers' weights."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_layers))


def seed_adapter_dropout(layer: nnx.Module, key) -> None:
    """Give the modules of one layer of an adapted model (qwix marks its modules with
    ``qwix_path``) the rng stream qwix draws LoRA dropout from (``qwix_rngs``), seeded from the
    layer's dropout key; nothing on a model without adapters."""
    if not hasattr(layer, "qwix_path"):
        return
    rngs = nnx.Rngs(dropout=key)
    for _, module in nnx.iter_modules(layer):
        module.qwix_rngs = rngs


def dropout(x, rate: float, key):
    """Inverted dropout: zero each entry with probability ``rate``, scale the rest by
    ``1 / (1 - rate)`` (``rate == 0``: ``x`` unchanged)."""
    if rate <= 0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


# -- modules ---------------------------------------------------------------------------------------


class Embed(nnx.Module):
    """A lookup table ``[rows, embed]``: token embeddings (and, tied, the output head), or GPT-2's
    learned positions."""

    def __init__(self, weights: Weights):
        self.embedding = weights.param("embedding")

    def __call__(self, ids, dtype):
        return self.embedding[...].astype(dtype)[ids]


class RMSNorm(nnx.Module):
    def __init__(self, weights: Weights, eps: float):
        self.scale, self.eps = weights.param("scale"), eps

    def __call__(self, x):
        return rms_norm(x, self.scale[...], self.eps)


class LayerNorm(nnx.Module):
    def __init__(self, weights: Weights, eps: float):
        self.scale, self.bias, self.eps = weights.param("scale"), weights.param("bias"), eps

    def __call__(self, x):
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class Dense(nnx.Module):
    """One projection: ``einsum(equation, x, kernel)`` (+ ``bias`` where the family's table has
    one), in the activations' dtype. Each projection is its own module so that an adapter can
    target it by path (``.../q_proj``), as LoRA does."""

    def __init__(self, weights: Weights, equation: str):
        self.kernel, self.bias, self.equation = (weights.param("kernel"),
                                                 weights.optional("bias"), equation)

    def __call__(self, x):
        y = jnp.einsum(self.equation, x, self.kernel[...].astype(x.dtype))
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)


TO_HEADS, FROM_HEADS = "bld,dhk->blhk", "blhk,hkd->bld"
UP, DOWN = "bld,df->blf", "blf,fd->bld"


class Attention(nnx.Module):
    """The q/k/v/o projections around an attention function: ``q_proj``/``k_proj``/``v_proj``
    kernels ``[embed, heads, head_dim]`` and ``o_proj`` ``[heads, head_dim, embed]``, each with a
    bias where the family's table has one (GPT-2 all four, Qwen2 q/k/v, LLaMA none)."""

    def __init__(self, weights: Weights):
        self.q_proj, self.k_proj, self.v_proj = (Dense(weights.child(n), TO_HEADS)
                                                 for n in ("q_proj", "k_proj", "v_proj"))
        self.o_proj = Dense(weights.child("o_proj"), FROM_HEADS)

    def __call__(self, x, attend, rope=None):
        """``attend(q, k, v) -> (out, aux)``: attention over the sequence, or against a KV cache.
        ``rope``: the rotary tables ``(cos, sin)`` applied to q and k, or None. Returns the
        projected output and ``aux``."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        a, aux = attend(constrain(q, QUERY), k, v)
        return self.o_proj(a), aux


class SwiGLU(nnx.Module):
    """LLaMA's MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, weights: Weights):
        self.gate_proj, self.up_proj = (Dense(weights.child(n), UP)
                                        for n in ("gate_proj", "up_proj"))
        self.down_proj = Dense(weights.child("down_proj"), DOWN)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nnx.Module):
    """GPT-2's MLP: ``c_proj(gelu(c_fc(x)))``; tanh-approximated GELU unless ``exact``."""

    def __init__(self, weights: Weights, exact: bool):
        self.c_fc, self.c_proj = Dense(weights.child("c_fc"), UP), Dense(weights.child("c_proj"),
                                                                          DOWN)
        self.exact = exact

    def __call__(self, x):
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=not self.exact))


class DecoderLM(nnx.Module):
    """The network around a family's stacked block: embed, the layers (one scan), the final norm
    and the output head. ``model(tokens, pattern)`` -> float32 logits; ``model.decode(...)`` runs
    new tokens against a KV cache (``models/cache.py``). Weights come from
    ``weight_table(config)``, initialised from ``rngs``' params stream.

    A family defines ``weight_table``, ``_build(config, weights)`` (its modules: ``layers``,
    called ``layer(x, extra, attend, dropout_key) -> (x, aux)``; the untied ``lm_head`` is built
    here), ``_embed(tokens, positions, dropout_key) -> (x, extra)`` (``extra``: what every layer
    takes beside ``x``, LLaMA's rotary tables) and ``head_parts`` (final norm, embedding)."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        self.config = config
        # The table's keys are split from the seed key of rngs' params stream (not a draw from
        # it), so that Model(config, rngs=nnx.Rngs(seed)) holds the weights seed has always given.
        weights = Weights(self.weight_table(config), config.param_dtype, rngs.params.key[...])
        self._build(config, weights)
        self.lm_head = weights.optional("lm_head")
        weights.check_complete(type(self).__name__)

    def _default_positions(self, tokens, offset):
        return jnp.broadcast_to(offset + jnp.arange(tokens.shape[1]), tokens.shape)

    def _head_weight(self):
        """The output head's ``[embed, vocab]`` matrix (parameter dtype): the tied embedding,
        transposed, or the separate ``lm_head``."""
        embed = self.head_parts[1]
        return embed.embedding[...].T if self.lm_head is None else self.lm_head[...]

    def _logits(self, x, w):
        """Float32 logits of the last layer's output ``x``: final norm, then ``x @ w`` (``w``
        cast to the activations' dtype)."""
        h = self.head_parts[0](x)
        return constrain(jnp.einsum("bld,dv->blv", h, w.astype(h.dtype),
                                    preferred_element_type=jnp.float32), LOGITS)

    def __call__(self, tokens, pattern, positions=None, dropout_key=None,
                 split_head: bool = False):
        """tokens ``[B, L]`` -> float32 logits ``[B, L, V]``. ``positions``: default ``0..L-1``
        (block diffusion's two streams pass their own). ``dropout_key`` (training): the family's
        dropout and LoRA adapters'; without it nothing is dropped. ``split_head``: return
        ``(hidden, head)`` instead, the last layer's output ``[B, L, D]`` and the function taking
        any positions of it to their logits (a loss can then compute the logits a chunk at a
        time)."""
        c = self.config
        if positions is None:
            positions = self._default_positions(tokens, 0)
        x, extra = self._embed(tokens, positions, dropout_key)
        attend = lambda q, k, v: (attention(q, k, v, pattern, c.attention), None)  # noqa: E731
        keys = None if dropout_key is None else layer_keys(dropout_key, c.num_layers)
        x = scan_layers(self.layers, lambda layer, x, key: layer(x, extra, attend, key)[0], x,
                        keys, c.remat, c.scan_layers)
        if split_head:
            # The head's weight is gathered whole over FSDP once, here, outside the caller's loop
            # over chunks (inside it the TPU compiler re-gathers it per chunk, a windowed
            # einsum); it stays in the parameter dtype, so its gradient adds up over the chunks
            # in that dtype.
            w = constrain(self._head_weight(), ("activation_embed", "activation_vocab"))
            return x, lambda h: self._logits(h, w)
        return self._logits(x, self._head_weight())

    def decode(self, tokens, pattern, cache: KVCache, offset, positions=None):
        """tokens ``[B, n]`` at canvas positions ``offset .. offset + n - 1`` against ``cache``
        -> (float32 logits ``[B, n, V]``, the cache with their keys and values written at
        ``offset``). ``positions``: default the canvas ones."""
        if positions is None:
            positions = self._default_positions(tokens, offset)
        x, extra = self._embed(tokens, positions, None)
        visible = visible_keys(pattern, offset, tokens.shape[1], cache.length)
        x, cache = scan_layers_cached(self.layers, lambda layer, x, attend: layer(x, extra, attend),
                                      x, cache, offset, visible)
        return self._logits(x, self._head_weight()), cache
