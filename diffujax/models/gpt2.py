"""GPT-2: learned positions, pre-LayerNorm blocks, GELU-tanh MLP, tied head."""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffujax.attention import AttentionPattern, attention
from diffujax.models import layers as L
from diffujax.models.cache import KVCache, scan_layers_cached, visible_keys
from diffujax.models.configs import (ConfigError, ModelConfig, block_size_from, diffusion_keys,
                                     extra_json, first_id, require, special_ids)
from diffujax.models.family import LM_HEAD, Entry, Family, KeyMap
from diffujax.models.params import ParamSpec
from diffujax.parallel.logical import HIDDEN, LOGITS, QUERY, constrain


@dataclasses.dataclass(frozen=True)
class GPT2Config(ModelConfig):
    family: ClassVar[str] = "gpt2"
    max_positions: int = 1024
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"
    # Training dropout, HF's names and meaning (a config.json without them means 0.1 each, as
    # in transformers); applied only when the model is called with a dropout key (training).
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0  # not applied (no dropout in the attention kernels); training warns

    _MODELED: ClassVar[tuple[str, ...]] = (
        "embd_pdrop", "resid_pdrop", "attn_pdrop", "vocab_size", "n_embd", "n_layer", "n_head",
        "n_inner", "n_positions", "layer_norm_epsilon", "activation_function",
        "tie_word_embeddings", "mask_token_id", "diffusion_block_size", "architectures",
        "model_type", "torch_dtype", "dtype", "n_ctx", "transformers_version",
    )

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "GPT2Config":
        a = "GPT-2"
        d = int(require(hf, "n_embd", a))
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"config.json key 'activation_function'={act!r} is not supported")
        for key, supported in (("scale_attn_by_inverse_layer_idx", False),
                               ("reorder_and_upcast_attn", False), ("scale_attn_weights", True)):
            if bool(hf.get(key, supported)) != supported:
                raise ConfigError(f"config.json key {key!r}={hf[key]!r} is not supported")
        cfg = cls(
            vocab_size=int(require(hf, "vocab_size", a)),
            hidden_size=d,
            num_layers=int(require(hf, "n_layer", a)),
            num_heads=int(require(hf, "n_head", a)),
            num_kv_heads=int(require(hf, "n_head", a)),
            intermediate_size=int(hf.get("n_inner") or 4 * d),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            mask_token_id=hf.get("mask_token_id"),
            block_size=block_size_from(hf),
            bos_token_id=first_id(hf.get("bos_token_id")),
            eos_token_id=first_id(hf.get("eos_token_id")),
            pad_token_id=first_id(hf.get("pad_token_id")),
            max_positions=int(hf.get("n_positions", 1024)),
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            activation=act,
            **{k: float(hf.get(k, 0.1)) for k in ("embd_pdrop", "resid_pdrop", "attn_pdrop")},
            extra_hf=extra_json(hf, cls._MODELED),
        )
        return cfg.replace(**overrides)

    def to_hf(self) -> dict:
        hf = json.loads(self.extra_hf)
        hf.update(
            architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=self.vocab_size,
            n_embd=self.hidden_size, n_layer=self.num_layers, n_head=self.num_heads,
            n_inner=(None if self.intermediate_size == 4 * self.hidden_size
                     else self.intermediate_size),
            n_positions=self.max_positions, n_ctx=self.max_positions,
            layer_norm_epsilon=self.layer_norm_eps, activation_function=self.activation,
            tie_word_embeddings=self.tie_word_embeddings, embd_pdrop=self.embd_pdrop,
            resid_pdrop=self.resid_pdrop, attn_pdrop=self.attn_pdrop,
        )
        special_ids(hf, self)
        diffusion_keys(hf, self)
        return hf


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


def _check_positions(c: GPT2Config, length: int, what: str):
    if length > c.max_positions:
        raise ValueError(f"{what} {length} exceeds GPT-2's learned positions ({c.max_positions})")


