"""Model configurations: one dataclass per family, built from and written back to a Hugging Face
``config.json`` (transformers 4.x and 5.x spellings both accepted)."""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

from diffujax.attention.config import AttentionConfig


class ConfigError(ValueError):
    """A config.json that diffujax cannot turn into a model config; the message names the key."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Fields shared by every family."""

    family: ClassVar[str] = ""
    vocab_size: int = 0
    hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    intermediate_size: int = 0
    tie_word_embeddings: bool = True
    mask_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # How attention is computed (backend, block sizes): part of the compiled program, not of
    # the model's weights; never written to config.json.
    attention: AttentionConfig = AttentionConfig()
    remat: str = "none"  # none | full | dots: what the backward pass recomputes per layer
    # Keys of the source config.json that diffujax does not model but writes back on export, as
    # canonical JSON so the config stays hashable (it is static under jit).
    extra_hf: str = "{}"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _extra_json(hf: dict, modeled) -> str:
    return json.dumps({k: v for k, v in hf.items() if k not in modeled}, sort_keys=True)


def _first_id(value):
    """HF allows a list of EOS ids; diffujax uses the first. The original value is kept in
    ``extra_hf`` (special-token keys are not in ``_MODELED``) and written back on export."""
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _special_ids(hf: dict, cfg: "ModelConfig") -> None:
    """Write bos/eos/pad ids, keeping the source's own spelling (a list of EOS ids stays a list)."""
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key not in hf and getattr(cfg, key) is not None:
            hf[key] = getattr(cfg, key)


def _require(hf: dict, key: str, arch: str):
    if key not in hf:
        raise ConfigError(f"config.json for {arch} is missing required key {key!r}")
    return hf[key]


