"""Networks only (no diffusion): GPT-2, the LLaMA family and Qwen2 behind one face.

    model = create_model(config, seed=0)          # an NNX module
    logits = model(tokens, pattern)               # [B, L, V] float32
    apply_fn, params = functional(model)          # pure: apply_fn(params, tokens, pattern)
    apply_fn, params = sharded_init(config, mesh, rules, seed=0)   # initialised in its shards

Each family is one record (``family.Family``) in ``registry.FAMILIES``.
"""

from __future__ import annotations

import jax
from flax import nnx

from diffujax.models.configs import ConfigError, ModelConfig
from diffujax.models.family import Family
from diffujax.models.gpt2 import GPT2Config
from diffujax.models.llama import LlamaConfig
from diffujax.models.params import ParamSpec
from diffujax.models.qwen2 import Qwen2Config
from diffujax.models.registry import (FAMILIES, config_class, config_from_hf, family_of,
                                      weight_axes)
from diffujax.parallel.mesh import param_shardings


def param_specs(config: ModelConfig) -> dict[str, ParamSpec]:
    return family_of(config).param_specs(config)


def matmul_params(config: ModelConfig) -> int:
    """Parameters in a matmul per token (the ``N`` of ``6 N``), from the family's weight table."""
    return family_of(config).matmul_params(config)


def create_model(config: ModelConfig, seed: int = 0) -> nnx.Module:
    return family_of(config).module(config, jax.random.key(seed))


def abstract_model(config: ModelConfig) -> nnx.Module:
    """The model with ShapeDtypeStruct leaves: no memory allocated (for restore targets)."""
    return nnx.eval_shape(lambda: create_model(config))


def functional(model: nnx.Module):
    """Split a model into a pure ``apply_fn(params, tokens, pattern, positions=None)`` and its
    parameter state (an ``nnx.State`` pytree): jit functions of the state, not of the module."""
    graphdef, params = nnx.split(model, nnx.Param)

    def apply_fn(params, tokens, pattern, positions=None, dropout_key=None):
        model = nnx.merge(graphdef, params)
        if dropout_key is None:  # evaluation and sampling: never any dropout
            return model(tokens, pattern, positions)
        return model(tokens, pattern, positions, dropout_key=dropout_key)

    return apply_fn, params


def sharded_init(config: ModelConfig, mesh, rules=None, seed: int = 0):
    """``(apply_fn, params)`` of a freshly initialised model, created directly in its shards: the
    initialiser is jitted with ``out_shardings``, so no host ever holds a full copy."""
    apply_fn, abstract = functional(abstract_model(config))
    shardings = param_shardings(abstract, mesh, rules)
    init = jax.jit(lambda: functional(create_model(config, seed))[1], out_shardings=shardings)
    with jax.set_mesh(mesh):
        return apply_fn, init()


__all__ = ["FAMILIES", "ConfigError", "Family", "GPT2Config", "LlamaConfig", "ModelConfig",
           "Qwen2Config", "abstract_model", "config_class", "config_from_hf", "create_model",
           "family_of", "functional", "matmul_params", "param_specs", "sharded_init", "weight_axes"]
