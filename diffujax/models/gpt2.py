"""GPT-2: learned positions, pre-LayerNorm blocks, GELU-tanh MLP, tied head."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from diffujax.models import layers as L
from diffujax.models.configs import (SHARED_KEYS, ConfigError, ModelConfig, require,
                                     shared_from_hf, shared_to_hf)
from diffujax.models.family import LM_HEAD, Entry, Family, KeyMap
from diffujax.models.params import ParamSpec, Weights
from diffujax.parallel.logical import HIDDEN, constrain


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

    _MODELED: ClassVar[tuple[str, ...]] = SHARED_KEYS + (
        "embd_pdrop", "resid_pdrop", "attn_pdrop", "vocab_size", "n_embd", "n_layer", "n_head",
        "n_inner", "n_positions", "layer_norm_epsilon", "activation_function",
        "tie_word_embeddings", "n_ctx")

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "GPT2Config":
        d = require(hf, "n_embd", "GPT-2")
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"config.json key 'activation_function'={act!r} is not supported")
        for key, supported in (("scale_attn_by_inverse_layer_idx", False),
                               ("reorder_and_upcast_attn", False), ("scale_attn_weights", True)):
            if bool(hf.get(key, supported)) != supported:
                raise ConfigError(f"config.json key {key!r}={hf[key]!r} is not supported")
        heads = require(hf, "n_head", "GPT-2")
        return cls(
            vocab_size=require(hf, "vocab_size", "GPT-2"), hidden_size=d,
            num_layers=require(hf, "n_layer", "GPT-2"), num_heads=heads, num_kv_heads=heads,
            intermediate_size=int(hf.get("n_inner") or 4 * d),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            max_positions=int(hf.get("n_positions", 1024)),
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), activation=act,
            **{k: float(hf.get(k, 0.1)) for k in ("embd_pdrop", "resid_pdrop", "attn_pdrop")},
            **shared_from_hf(hf, cls._MODELED),
        ).replace(**overrides)

    def to_hf(self) -> dict:
        return shared_to_hf(
            self, architectures=["GPT2LMHeadModel"], model_type="gpt2",
            vocab_size=self.vocab_size, n_embd=self.hidden_size, n_layer=self.num_layers,
            n_head=self.num_heads,
            n_inner=(None if self.intermediate_size == 4 * self.hidden_size
                     else self.intermediate_size),
            n_positions=self.max_positions, n_ctx=self.max_positions,
            layer_norm_epsilon=self.layer_norm_eps, activation_function=self.activation,
            tie_word_embeddings=self.tie_word_embeddings, embd_pdrop=self.embd_pdrop,
            resid_pdrop=self.resid_pdrop, attn_pdrop=self.attn_pdrop)


def param_specs(c: GPT2Config) -> dict[str, ParamSpec]:
    n, d, h, hd, f = c.num_layers, c.hidden_size, c.num_heads, c.head_dim, c.intermediate_size
    heads = ParamSpec((n, d, h, hd), ("layers", "embed", "heads", "head_dim"))
    head_bias = ParamSpec((n, h, hd), ("layers", "heads", "head_dim"), "zeros")
    specs = {
        "wte/embedding": ParamSpec((c.vocab_size, d), ("vocab", "embed")),
        "wpe/embedding": ParamSpec((c.max_positions, d), ("positions", "embed"), std=0.01),
        "layers/ln1/scale": ParamSpec((n, d), ("layers", "embed"), "ones"),
        "layers/ln1/bias": ParamSpec((n, d), ("layers", "embed"), "zeros"),
        **{f"layers/attn/{x}_proj/kernel": heads for x in "qkv"},
        **{f"layers/attn/{x}_proj/bias": head_bias for x in "qkv"},
        "layers/attn/o_proj/kernel": ParamSpec((n, h, hd, d),
                                               ("layers", "heads", "head_dim", "embed")),
        "layers/attn/o_proj/bias": ParamSpec((n, d), ("layers", "embed"), "zeros"),
        "layers/ln2/scale": ParamSpec((n, d), ("layers", "embed"), "ones"),
        "layers/ln2/bias": ParamSpec((n, d), ("layers", "embed"), "zeros"),
        "layers/mlp/c_fc/kernel": ParamSpec((n, d, f), ("layers", "embed", "mlp")),
        "layers/mlp/c_fc/bias": ParamSpec((n, f), ("layers", "mlp"), "zeros"),
        "layers/mlp/c_proj/kernel": ParamSpec((n, f, d), ("layers", "mlp", "embed")),
        "layers/mlp/c_proj/bias": ParamSpec((n, d), ("layers", "embed"), "zeros"),
        "ln_f/scale": ParamSpec((d,), ("embed",), "ones"),
        "ln_f/bias": ParamSpec((d,), ("embed",), "zeros"),
    }
    if not c.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((d, c.vocab_size), ("embed", "vocab"))
    return specs


class GPT2Block(nnx.Module):
    """One block (pre-LayerNorm attention, then a GELU MLP, each with its residual dropout);
    its weights hold every layer, stacked (``layers.scan_layers`` runs it once per layer)."""

    def __init__(self, c: GPT2Config, weights: Weights):
        self.ln1 = L.LayerNorm(weights.child("ln1"), c.layer_norm_eps)
        self.attn = L.Attention(weights.child("attn"))
        self.ln2 = L.LayerNorm(weights.child("ln2"), c.layer_norm_eps)
        self.mlp = L.GeluMLP(weights.child("mlp"), exact=c.activation == "gelu")
        self.resid_pdrop = c.resid_pdrop

    def __call__(self, x, rope, attend, dropout_key=None):
        """``attend(q, k, v) -> (out, aux)`` and ``rope`` (None: positions are learned): see
        ``layers.Attention``. ``dropout_key``: this layer's key for the residual dropout
        (training), or None. Returns ``(x, aux)``."""
        def residual(out, i):
            if dropout_key is None:
                return out
            return L.dropout(out, self.resid_pdrop, jax.random.fold_in(dropout_key, i))

        if dropout_key is not None:
            L.seed_adapter_dropout(self, jax.random.fold_in(dropout_key, 2))

        a, aux = self.attn(self.ln1(x), attend, rope)
        x = x + residual(a, 0)
        x = x + residual(self.mlp(self.ln2(x)), 1)
        return constrain(x, HIDDEN), aux


class GPT2(L.DecoderLM):
    """GPT-2 (``layers.DecoderLM``). Training (a dropout key) applies HF GPT-2's dropout with the
    config's ``embd_pdrop`` on the embeddings and ``resid_pdrop`` on each attention and MLP
    output. ``attn_pdrop`` (on the attention probabilities) is not applied: the fused attention
    kernels have no dropout."""

    weight_table = staticmethod(param_specs)

    def _build(self, c: GPT2Config, weights: Weights):
        self.wte = L.Embed(weights.child("wte"))
        self.wpe = L.Embed(weights.child("wpe"))
        self.layers = GPT2Block(c, weights.child("layers"))
        self.ln_f = L.LayerNorm(weights.child("ln_f"), c.layer_norm_eps)

    @property
    def head_parts(self):
        return self.ln_f, self.wte

    def _default_positions(self, tokens, offset):
        # Explicit positions (block diffusion's two streams repeat 0..L-1) are the caller's.
        if tokens.shape[1] > self.config.max_positions:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds GPT-2's learned"
                             f" positions ({self.config.max_positions})")
        return offset + jnp.arange(tokens.shape[1])[None]

    def _embed(self, tokens, positions, dropout_key):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        x = constrain(self.wte(tokens, dtype) + self.wpe(positions, dtype), HIDDEN)
        if dropout_key is not None:
            x = L.dropout(x, c.embd_pdrop, jax.random.fold_in(dropout_key, c.num_layers))
        return x, None


# -- Hugging Face tensor names --------------------------------------------------------------------

# Prefixes of the three spellings: save_pretrained of GPT2LMHeadModel, the hub's bare GPT2Model
# names (openai-community/gpt2), and the DiffuGPT reference wrapper (embedding pulled out of the
# transformer as `embed_tokens`, the rest under `denoise_model`).
NAMINGS = {"transformers": "transformer.", "bare": "", "diffugpt": "denoise_model."}


def _qkv(weight: str) -> tuple[str, ...]:
    """The paths that GPT-2's fused ``c_attn`` fills, in its q|k|v order."""
    return tuple(f"layers/attn/{x}_proj/{weight}" for x in "qkv")


