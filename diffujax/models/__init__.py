"""Networks only (no diffusion): GPT-2, the LLaMA family and Qwen2 behind one face.

Parameters are a plain pytree (nested dicts of arrays keyed by the family's ``ParamSpec`` paths)
and the network is a pure function of them:

    params = init_params(config, seed=0)              # {"embed": ..., "layers": {"wq": ...}}
    logits = forward(config, params, tokens, pattern) # [B, L, V] float32
    apply_fn = apply_fn_for(config)                   # apply_fn(params, tokens, pattern, ...)
    cache = init_cache(config, batch, length)         # decoding: keys/values of every layer
    logits, cache = forward_cached(config, params, tokens, pattern, cache, offset)
    params = sharded_init(config, mesh, rules, seed=0)    # initialised in its shards
    shardings = param_shardings(config, mesh, rules)      # a NamedSharding per weight

Each family is one record (``family.Family``) in ``registry.FAMILIES``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from diffujax.models import params as ptree
from diffujax.models.cache import KVCache, empty_cache
from diffujax.models.configs import ConfigError, ModelConfig
from diffujax.models.family import Family
from diffujax.models.gpt2 import GPT2Config
from diffujax.models.llama import LlamaConfig
from diffujax.models.params import Params, ParamSpec, flatten, nest
from diffujax.models.qwen2 import Qwen2Config
from diffujax.models.registry import (FAMILIES, config_class, config_from_hf, family_of,
                                      weight_axes)
from diffujax.parallel.mesh import spec_for


def param_specs(config: ModelConfig) -> dict[str, ParamSpec]:
    return family_of(config).param_specs(config)


def matmul_params(config: ModelConfig) -> int:
    """Parameters in a matmul per token (the ``N`` of ``6 N``), from the family's weight table."""
    return family_of(config).matmul_params(config)


def init_params(config: ModelConfig, seed: int = 0) -> Params:
    """Freshly initialised weights (``config.param_dtype``), as the weight table says."""
    return ptree.init_params(param_specs(config), jnp.dtype(config.param_dtype),
                             jax.random.key(seed))


def abstract_params(config: ModelConfig) -> Params:
    """The parameter tree as ``ShapeDtypeStruct`` s (no memory: restore targets, compiling)."""
    return ptree.abstract_params(param_specs(config), config.param_dtype)


def forward(config: ModelConfig, params: Params, tokens, pattern, positions=None,
            dropout_key=None):
    """tokens ``[B, L]`` -> float32 logits ``[B, L, V]``. ``dropout_key``: training only (GPT-2's
    dropout); without it nothing is dropped."""
    return family_of(config).forward(config, params, tokens, pattern, positions, dropout_key)


def init_cache(config: ModelConfig, batch: int, length: int) -> KVCache:
    """An empty KV cache for ``batch`` rows of ``length`` positions (``models/cache.py``), in the
    compute dtype. Refuses a length beyond the model's positions."""
    _check_cache_length(config, length)
    return empty_cache(config.num_layers, batch, length, config.num_kv_heads, config.head_dim,
                       jnp.dtype(config.dtype))


def _check_cache_length(config: ModelConfig, length: int) -> None:
    limit = getattr(config, "max_positions", None)
    if length < 1 or (limit is not None and length > limit):
        raise ValueError(f"KV cache of {length} positions: must be 1..{limit}, the model's"
                         " positions")


def forward_cached(config: ModelConfig, params: Params, tokens, pattern, cache: KVCache,
                   offset):
    """tokens ``[B, n]`` at canvas positions ``offset .. offset + n - 1`` (``offset`` may be
    traced) against ``cache`` -> (float32 logits ``[B, n, V]``, the cache with their keys and
    values written in). Attention sees cache slots below ``offset + n`` that ``pattern``
    opens: the canvas forward pass restricted to these queries, for a block-causal pattern."""
    _check_cache_length(config, cache.length)
    if tokens.shape[1] > cache.length:
        raise ValueError(f"{tokens.shape[1]} tokens do not fit a KV cache of {cache.length}")
    return family_of(config).forward_cached(config, params, tokens, pattern, cache, offset)


def cached_fn_for(config: ModelConfig):
    """``cached_fn(params, tokens, pattern, cache, offset) -> (logits, cache)``: the cached
    forward pass with its config bound, the form the decoders take."""
    return functools.partial(forward_cached, config)


def apply_fn_for(config: ModelConfig):
    """``apply_fn(params, tokens, pattern, positions=None, dropout_key=None)``: the forward pass
    with its config bound, the form the diffusion code and the train step take."""
    return functools.partial(forward, config)


def param_shardings(config: ModelConfig, mesh, rules=None) -> Params:
    """A ``NamedSharding`` per weight, from its logical axes through ``rules``."""
    def sharding(_, spec):
        return NamedSharding(mesh, spec_for(spec.axes, spec.shape, mesh, rules))

    return ptree.map_specs(sharding, param_specs(config))


def sharded_init(config: ModelConfig, mesh, rules=None, seed: int = 0) -> Params:
    """Freshly initialised weights created directly in their shards: the initialiser is jitted
    with ``out_shardings``, so no host ever holds a full copy."""
    init = jax.jit(lambda: init_params(config, seed),
                   out_shardings=param_shardings(config, mesh, rules))
    with jax.set_mesh(mesh):
        return init()


__all__ = ["FAMILIES", "ConfigError", "Family", "GPT2Config", "KVCache", "LlamaConfig",
           "ModelConfig", "Params", "Qwen2Config", "abstract_params", "apply_fn_for",
           "cached_fn_for", "config_class", "config_from_hf", "family_of", "flatten", "forward",
           "forward_cached", "init_cache", "init_params", "matmul_params", "nest",
           "param_shardings", "param_specs", "sharded_init", "weight_axes"]
