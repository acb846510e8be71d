"""The LLaMA family (LLaMA-2/3, SmolLM2, TinyLlama, Mistral without sliding window)."""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

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
class LlamaConfig(ModelConfig):
    family: ClassVar[str] = "llama"
    max_positions: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or ("llama3", factor, low_freq_factor, high_freq_factor, original_max_positions),
    # or ("linear", factor). Kept as a tuple so the config stays hashable (a static jit argument).
    rope_scaling: tuple | None = None
    explicit_head_dim: int | None = None

    # What config.json says about this family (a subclass such as Qwen2 changes these).
    HF_NAME: ClassVar[str] = "LLaMA"
    HF_MODEL_TYPE: ClassVar[str] = "llama"
    HF_ARCHITECTURE: ClassVar[str] = "LlamaForCausalLM"
    _MODELED: ClassVar[tuple[str, ...]] = (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "intermediate_size", "max_position_embeddings", "rms_norm_eps",
        "rope_theta", "rope_scaling", "rope_parameters", "head_dim", "tie_word_embeddings",
        "mask_token_id", "diffusion_block_size", "architectures",
        "model_type", "torch_dtype", "dtype", "hidden_act", "attention_bias", "mlp_bias",
        "transformers_version", "sliding_window",
    )

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_heads

    @classmethod
    def check_hf(cls, hf: dict) -> None:
        """Refuse config.json settings this family's forward pass does not implement."""
        for key, bad in (("attention_bias", True), ("mlp_bias", True)):
            if hf.get(key) is bad:
                raise ConfigError(f"config.json key {key!r}=true is not supported")
        if hf.get("sliding_window"):
            raise ConfigError("config.json key 'sliding_window' is set: sliding-window attention"
                              " is not supported")

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "LlamaConfig":
        a = cls.HF_NAME
        cls.check_hf(hf)
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json key 'hidden_act'={hf['hidden_act']!r} is not supported")
        # transformers 5.x moves rope_theta / rope_scaling into rope_parameters.
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or (
            rope if rope.get("rope_type", "default") != "default" else None)
        theta = float(hf.get("rope_theta", rope.get("rope_theta", 10000.0)))
        rope_scaling = None
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "llama3":
                rope_scaling = ("llama3", float(scaling["factor"]),
                                float(scaling["low_freq_factor"]),
                                float(scaling["high_freq_factor"]),
                                int(scaling["original_max_position_embeddings"]))
            elif kind == "linear":
                rope_scaling = ("linear", float(scaling["factor"]))
            elif kind not in (None, "default"):
                raise ConfigError(f"config.json: rope scaling type {kind!r} is not supported")
        heads = int(require(hf, "num_attention_heads", a))
        hidden = int(require(hf, "hidden_size", a))
        head_dim = hf.get("head_dim")
        cfg = cls(
            vocab_size=int(require(hf, "vocab_size", a)),
            hidden_size=hidden,
            num_layers=int(require(hf, "num_hidden_layers", a)),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            intermediate_size=int(require(hf, "intermediate_size", a)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            mask_token_id=hf.get("mask_token_id"),
            block_size=block_size_from(hf),
            bos_token_id=first_id(hf.get("bos_token_id")),
            eos_token_id=first_id(hf.get("eos_token_id")),
            pad_token_id=first_id(hf.get("pad_token_id")),
            max_positions=int(hf.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            explicit_head_dim=(int(head_dim) if head_dim and int(head_dim) != hidden // heads
                               else None),
            extra_hf=extra_json(hf, cls._MODELED),
        )
        return cfg.replace(**overrides)

    def hf_fields(self) -> dict:
        """The keys this family writes into config.json besides the shared ones."""
        return dict(attention_bias=False, mlp_bias=False)

    def to_hf(self) -> dict:
        hf = json.loads(self.extra_hf)
        hf.update(
            architectures=[self.HF_ARCHITECTURE], model_type=self.HF_MODEL_TYPE,
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_positions, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, hidden_act="silu",
            tie_word_embeddings=self.tie_word_embeddings, **self.hf_fields(),
        )
        special_ids(hf, self)
        if self.explicit_head_dim:
            hf["head_dim"] = self.explicit_head_dim
        if self.rope_scaling and self.rope_scaling[0] == "llama3":
            _, f, lo, hi, orig = self.rope_scaling
            hf["rope_scaling"] = dict(rope_type="llama3", factor=f, low_freq_factor=lo,
                                      high_freq_factor=hi, original_max_position_embeddings=orig)
        elif self.rope_scaling:
            hf["rope_scaling"] = dict(rope_type="linear", factor=self.rope_scaling[1])
        else:
            hf["rope_scaling"] = None
        diffusion_keys(hf, self)
        return hf


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


def project(h, w, name: str):
    """q, k or v of one layer: ``h @ w{name}``, plus ``b{name}`` where the family has that bias
    (Qwen2 has q/k/v biases; LLaMA none)."""
    y = L.dense(h, w[f"w{name}"], "bld,dhk->blhk")
    bias = w.get(f"b{name}")
    return y if bias is None else y + bias.astype(y.dtype)


def _embed(c: LlamaConfig, p, tokens, positions):
    """Token embeddings and the rotary tables of ``positions`` (default ``0..L-1``)."""
    dtype = jnp.dtype(c.dtype)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    rope = L.rope_tables(positions, L.rope_inverse_frequencies(c.head_dim, c.rope_theta,
                                                               c.rope_scaling), dtype)
    return constrain(p["embed"].astype(dtype)[tokens], HIDDEN), rope


def _layer(c: LlamaConfig, rope, w, x, attend):
    """One decoder layer; ``attend(q, k, v) -> (out, aux)`` is its attention (over the sequence,
    or against a KV cache). Returns ``(x, aux)``."""
    cos, sin = rope
    h = L.rms_norm(x, w["attn_norm"], c.rms_norm_eps)
    q = L.apply_rope(project(h, w, "q"), cos, sin)
    k = L.apply_rope(project(h, w, "k"), cos, sin)
    v = project(h, w, "v")
    a, aux = attend(constrain(q, QUERY), k, v)
    x = x + L.dense(a, w["wo"], "blhk,hkd->bld")
    h = L.rms_norm(x, w["mlp_norm"], c.rms_norm_eps)
    x = x + L.swiglu(h, w["w_gate"], w["w_up"], w["w_down"])
    return constrain(x, HIDDEN), aux


def _head(c: LlamaConfig, p, x):
    x = L.rms_norm(x, p["final_norm"], c.rms_norm_eps)
    head = p["embed"].T if c.tie_word_embeddings else p["lm_head"]
    logits = jnp.einsum("bld,dv->blv", x, head.astype(x.dtype),
                        preferred_element_type=jnp.float32)
    return constrain(logits, LOGITS)


def forward(c: LlamaConfig, p, tokens, pattern: AttentionPattern, positions=None,
            dropout_key=None):
    """tokens ``[B, L]`` -> float32 logits ``[B, L, V]``. ``p``: the parameter tree of
    ``param_specs(c)`` (or a variant's, such as Qwen2's with q/k/v biases). The family has no
    dropout, so ``dropout_key`` (passed by training to every family) changes nothing."""
    del dropout_key
    x, rope = _embed(c, p, tokens, positions)
    attend = lambda q, k, v: (attention(q, k, v, pattern, c.attention), None)  # noqa: E731
    x = L.scan_layers(lambda w, x: _layer(c, rope, w, x, attend)[0], x, p["layers"], c.remat)
    return _head(c, p, x)


def forward_cached(c: LlamaConfig, p, tokens, pattern: AttentionPattern, cache: KVCache,
                   offset, positions=None):
    """tokens ``[B, n]`` at canvas positions ``offset .. offset + n - 1`` against ``cache``
    (``models/cache.py``) -> (float32 logits ``[B, n, V]``, the cache with their keys and
    values written at ``offset``). ``positions``: RoPE positions, default the canvas ones."""
    if positions is None:
        positions = jnp.broadcast_to(offset + jnp.arange(tokens.shape[1]), tokens.shape)
    x, rope = _embed(c, p, tokens, positions)
    visible = visible_keys(pattern, offset, tokens.shape[1], cache.length)
    x, cache = scan_layers_cached(lambda w, x, attend: _layer(c, rope, w, x, attend), x,
                                  p["layers"], cache, offset, visible)
    return _head(c, p, x), cache


# -- Hugging Face tensor names --------------------------------------------------------------------


def hf_keys(c: LlamaConfig, naming: str = "transformers") -> KeyMap:
    d, f, v, h, kv, hd = (c.hidden_size, c.intermediate_size, c.vocab_size, c.num_heads,
                          c.num_kv_heads, c.head_dim)
    layer = "model.layers.{i}."
    entries = [
        Entry("model.embed_tokens.weight", ("embed",), (v, d)),
        Entry(layer + "input_layernorm.weight", ("layers/attn_norm",), (d,)),
        # q/k stay in HF's rotate-half layout: no permutation, only [out, in] -> [in, heads, hd].
        Entry(layer + "self_attn.q_proj.weight", ("layers/wq",), (h * hd, d), transpose=True),
        Entry(layer + "self_attn.k_proj.weight", ("layers/wk",), (kv * hd, d), transpose=True),
        Entry(layer + "self_attn.v_proj.weight", ("layers/wv",), (kv * hd, d), transpose=True),
        Entry(layer + "self_attn.o_proj.weight", ("layers/wo",), (d, h * hd), transpose=True),
        Entry(layer + "post_attention_layernorm.weight", ("layers/mlp_norm",), (d,)),
        Entry(layer + "mlp.gate_proj.weight", ("layers/w_gate",), (f, d), transpose=True),
        Entry(layer + "mlp.up_proj.weight", ("layers/w_up",), (f, d), transpose=True),
        Entry(layer + "mlp.down_proj.weight", ("layers/w_down",), (d, f), transpose=True),
        Entry("model.norm.weight", ("final_norm",), (d,)),
    ]
    if not c.tie_word_embeddings:
        entries.append(Entry(LM_HEAD, ("lm_head",), (v, d), transpose=True))
    return KeyMap(naming, tuple(entries), (r"rotary_emb\.inv_freq$",))


FAMILY = Family(
    name="llama", config=LlamaConfig, forward=forward, forward_cached=forward_cached,
    param_specs=param_specs, hf_keys=hf_keys, embedding="embed",
    hf_model_types=("llama", "mistral"),
    hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"))
