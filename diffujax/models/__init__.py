"""Networks only (no diffusion): GPT-2, the LLaMA family and Qwen2 behind one face.

Each family's network is a Flax NNX module built from its weight table:

    model = build(config, seed=0)                     # an nnx.Module (Llama, Qwen2, GPT2)
    logits = model(tokens, pattern)                   # [B, L, V] float32

Training, checkpoints and the converters hold its state as a plain pytree (nested dicts of arrays
keyed by the weight table's paths, ``nnx.to_pure_dict``), and the network is a pure function of it
(the graph is split once per config; ``nnx.merge`` of the tree is a trace-time step):

    params = init_params(config, seed=0)              # {"embed": {"embedding": ...}, ...}
    logits = forward(config, params, tokens, pattern) # the same logits as model(...)
    apply_fn = apply_fn_for(config)                   # apply_fn(params, tokens, pattern, ...)
    cache = init_cache(config, batch, length)         # decoding: keys/values of every layer
    logits, cache = forward_cached(config, params, tokens, pattern, cache, offset)
    params = sharded_init(config, layout, seed=0)     # initialised in its shards
    shardings = param_shardings(config, layout)       # a NamedSharding per weight

Each family is one record (``family.Family``) in ``registry.FAMILIES``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from diffujax.models import params as ptree
from diffujax.models.cache import KVCache
from diffujax.models.configs import ConfigError, ModelConfig
from diffujax.models.family import Family
from diffujax.models.gpt2 import GPT2Config
from diffujax.models.llama import LlamaConfig
from diffujax.models.params import Params, ParamSpec, flatten, nest
from diffujax.models.qwen2 import Qwen2Config
from diffujax.models.registry import FAMILIES, config_from_hf, family_of, weight_axes
from diffujax.parallel.mesh import Layout


def param_specs(config: ModelConfig) -> dict[str, ParamSpec]:
    """The weight table: every weight's path in the module tree, shape, logical axes and
    initialiser."""
    return family_of(config).module.weight_table(config)


def matmul_params(config: ModelConfig) -> int:
    """Parameters that take part in a matmul per token (the ``N`` of ``6 N``), read off the
    weight table: every weight with an ``embed`` axis and another non-``layers`` axis, except the
    tables that are only indexed; a tied embedding counts once, as the output head."""
    family, total = family_of(config), 0
    for path, spec in param_specs(config).items():
        axes = [a for a in spec.axes if a != "layers"]
        if path in family.lookups or "embed" not in axes or len(axes) < 2:
            continue
        if path == family.embedding and not config.tie_word_embeddings:
            continue
        total += math.prod(spec.shape)
    return total


def build(config: ModelConfig, seed: int = 0) -> nnx.Module:
    """The family's NNX model with fresh weights (``config.param_dtype``), as the weight table
    says, drawn from ``seed``."""
    return family_of(config).module(config, rngs=nnx.Rngs(seed))


def abstract_model(config: ModelConfig) -> nnx.Module:
    """The model with ``ShapeDtypeStruct`` s for weights: no memory, nothing computed. (Built as a
    plain pytree, so that flax does not turn the logical axes into shardings of whatever mesh
    is current: shardings come from the rule table, ``param_shardings``.)"""
    return nnx.eval_shape(lambda: build(config), graph=False)


@functools.cache
def graphdef(config: ModelConfig) -> nnx.GraphDef:
    """The model's graph without its weights, split once per config:
    ``nnx.merge(graphdef(config), params)`` is the model holding ``params``."""
    return nnx.split(abstract_model(config))[0]


def merge(config: ModelConfig, params: Params) -> nnx.Module:
    """The model holding ``params`` (a plain tree laid out as the weight table)."""
    return nnx.merge(graphdef(config), params)


def init_params(config: ModelConfig, seed: int = 0) -> Params:
    """Freshly initialised weights (``config.param_dtype``) as a plain tree."""
    return nnx.to_pure_dict(nnx.state(build(config, seed)))


def abstract_params(config: ModelConfig) -> Params:
    """The parameter tree as ``ShapeDtypeStruct`` s (no memory: restore targets, compiling)."""
    dtype = jnp.dtype(config.param_dtype)
    return ptree.map_specs(lambda _, spec: jax.ShapeDtypeStruct(spec.shape, dtype),
                           param_specs(config))


def forward(config: ModelConfig, params: Params, tokens, pattern, positions=None,
            dropout_key=None, split_head: bool = False):
    """tokens ``[B, L]`` -> float32 logits ``[B, L, V]``. ``dropout_key``: training only (GPT-2's
    dropout); without it nothing is dropped. ``split_head``: ``(hidden [B, L, D], head)``
    instead, ``head(hidden[:, i:j]) == logits[:, i:j]`` (a chunked loss's form)."""
    return merge(config, params)(tokens, pattern, positions, dropout_key, split_head)


def init_cache(config: ModelConfig, batch: int, length: int) -> KVCache:
    """An empty KV cache for ``batch`` rows of ``length`` positions (``models/cache.py``), in the
    compute dtype. Refuses a length beyond the model's positions."""
    _check_cache_length(config, length)
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    return KVCache(*(jnp.zeros(shape, jnp.dtype(config.dtype)) for _ in "kv"))


def _check_cache_length(config: ModelConfig, length: int) -> None:
    if not 1 <= length <= config.max_positions:
        raise ValueError(f"KV cache of {length} positions: must be 1..{config.max_positions},"
                         " the model's positions")


def forward_cached(config: ModelConfig, params: Params, tokens, pattern, cache: KVCache,
                   offset):
    """tokens ``[B, n]`` at canvas positions ``offset .. offset + n - 1`` (``offset`` may be
    traced) against ``cache`` -> (float32 logits ``[B, n, V]``, the cache with their keys and
    values written in). Attention sees cache slots below ``offset + n`` that ``pattern``
    opens: the canvas forward pass restricted to these queries, for a block-causal pattern."""
    _check_cache_length(config, cache.length)
    if tokens.shape[1] > cache.length:
        raise ValueError(f"{tokens.shape[1]} tokens do not fit a KV cache of {cache.length}")
    return merge(config, params).decode(tokens, pattern, cache, offset)


def cached_fn_for(config: ModelConfig):
    """``cached_fn(params, tokens, pattern, cache, offset) -> (logits, cache)``: the cached
    forward pass with its config bound, the form the decoders take."""
    return functools.partial(forward_cached, config)


def apply_fn_for(config: ModelConfig):
    """``apply_fn(params, tokens, pattern, positions=None, dropout_key=None, split_head=False)``:
    the forward pass with its config bound, the form the diffusion code and the train step
    take."""
    return functools.partial(forward, config)


def param_shardings(config: ModelConfig, layout: Layout) -> Params:
    """A ``NamedSharding`` per weight, from its logical axes through the layout's rules."""
    return ptree.map_specs(lambda _, spec: layout.sharding(spec.axes, spec.shape),
                           param_specs(config))


def sharded_init(config: ModelConfig, layout: Layout, seed: int = 0) -> Params:
    """Freshly initialised weights created directly in their shards: the initialiser is jitted
    with ``out_shardings``, so no host ever holds a full copy."""
    init = jax.jit(lambda: init_params(config, seed),
                   out_shardings=param_shardings(config, layout))
    with jax.set_mesh(layout.mesh):
        return init()


__all__ = ["FAMILIES", "ConfigError", "Family", "GPT2Config", "KVCache", "LlamaConfig",
           "ModelConfig", "Params", "Qwen2Config", "abstract_model", "abstract_params",
           "apply_fn_for", "build",
           "graphdef", "merge",
           "cached_fn_for", "config_from_hf", "family_of", "flatten", "forward",
           "forward_cached", "init_cache", "init_params", "matmul_params", "nest",
           "param_shardings", "param_specs", "sharded_init", "weight_axes"]