@dataclasses.dataclass(frozen=True)
class GPT2Config(ModelConfig):
    family: ClassVar[str] = "gpt2"
    max_positions: int = 1024
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"

    _MODELED: ClassVar[tuple[str, ...]] = (
        "vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "layer_norm_epsilon",
        "activation_function", "tie_word_embeddings", "mask_token_id", "architectures", "model_type", "torch_dtype", "dtype",
        "n_ctx", "transformers_version",
    )

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "GPT2Config":
        a = "GPT-2"
        d = int(_require(hf, "n_embd", a))
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"config.json key 'activation_function'={act!r} is not supported")
        for key, supported in (("scale_attn_by_inverse_layer_idx", False),
                               ("reorder_and_upcast_attn", False), ("scale_attn_weights", True)):
            if bool(hf.get(key, supported)) != supported:
                raise ConfigError(f"config.json key {key!r}={hf[key]!r} is not supported")
        cfg = cls(
            vocab_size=int(_require(hf, "vocab_size", a)),
            hidden_size=d,
            num_layers=int(_require(hf, "n_layer", a)),
            num_heads=int(_require(hf, "n_head", a)),
            num_kv_heads=int(_require(hf, "n_head", a)),
            intermediate_size=int(hf.get("n_inner") or 4 * d),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            mask_token_id=hf.get("mask_token_id"),
            bos_token_id=_first_id(hf.get("bos_token_id")),
            eos_token_id=_first_id(hf.get("eos_token_id")),
            pad_token_id=_first_id(hf.get("pad_token_id")),
            max_positions=int(hf.get("n_positions", 1024)),
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            activation=act,
            extra_hf=_extra_json(hf, cls._MODELED),
        )
        return cfg.replace(**overrides)

    def to_hf(self) -> dict:
        hf = json.loads(self.extra_hf)
        hf.update(
            architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=self.vocab_size,
            n_embd=self.hidden_size, n_layer=self.num_layers, n_head=self.num_heads,
            n_inner=None if self.intermediate_size == 4 * self.hidden_size else self.intermediate_size,
            n_positions=self.max_positions, n_ctx=self.max_positions,
            layer_norm_epsilon=self.layer_norm_eps, activation_function=self.activation,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        _special_ids(hf, self)
        if self.mask_token_id is not None:
            hf["mask_token_id"] = self.mask_token_id
        return hf


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ModelConfig):
    family: ClassVar[str] = "llama"
    max_positions: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings),
    # or ("linear", factor). Kept as a tuple so the config stays hashable (a static jit argument).
    rope_scaling: tuple | None = None
    explicit_head_dim: int | None = None

    _MODELED: ClassVar[tuple[str, ...]] = (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "intermediate_size", "max_position_embeddings", "rms_norm_eps",
        "rope_theta", "rope_scaling", "rope_parameters", "head_dim", "tie_word_embeddings",
        "mask_token_id", "architectures",
        "model_type", "torch_dtype", "dtype", "hidden_act", "attention_bias", "mlp_bias",
        "transformers_version", "sliding_window",
    )

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "LlamaConfig":
        a = "LLaMA"
        for key, bad in (("attention_bias", True), ("mlp_bias", True)):
            if hf.get(key) is bad:
                raise ConfigError(f"config.json key {key!r}=true is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json key 'hidden_act'={hf['hidden_act']!r} is not supported")
        if hf.get("sliding_window"):
            raise ConfigError("config.json key 'sliding_window' is set: sliding-window attention"
                              " is not supported")
        # transformers 5.x moves rope_theta / rope_scaling into rope_parameters.
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        theta = float(hf.get("rope_theta", rope.get("rope_theta", 10000.0)))
        rope_scaling = None
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "llama3":
                rope_scaling = ("llama3", float(scaling["factor"]), float(scaling["low_freq_factor"]),
                                float(scaling["high_freq_factor"]),
                                int(scaling["original_max_position_embeddings"]))
            elif kind == "linear":
                rope_scaling = ("linear", float(scaling["factor"]))
            elif kind not in (None, "default"):
                raise ConfigError(f"config.json: rope scaling type {kind!r} is not supported")
        heads = int(_require(hf, "num_attention_heads", a))
        hidden = int(_require(hf, "hidden_size", a))
        head_dim = hf.get("head_dim")
        cfg = cls(
            vocab_size=int(_require(hf, "vocab_size", a)),
            hidden_size=hidden,
            num_layers=int(_require(hf, "num_hidden_layers", a)),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            intermediate_size=int(_require(hf, "intermediate_size", a)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            mask_token_id=hf.get("mask_token_id"),
            bos_token_id=_first_id(hf.get("bos_token_id")),
            eos_token_id=_first_id(hf.get("eos_token_id")),
            pad_token_id=_first_id(hf.get("pad_token_id")),
            max_positions=int(hf.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            explicit_head_dim=int(head_dim) if head_dim and int(head_dim) != hidden // heads else None,
            extra_hf=_extra_json(hf, cls._MODELED),
        )
        return cfg.replace(**overrides)

    def to_hf(self) -> dict:
        hf = json.loads(self.extra_hf)
        hf.update(
            architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size, max_position_embeddings=self.max_positions,
            rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta, hidden_act="silu",
            tie_word_embeddings=self.tie_word_embeddings, attention_bias=False, mlp_bias=False,
        )
        _special_ids(hf, self)
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
        if self.mask_token_id is not None:
            hf["mask_token_id"] = self.mask_token_id
        return hf


FAMILIES: dict[str, type[ModelConfig]] = {"gpt2": GPT2Config, "llama": LlamaConfig, "mistral": LlamaConfig}
ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "GPT2Model": "gpt2", "LlamaForCausalLM": "llama",
                 "MistralForCausalLM": "llama"}


def config_from_hf(hf: dict, source: str = "config.json", **overrides) -> ModelConfig:
    """Pick the family from ``model_type`` / ``architectures`` and build its config."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        archs = [ARCHITECTURES.get(a) for a in hf.get("architectures") or []]
        family = next((f for f in archs if f), None)
    if family not in FAMILIES:
        raise ConfigError(
            f"{source}: unknown architecture (model_type={hf.get('model_type')!r}, "
            f"architectures={hf.get('architectures')!r}); supported: gpt2, llama, mistral")
    try:
        return FAMILIES[family].from_hf(hf, **overrides)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