def hf_keys(c: GPT2Config, naming: str = "transformers") -> KeyMap:
    p = NAMINGS[naming]
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    h = f"{p}h.{{i}}."
    wte = "embed_tokens.weight" if naming == "diffugpt" else f"{p}wte.weight"
    entries = [
        Entry(wte, ("wte/embedding",), (v, d)),
        Entry(f"{p}wpe.weight", ("wpe/embedding",), (c.max_positions, d)),
        Entry(h + "ln_1.weight", ("layers/ln1/scale",), (d,)),
        Entry(h + "ln_1.bias", ("layers/ln1/bias",), (d,)),
        # Conv1D weights are already [in, out]; c_attn is q|k|v concatenated on the output axis.
        Entry(h + "attn.c_attn.weight", _qkv("kernel"), (d, 3 * d)),
        Entry(h + "attn.c_attn.bias", _qkv("bias"), (3 * d,)),
        Entry(h + "attn.c_proj.weight", ("layers/attn/o_proj/kernel",), (d, d)),
        Entry(h + "attn.c_proj.bias", ("layers/attn/o_proj/bias",), (d,)),
        Entry(h + "ln_2.weight", ("layers/ln2/scale",), (d,)),
        Entry(h + "ln_2.bias", ("layers/ln2/bias",), (d,)),
        Entry(h + "mlp.c_fc.weight", ("layers/mlp/c_fc/kernel",), (d, f)),
        Entry(h + "mlp.c_fc.bias", ("layers/mlp/c_fc/bias",), (f,)),
        Entry(h + "mlp.c_proj.weight", ("layers/mlp/c_proj/kernel",), (f, d)),
        Entry(h + "mlp.c_proj.bias", ("layers/mlp/c_proj/bias",), (d,)),
        Entry(f"{p}ln_f.weight", ("ln_f/scale",), (d,)),
        Entry(f"{p}ln_f.bias", ("ln_f/bias",), (d,)),
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
    name="gpt2", config=GPT2Config, module=GPT2, hf_keys=hf_keys, embedding="wte/embedding",
    lookups=("wpe/embedding",), hf_model_types=("gpt2",),
    hf_architectures=("GPT2LMHeadModel", "GPT2Model"), namings=tuple(NAMINGS), naming_of=naming_of)
