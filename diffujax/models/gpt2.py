"""GPT-2: learned positions, pre-LayerNorm blocks, GELU-tanh MLP, tied head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffujax.attention import AttentionPattern, attention
from diffujax.models import layers as L
from diffujax.models.configs import GPT2Config
from diffujax.models.params import ParamSpec, ParamTree, get
from diffujax.parallel.logical import constrain


def param_specs(c: GPT2Config) -> dict[str, ParamSpec]:
    n, d, h, hd, f = c.num_layers, c.hidden_size, c.num_heads, c.head_dim, c.intermediate_size
    specs = {
        "wte": ParamSpec((c.vocab_size, d), ("vocab", "embed")),
        "wpe": ParamSpec((c.max_positions, d), ("positions", "embed"), std=0.01),
        "layers/ln1_scale": ParamSpec((n, d), ("layers", "embed"), "ones"),
        "layers/ln1_bias": ParamSpec((n, d), ("layers", "embed"), "zeros"),
        "layers/wq": ParamSpec((n, d, h, hd), ("layers", "embed", "heads", "head_dim")),
        "layers/wk": ParamSpec((n, d, h, hd), ("layers", "embed", "heads", "head_dim")),
        "layers/wv": ParamSpec((n, d, h, hd), ("layers", "embed", "heads", "head_dim")),
        "layers/bq": ParamSpec((n, h, hd), ("layers", "heads", "head_dim"), "zeros"),
        "layers/bk": ParamSpec((n, h, hd), ("layers", "heads", "head_dim"), "zeros"),
        "layers/bv": ParamSpec((n, h, hd), ("layers", "heads", "head_dim"), "zeros"),
        "layers/wo": ParamSpec((n, h, hd, d), ("layers", "heads", "head_dim", "embed")),
        "layers/bo": ParamSpec((n, d), ("layers", "embed"), "zeros"),
        "layers/ln2_scale": ParamSpec((n, d), ("layers", "embed"), "ones"),
        "layers/ln2_bias": ParamSpec((n, d), ("layers", "embed"), "zeros"),
        "layers/w_fc": ParamSpec((n, d, f), ("layers", "embed", "mlp")),
        "layers/b_fc": ParamSpec((n, f), ("layers", "mlp"), "zeros"),
        "layers/w_proj": ParamSpec((n, f, d), ("layers", "mlp", "embed")),
        "layers/b_proj": ParamSpec((n, d), ("layers", "embed"), "zeros"),
        "ln_f_scale": ParamSpec((d,), ("embed",), "ones"),
        "ln_f_bias": ParamSpec((d,), ("embed",), "zeros"),
    }
    if not c.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((d, c.vocab_size), ("embed", "vocab"))
    return specs


class GPT2(nnx.Module):
    def __init__(self, config: GPT2Config, key):
        self.config = config
        self.params = ParamTree(param_specs(config), jnp.dtype(config.param_dtype), key)

    def __call__(self, tokens, pattern: AttentionPattern, positions=None):
        """tokens ``[B, L]`` (``L <= max_positions``) -> float32 logits ``[B, L, V]``."""
        c, p = self.config, self.params
        dtype = jnp.dtype(c.dtype)
        if tokens.shape[1] > c.max_positions:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds GPT-2's learned positions"
                             f" ({c.max_positions})")
        if positions is None:
            positions = jnp.arange(tokens.shape[1])[None]
        x = get(p, "wte").astype(dtype)[tokens] + get(p, "wpe").astype(dtype)[positions]
        x = constrain(x, ("batch", "length", "embed"))
        approximate = c.activation != "gelu"

        def block(w, x):
            h = L.layer_norm(x, w["ln1_scale"], w["ln1_bias"], c.layer_norm_eps)
            q = L.dense(h, w["wq"], "bld,dhk->blhk") + w["bq"].astype(dtype)
            k = L.dense(h, w["wk"], "bld,dhk->blhk") + w["bk"].astype(dtype)
            v = L.dense(h, w["wv"], "bld,dhk->blhk") + w["bv"].astype(dtype)
            q = constrain(q, ("batch", "length", "heads", "head_dim"))
            a = attention(q, k, v, pattern, c.attention)
            x = x + L.dense(a, w["wo"], "blhk,hkd->bld") + w["bo"].astype(dtype)
            h = L.layer_norm(x, w["ln2_scale"], w["ln2_bias"], c.layer_norm_eps)
            h = jax.nn.gelu(L.dense(h, w["w_fc"], "bld,df->blf") + w["b_fc"].astype(dtype),
                            approximate=approximate)
            x = x + L.dense(h, w["w_proj"], "blf,fd->bld") + w["b_proj"].astype(dtype)
            return constrain(x, ("batch", "length", "embed"))

        stacked = {name: v[...] for name, v in vars(p.layers).items() if isinstance(v, nnx.Param)}
        x = L.scan_layers(block, x, stacked, c.remat)
        x = L.layer_norm(x, get(p, "ln_f_scale"), get(p, "ln_f_bias"), c.layer_norm_eps)
        head = get(p, "wte").T if c.tie_word_embeddings else get(p, "lm_head")
        logits = jnp.einsum("bld,dv->blv", x, head.astype(dtype), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab"))