def _embed(c: GPT2Config, p, tokens, positions):
    dtype = jnp.dtype(c.dtype)
    if positions is None:
        positions = jnp.arange(tokens.shape[1])[None]
    return constrain(p["wte"].astype(dtype)[tokens] + p["wpe"].astype(dtype)[positions], HIDDEN)


def _layer(c: GPT2Config, drop: bool, w, x, attend):
    """One block; ``attend(q, k, v) -> (out, aux)`` is its attention (over the sequence, or
    against a KV cache). ``drop``: apply the residual dropout with the layer's ``w["key"]``.
    Returns ``(x, aux)``."""
    dtype = x.dtype
    h = L.layer_norm(x, w["ln1_scale"], w["ln1_bias"], c.layer_norm_eps)
    q = L.dense(h, w["wq"], "bld,dhk->blhk") + w["bq"].astype(dtype)
    k = L.dense(h, w["wk"], "bld,dhk->blhk") + w["bk"].astype(dtype)
    v = L.dense(h, w["wv"], "bld,dhk->blhk") + w["bv"].astype(dtype)
    a, aux = attend(constrain(q, QUERY), k, v)
    out = L.dense(a, w["wo"], "blhk,hkd->bld") + w["bo"].astype(dtype)
    x = x + (L.dropout(out, c.resid_pdrop, jax.random.fold_in(w["key"], 0)) if drop else out)
    h = L.layer_norm(x, w["ln2_scale"], w["ln2_bias"], c.layer_norm_eps)
    h = jax.nn.gelu(L.dense(h, w["w_fc"], "bld,df->blf") + w["b_fc"].astype(dtype),
                    approximate=c.activation != "gelu")
    out = L.dense(h, w["w_proj"], "blf,fd->bld") + w["b_proj"].astype(dtype)
    x = x + (L.dropout(out, c.resid_pdrop, jax.random.fold_in(w["key"], 1)) if drop else out)
    return constrain(x, HIDDEN), aux


def _head(c: GPT2Config, p, x):
    x = L.layer_norm(x, p["ln_f_scale"], p["ln_f_bias"], c.layer_norm_eps)
    head = p["wte"].T if c.tie_word_embeddings else p["lm_head"]
    logits = jnp.einsum("bld,dv->blv", x, head.astype(x.dtype),
                        preferred_element_type=jnp.float32)
    return constrain(logits, LOGITS)


def forward(c: GPT2Config, p, tokens, pattern: AttentionPattern, positions=None,
            dropout_key=None):
    """tokens ``[B, L]`` (``L <= max_positions``) -> float32 logits ``[B, L, V]``; ``p``: the
    parameter tree of ``param_specs(c)``.

    ``dropout_key`` (training only): HF GPT-2's dropout with the config's ``embd_pdrop`` on
    the embeddings and ``resid_pdrop`` on each attention and MLP output. ``attn_pdrop`` (on
    the attention probabilities) is not applied: the fused attention kernels have no
    dropout. Without a key (evaluation, sampling) nothing is dropped."""
    if positions is None:  # explicit positions (block diffusion's two streams repeat 0..L-1)
        _check_positions(c, tokens.shape[1], "sequence length")  # are the caller's to bound
    x = _embed(c, p, tokens, positions)
    drop = dropout_key is not None and (c.embd_pdrop > 0 or c.resid_pdrop > 0)
    if drop:
        x = L.dropout(x, c.embd_pdrop, jax.random.fold_in(dropout_key, c.num_layers))
    stacked = dict(p["layers"])
    if drop:  # one key per layer, scanned with the layer's weights
        stacked["key"] = jax.vmap(lambda i: jax.random.fold_in(dropout_key, i))(
            jnp.arange(c.num_layers))
    attend = lambda q, k, v: (attention(q, k, v, pattern, c.attention), None)  # noqa: E731
    x = L.scan_layers(lambda w, x: _layer(c, drop, w, x, attend)[0], x, stacked, c.remat)
    return _head(c, p, x)


