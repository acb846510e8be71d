"""The cached block decoder (and the AR decoder, its blocks of one token) compiled by the real TPU
compiler for a 4-chip v5e and v5p slice: weights sharded as in training (fsdp x tensor), prompts
and the KV cache split over the batch axes; the whole decode is one program (the while loop of
docs/algorithms.md §9), and the cache's two arrays are its donated buffers."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from diffujax.diffusion.decoding import canvas_length, decode_blocks
from diffujax.models import (KVCache, LlamaConfig, abstract_params, cached_fn_for,
                             param_shardings)
from diffujax.parallel.mesh import Layout

from tpu_testlib import mesh

CONFIG = LlamaConfig(vocab_size=512, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=4,
                     intermediate_size=512, max_positions=1024, mask_token_id=511,
                     dtype="bfloat16", param_dtype="float32", block_size=32)
BATCH, WIDTH, NEW = 4, 64, 128


@pytest.mark.parametrize("chip, block_size", [("v5e", 32), ("v5p", 32), ("v5e", 1)],
                         ids=["v5e-blocks", "v5p-blocks", "v5e-ar"])
def test_cached_decoder_compiles_for_tpu(chip, block_size):
    m = mesh(chip)
    sd = jax.ShapeDtypeStruct
    batch = NamedSharding(m, P(("data", "fsdp")))
    shardings = param_shardings(CONFIG, Layout(m))
    params = jax.tree.map(lambda a, s: sd(a.shape, a.dtype, sharding=s),
                          abstract_params(CONFIG), shardings)
    length = canvas_length(WIDTH, NEW, block_size)
    cache_shape = (CONFIG.num_layers, BATCH, length, CONFIG.num_kv_heads, CONFIG.head_dim)
    cache_sharding = NamedSharding(m, P(None, ("data", "fsdp")))
    cache = KVCache(*(sd(cache_shape, jnp.bfloat16, sharding=cache_sharding),) * 2)
    prompt = sd((BATCH, WIDTH), jnp.int32, sharding=batch)
    lengths = sd((BATCH,), jnp.int32, sharding=batch)
    key = jax.random.key(0)
    with Layout(m).active():
        lowered = decode_blocks.lower(
            cached_fn_for(CONFIG), params, prompt, lengths, cache, key, block_size=block_size,
            new_tokens=NEW, mask_token_id=CONFIG.mask_token_id, sampler="threshold",
            eos_token_id=2)
        compiled = lowered.compile()
    hlo = compiled.as_text()
    assert "while" in hlo
    # the cache's two arrays are donated buffers (returned, so XLA can write into them in place)
    header = hlo.split("entry_computation_layout")[0]
    assert len(re.findall(r"\((\d+), \{\}\)", header.split("buffer_donor=")[-1])) == 2, header
