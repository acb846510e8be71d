"""Qwen2 / Qwen2.5 (the base of e.g. Dream-7B): LLaMA with biases on the q, k and v projections
(and, in the small sizes, tied embeddings). Sliding-window attention, which config.json may switch
on (``use_sliding_window``), is not supported."""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

from diffujax.models import llama
from diffujax.models.configs import ConfigError
from diffujax.models.family import Entry, Family, KeyMap
from diffujax.models.params import ParamSpec


@dataclasses.dataclass(frozen=True)
class Qwen2Config(llama.LlamaConfig):
    family: ClassVar[str] = "qwen2"

    HF_NAME: ClassVar[str] = "Qwen2"
    HF_MODEL_TYPE: ClassVar[str] = "qwen2"
    HF_ARCHITECTURE: ClassVar[str] = "Qwen2ForCausalLM"
    # sliding_window / max_window_layers / layer_types stay in extra_hf and go back on export.
    _MODELED: ClassVar[tuple[str, ...]] = tuple(
        k for k in llama.LlamaConfig._MODELED
        if k not in ("attention_bias", "mlp_bias", "sliding_window")) + ("use_sliding_window",)

    @classmethod
    def check_hf(cls, hf: dict) -> None:
        if hf.get("use_sliding_window"):
            raise ConfigError("config.json key 'use_sliding_window'=true: sliding-window"
                              " attention is not supported")
        kinds = set(hf.get("layer_types") or ()) - {"full_attention"}
        if kinds:
            raise ConfigError(f"config.json key 'layer_types' has {sorted(kinds)}: only"
                              " full_attention layers are supported")

    def hf_fields(self) -> dict:
        return dict(use_sliding_window=False)


def param_specs(c: Qwen2Config) -> dict[str, ParamSpec]:
    n, h, kv, hd = c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim
    return {
        **llama.param_specs(c),
        "layers/attn/q_proj/bias": ParamSpec((n, h, hd), ("layers", "heads", "head_dim"),
                                             "zeros"),
        **{f"layers/attn/{x}_proj/bias": ParamSpec((n, kv, hd),
                                                   ("layers", "kv_heads", "head_dim"), "zeros")
           for x in "kv"},
    }


class Qwen2(llama.Llama):
    """LLaMA's network; its attention adds the q/k/v biases its weight table has."""

    weight_table = staticmethod(param_specs)


def hf_keys(c: Qwen2Config, naming: str = "transformers") -> KeyMap:
    """LLaMA's names plus ``self_attn.{q,k,v}_proj.bias`` after each projection's weight."""
    base = llama.hf_keys(c, naming)
    entries = []
    for e in base.entries:
        entries.append(e)
        m = re.fullmatch(r"(.*self_attn\.([qkv])_proj)\.weight", e.name)
        if m:
            entries.append(Entry(f"{m[1]}.bias", (f"layers/attn/{m[2]}_proj/bias",), (e.shape[0],)))
    return dataclasses.replace(base, entries=tuple(entries))


FAMILY = Family(
    name="qwen2", config=Qwen2Config, module=Qwen2,
    hf_keys=hf_keys, embedding="embed/embedding", hf_model_types=("qwen2",),
    hf_architectures=("Qwen2ForCausalLM",))