def forward_cached(c: GPT2Config, p, tokens, pattern: AttentionPattern, cache: KVCache,
                   offset, positions=None):
    """tokens ``[B, n]`` at canvas positions ``offset .. offset + n - 1`` against ``cache``
    (``models/cache.py``) -> (float32 logits ``[B, n, V]``, the cache with their keys and
    values written at ``offset``). ``positions``: learned positions, default the canvas ones."""
    _check_positions(c, cache.length, "KV cache length")
    if positions is None:
        positions = offset + jnp.arange(tokens.shape[1])[None]
    x = _embed(c, p, tokens, positions)
    visible = visible_keys(pattern, offset, tokens.shape[1], cache.length)
    x, cache = scan_layers_cached(lambda w, x, attend: _layer(c, False, w, x, attend), x,
                                  p["layers"], cache, offset, visible)
    return _head(c, p, x), cache


# -- Hugging Face tensor names --------------------------------------------------------------------

# Prefixes of the three spellings: save_pretrained of GPT2LMHeadModel, the hub's bare GPT2Model
# names (openai-community/gpt2), and the DiffuGPT reference wrapper (embedding pulled out of the
# transformer as `embed_tokens`, the rest under `denoise_model`).
NAMINGS = {"transformers": "transformer.", "bare": "", "diffugpt": "denoise_model."}


def hf_keys(c: GPT2Config, naming: str = "transformers") -> KeyMap:
    p = NAMINGS[naming]
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    h = f"{p}h.{{i}}."
    wte = "embed_tokens.weight" if naming == "diffugpt" else f"{p}wte.weight"
    entries = [
        Entry(wte, ("wte",), (v, d)),
        Entry(f"{p}wpe.weight", ("wpe",), (c.max_positions, d)),
        Entry(h + "ln_1.weight", ("layers/ln1_scale",), (d,)),
        Entry(h + "ln_1.bias", ("layers/ln1_bias",), (d,)),
        # Conv1D weights are already [in, out]; c_attn is q|k|v concatenated on the output axis.
        Entry(h + "attn.c_attn.weight", ("layers/wq", "layers/wk", "layers/wv"), (d, 3 * d)),
        Entry(h + "attn.c_attn.bias", ("layers/bq", "layers/bk", "layers/bv"), (3 * d,)),
        Entry(h + "attn.c_proj.weight", ("layers/wo",), (d, d)),
        Entry(h + "attn.c_proj.bias", ("layers/bo",), (d,)),
        Entry(h + "ln_2.weight", ("layers/ln2_scale",), (d,)),
        Entry(h + "ln_2.bias", ("layers/ln2_bias",), (d,)),
        Entry(h + "mlp.c_fc.weight", ("layers/w_fc",), (d, f)),
        Entry(h + "mlp.c_fc.bias", ("layers/b_fc",), (f,)),
        Entry(h + "mlp.c_proj.weight", ("layers/w_proj",), (f, d)),
        Entry(h + "mlp.c_proj.bias", ("layers/b_proj",), (d,)),
        Entry(f"{p}ln_f.weight", ("ln_f_scale",), (d,)),
        Entry(f"{p}ln_f.bias", ("ln_f_bias",), (d,)),
    ]
    if not c.tie_word_embeddings:
        entries.append(Entry(LM_HEAD, ("lm_head",), (v, d), transpose=True))
    # The causal-mask buffers older transformers versions saved with the weights.
    return KeyMap(naming, tuple(entries), (r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$",))


def naming_of(names: list[str]) -> str:
    if any(n.startswith("denoise_model.") or n == "embed_tokens.weight" for n in names):
        return "diffugpt"
    if any(n.startswith("transformer.") for n in names):
        return "transformers"
    return "bare"


FAMILY = Family(
    name="gpt2", config=GPT2Config, forward=forward, forward_cached=forward_cached,
    param_specs=param_specs, hf_keys=hf_keys, embedding="wte", lookups=("wpe",),
    hf_model_types=("gpt2",),
    hf_architectures=("GPT2LMHeadModel", "GPT2Model"), namings=tuple(NAMINGS), naming_of=naming_of)
