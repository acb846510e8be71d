"""The LLaMA family (LLaMA-2/3, SmolLM2, TinyLlama, Mistral without sliding window)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from diffujax.attention import AttentionPattern, attention
from diffujax.models import layers as L
from diffujax.models.configs import LlamaConfig
from diffujax.models.params import ParamSpec, ParamTree, get
from diffujax.parallel.logical import constrain


def param_specs(c: LlamaConfig) -> dict[str, ParamSpec]:
    n, d, h, kv, hd, f = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                          c.intermediate_size)
    specs = {
        "embed": ParamSpec((c.vocab_size, d), ("vocab", "embed")),
        "layers/attn_norm": ParamSpec((n, d), ("layers", "embed"), "ones"),
        "layers/wq": ParamSpec((n, d, h, hd), ("layers", "embed", "heads", "head_dim")),
        "layers/wk": ParamSpec((n, d, kv, hd), ("layers", "embed", "kv_heads", "head_dim")),
        "layers/wv": ParamSpec((n, d, kv, hd), ("layers", "embed", "kv_heads", "head_dim")),
        "layers/wo": ParamSpec((n, h, hd, d), ("layers", "heads", "head_dim", "embed")),
        "layers/mlp_norm": ParamSpec((n, d), ("layers", "embed"), "ones"),
        "layers/w_gate": ParamSpec((n, d, f), ("layers", "embed", "mlp")),
        "layers/w_up": ParamSpec((n, d, f), ("layers", "embed", "mlp")),
        "layers/w_down": ParamSpec((n, f, d), ("layers", "mlp", "embed")),
        "final_norm": ParamSpec((d,), ("embed",), "ones"),
    }
    if not c.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((d, c.vocab_size), ("embed", "vocab"))
    return specs


class Llama(nnx.Module):
    def __init__(self, config: LlamaConfig, key):
        self.config = config
        self.params = ParamTree(param_specs(config), jnp.dtype(config.param_dtype), key)

    def __call__(self, tokens, pattern: AttentionPattern, positions=None):
        """tokens ``[B, L]`` -> float32 logits ``[B, L, V]``."""
        c, p = self.config, self.params
        dtype = jnp.dtype(c.dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        cos, sin = L.rope_tables(positions, L.rope_inverse_frequencies(c.head_dim, c.rope_theta,
                                                                       c.rope_scaling), dtype)
        x = constrain(get(p, "embed").astype(dtype)[tokens], ("batch", "length", "embed"))

        def block(w, x):
            h = L.rms_norm(x, w["attn_norm"], c.rms_norm_eps)
            q = L.apply_rope(L.dense(h, w["wq"], "bld,dhk->blhk"), cos, sin)
            k = L.apply_rope(L.dense(h, w["wk"], "bld,dhk->blhk"), cos, sin)
            v = L.dense(h, w["wv"], "bld,dhk->blhk")
            q = constrain(q, ("batch", "length", "heads", "head_dim"))
            a = attention(q, k, v, pattern, c.attention)
            x = x + L.dense(a, w["wo"], "blhk,hkd->bld")
            h = L.rms_norm(x, w["mlp_norm"], c.rms_norm_eps)
            x = x + L.swiglu(h, w["w_gate"], w["w_up"], w["w_down"])
            return constrain(x, ("batch", "length", "embed"))

        stacked = {name: v[...] for name, v in vars(p.layers).items() if isinstance(v, nnx.Param)}
        x = L.scan_layers(block, x, stacked, c.remat)
        x = L.rms_norm(x, get(p, "final_norm"), c.rms_norm_eps)
        head = get(p, "embed").T if c.tie_word_embeddings else get(p, "lm_head")
        logits = jnp.einsum("bld,dv->blv", x, head.astype(dtype), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab"))
