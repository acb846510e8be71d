"""Tiny float32 models of each family with non-trivial weights everywhere (the default
initialisation leaves biases at 0 and norm scales at 1, which would hide a dropped term)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffujax.models import GPT2Config, LlamaConfig, Qwen2Config, init_params

VOCAB = 64
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
             bos_token_id=1, eos_token_id=2, mask_token_id=VOCAB - 1)
CONFIGS = {
    "llama": LlamaConfig(**SHAPE, num_kv_heads=2, max_positions=48, rope_theta=500.0,
                         tie_word_embeddings=False),
    "qwen2": Qwen2Config(**SHAPE, num_kv_heads=1, max_positions=48, rope_theta=1e4),
    "gpt2": GPT2Config(**SHAPE, num_kv_heads=4, max_positions=48),
}


def tiny_model(family: str, seed: int = 0, **changes):
    """``(config, params)``: every weight drawn around its default (norm scales near 1)."""
    config = CONFIGS[family].replace(**changes)
    params = init_params(config, seed)
    leaves, tree = jax.tree.flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = []
    for (path, leaf), key in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        noise = 0.2 * jax.random.normal(key, leaf.shape, leaf.dtype)
        scale = ("norm" in name or "scale" in name)
        noisy.append(1.0 + noise if scale else leaf + noise)
    return config, jax.tree.unflatten(tree, noisy)


def canvas(batch: int, length: int, seed: int = 0):
    """Random tokens that avoid the mask token."""
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB - 1, jnp.int32)
