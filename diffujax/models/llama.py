"""The LLaMA family (LLaMA-2/3, SmolLM2, TinyLlama, Mistral without sliding window)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from diffujax.models import layers as L
from diffujax.models.configs import (SHARED_KEYS, ConfigError, ModelConfig, require,
                                     shared_from_hf, shared_to_hf)
from diffujax.models.family import LM_HEAD, Entry, Family, KeyMap
from diffujax.models.params import ParamSpec, Weights
from diffujax.parallel.logical import HIDDEN, constrain


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
    _MODELED: ClassVar[tuple[str, ...]] = SHARED_KEYS + (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "intermediate_size", "max_position_embeddings", "rms_norm_eps",
        "rope_theta", "rope_scaling", "rope_parameters", "head_dim", "tie_word_embeddings",
        "hidden_act", "attention_bias", "mlp_bias", "sliding_window")

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
        a = cls.HF_NAME
        heads, hidden = require(hf, "num_attention_heads", a), require(hf, "hidden_size", a)
        head_dim = hf.get("head_dim")
        return cls(
            vocab_size=require(hf, "vocab_size", a), hidden_size=hidden,
            num_layers=require(hf, "num_hidden_layers", a), num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            intermediate_size=require(hf, "intermediate_size", a),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_positions=int(hf.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta,
            rope_scaling=rope_scaling,
            explicit_head_dim=(int(head_dim) if head_dim and int(head_dim) != hidden // heads
                               else None),
            **shared_from_hf(hf, cls._MODELED),
        ).replace(**overrides)

    def hf_fields(self) -> dict:
        """The keys this family writes into config.json besides the shared ones."""
        return dict(attention_bias=False, mlp_bias=False)

    def to_hf(self) -> dict:
        if self.rope_scaling and self.rope_scaling[0] == "llama3":
            _, f, lo, hi, orig = self.rope_scaling
            scaling = dict(rope_type="llama3", factor=f, low_freq_factor=lo, high_freq_factor=hi,
                           original_max_position_embeddings=orig)
        elif self.rope_scaling:
            scaling = dict(rope_type="linear", factor=self.rope_scaling[1])
        else:
            scaling = None
        head_dim = {"head_dim": self.explicit_head_dim} if self.explicit_head_dim else {}
        return shared_to_hf(
            self, architectures=[self.HF_ARCHITECTURE], model_type=self.HF_MODEL_TYPE,
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_positions, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, hidden_act="silu",
            tie_word_embeddings=self.tie_word_embeddings, rope_scaling=scaling, **head_dim,
            **self.hf_fields())


def param_specs(c: LlamaConfig) -> dict[str, ParamSpec]:
    n, d, h, kv, hd, f = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                          c.intermediate_size)
    heads = ("layers", "embed", "heads", "head_dim")
    kv_heads = ("layers", "embed", "kv_heads", "head_dim")
    specs = {
        "embed/embedding": ParamSpec((c.vocab_size, d), ("vocab", "embed")),
        "layers/attn_norm/scale": ParamSpec((n, d), ("layers", "embed"), "ones"),
        "layers/attn/q_proj/kernel": ParamSpec((n, d, h, hd), heads),
        "layers/attn/k_proj/kernel": ParamSpec((n, d, kv, hd), kv_heads),
        "layers/attn/v_proj/kernel": ParamSpec((n, d, kv, hd), kv_heads),
        "layers/attn/o_proj/kernel": ParamSpec((n, h, hd, d),
                                               ("layers", "heads", "head_dim", "embed")),
        "layers/mlp_norm/scale": ParamSpec((n, d), ("layers", "embed"), "ones"),
        "layers/mlp/gate_proj/kernel": ParamSpec((n, d, f), ("layers", "embed", "mlp")),
        "layers/mlp/up_proj/kernel": ParamSpec((n, d, f), ("layers", "embed", "mlp")),
        "layers/mlp/down_proj/kernel": ParamSpec((n, f, d), ("layers", "mlp", "embed")),
        "final_norm/scale": ParamSpec((d,), ("embed",), "ones"),
    }
    if not c.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((d, c.vocab_size), ("embed", "vocab"))
    return specs


class LlamaBlock(nnx.Module):
    """One decoder layer (pre-RMSNorm attention with RoPE, then a SwiGLU MLP); its weights hold
    every layer, stacked (``layers.scan_layers`` runs it once per layer)."""

    def __init__(self, c: LlamaConfig, weights: Weights):
        self.attn_norm = L.RMSNorm(weights.child("attn_norm"), c.rms_norm_eps)
        self.attn = L.Attention(weights.child("attn"))
        self.mlp_norm = L.RMSNorm(weights.child("mlp_norm"), c.rms_norm_eps)
        self.mlp = L.SwiGLU(weights.child("mlp"))

    def __call__(self, x, rope, attend, dropout_key=None):
        """``attend(q, k, v) -> (out, aux)``: see ``layers.Attention``. ``dropout_key``: this
        layer's key in training (the family has no dropout of its own; LoRA adapters may).
        Returns ``(x, aux)``."""
        if dropout_key is not None:
            L.seed_adapter_dropout(self, dropout_key)
        a, aux = self.attn(self.attn_norm(x), attend, rope)
        x = x + a
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, HIDDEN), aux


class Llama(L.DecoderLM):
    """The LLaMA network (``layers.DecoderLM``; with q/k/v biases in its weight table, Qwen2's).
    It has no dropout of its own; in training (a dropout key) LoRA adapters may drop out their
    input."""

    weight_table = staticmethod(param_specs)

    def _build(self, c: LlamaConfig, weights: Weights):
        self.embed = L.Embed(weights.child("embed"))
        self.layers = LlamaBlock(c, weights.child("layers"))
        self.final_norm = L.RMSNorm(weights.child("final_norm"), c.rms_norm_eps)

    @property
    def head_parts(self):
        return self.final_norm, self.embed

    def _embed(self, tokens, positions, dropout_key):
        """Token embeddings and the rotary tables of ``positions`` (RoPE positions)."""
        c = self.config
        dtype = jnp.dtype(c.dtype)
        rope = L.rope_tables(positions, L.rope_inverse_frequencies(c.head_dim, c.rope_theta,
                                                                   c.rope_scaling), dtype)
        return constrain(self.embed(tokens, dtype), HIDDEN), rope


# -- Hugging Face tensor names --------------------------------------------------------------------


def hf_keys(c: LlamaConfig, naming: str = "transformers") -> KeyMap:
    d, f, v, h, kv, hd = (c.hidden_size, c.intermediate_size, c.vocab_size, c.num_heads,
                          c.num_kv_heads, c.head_dim)
    layer = "model.layers.{i}."

    def proj(name: str) -> str:  # "attn/q" -> the kernel of the block's attn/q_proj
        return f"layers/{name}_proj/kernel"

    entries = [
        Entry("model.embed_tokens.weight", ("embed/embedding",), (v, d)),
        Entry(layer + "input_layernorm.weight", ("layers/attn_norm/scale",), (d,)),
        # q/k stay in HF's rotate-half layout: no permutation, only [out, in] -> [in, heads, hd].
        Entry(layer + "self_attn.q_proj.weight", (proj("attn/q"),), (h * hd, d), transpose=True),
        Entry(layer + "self_attn.k_proj.weight", (proj("attn/k"),), (kv * hd, d), transpose=True),
        Entry(layer + "self_attn.v_proj.weight", (proj("attn/v"),), (kv * hd, d), transpose=True),
        Entry(layer + "self_attn.o_proj.weight", (proj("attn/o"),), (d, h * hd), transpose=True),
        Entry(layer + "post_attention_layernorm.weight", ("layers/mlp_norm/scale",), (d,)),
        Entry(layer + "mlp.gate_proj.weight", (proj("mlp/gate"),), (f, d), transpose=True),
        Entry(layer + "mlp.up_proj.weight", (proj("mlp/up"),), (f, d), transpose=True),
        Entry(layer + "mlp.down_proj.weight", (proj("mlp/down"),), (d, f), transpose=True),
        Entry("model.norm.weight", ("final_norm/scale",), (d,)),
    ]
    if not c.tie_word_embeddings:
        entries.append(Entry(LM_HEAD, ("lm_head",), (v, d), transpose=True))
    return KeyMap(naming, tuple(entries), (r"rotary_emb\.inv_freq$",))


FAMILY = Family(
    name="llama", config=LlamaConfig, module=Llama, hf_keys=hf_keys,
    embedding="embed/embedding",
    hf_model_types=("llama", "mistral"),
    hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"))
