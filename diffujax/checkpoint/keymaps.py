"""Hugging Face tensor names <-> diffujax parameter paths, one table per family.

Each ``Entry`` is one tensor of the Hugging Face file: its name (``{i}`` stands for the layer
index), the diffujax path(s) it fills (the slice ``[i]`` of a stacked per-layer weight), its shape
in the file, and whether it is a torch ``Linear`` weight stored ``[out, in]``. The conversion
itself is always the same three moves (transpose, split the fused last axis, reshape to heads),
so an entry is data, not code, and both directions are exact (no arithmetic on values).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from diffujax.models.configs import GPT2Config, LlamaConfig, ModelConfig

LM_HEAD = "lm_head.weight"


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str  # Hugging Face tensor name; "{i}" marks a per-layer tensor
    paths: tuple[str, ...]  # diffujax parameter paths it fills (GPT-2's fused c_attn fills three)
    shape: tuple[int, ...]  # shape in the Hugging Face file (one layer's tensor)
    transpose: bool = False  # torch Linear stores [out, in]; diffujax keeps [in, out]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.name

    def to_diffujax(self, tensor: np.ndarray, part_shapes) -> list[np.ndarray]:
        """The HF tensor as one array per path, each reshaped to ``part_shapes[k]`` (views)."""
        a = tensor.T if self.transpose else tensor
        parts = np.split(a, len(self.paths), axis=-1) if len(self.paths) > 1 else [a]
        return [p.reshape(s) for p, s in zip(parts, part_shapes)]

    def to_hf(self, parts: list[np.ndarray]) -> np.ndarray:
        """Inverse of ``to_diffujax``: a contiguous array of ``self.shape``."""
        flat = self.shape[::-1] if self.transpose else self.shape
        part_flat = flat[:-1] + (flat[-1] // len(parts),)
        a = np.concatenate([p.reshape(part_flat) for p in parts], axis=-1)
        return np.ascontiguousarray(a.T if self.transpose else a)


@dataclasses.dataclass(frozen=True)
class KeyMap:
    naming: str  # which spelling of the names this map uses (recorded so export can repeat it)
    entries: tuple[Entry, ...]
    ignore: tuple[str, ...]  # regexes of buffers that may appear in a file and carry no weights

    def expand(self, num_layers: int) -> dict[str, tuple[Entry, int | None]]:
        """Every expected tensor name -> (entry, layer index or None), in file order."""
        out = {}
        for e in self.entries:
            if e.per_layer:
                out.update({e.name.format(i=i): (e, i) for i in range(num_layers)})
            else:
                out[e.name] = (e, None)
        return out

    def ignored(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.ignore)


# -- GPT-2 ----------------------------------------------------------------------------------------

# Prefixes of the three spellings: save_pretrained of GPT2LMHeadModel, the hub's bare GPT2Model
# names (openai-community/gpt2), and the DiffuGPT reference wrapper (embedding pulled out of the
# transformer as `embed_tokens`, the rest under `denoise_model`).
GPT2_NAMINGS = {"transformers": "transformer.", "bare": "", "diffugpt": "denoise_model."}


def gpt2_keymap(c: GPT2Config, naming: str = "transformers") -> KeyMap:
    p = GPT2_NAMINGS[naming]
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    h = f"{p}h.{{i}}."
    entries = [
        Entry("embed_tokens.weight" if naming == "diffugpt" else f"{p}wte.weight", ("wte",), (v, d)),
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


# -- LLaMA ----------------------------------------------------------------------------------------


def llama_keymap(c: LlamaConfig, naming: str = "transformers") -> KeyMap:
    d, f, v, h, kv, hd = (c.hidden_size, c.intermediate_size, c.vocab_size, c.num_heads,
                          c.num_kv_heads, c.head_dim)
    L = "model.layers.{i}."
    entries = [
        Entry("model.embed_tokens.weight", ("embed",), (v, d)),
        Entry(L + "input_layernorm.weight", ("layers/attn_norm",), (d,)),
        # q/k stay in HF's rotate-half layout: no permutation, only [out, in] -> [in, heads, hd].
        Entry(L + "self_attn.q_proj.weight", ("layers/wq",), (h * hd, d), transpose=True),
        Entry(L + "self_attn.k_proj.weight", ("layers/wk",), (kv * hd, d), transpose=True),
        Entry(L + "self_attn.v_proj.weight", ("layers/wv",), (kv * hd, d), transpose=True),
        Entry(L + "self_attn.o_proj.weight", ("layers/wo",), (d, h * hd), transpose=True),
        Entry(L + "post_attention_layernorm.weight", ("layers/mlp_norm",), (d,)),
        Entry(L + "mlp.gate_proj.weight", ("layers/w_gate",), (f, d), transpose=True),
        Entry(L + "mlp.up_proj.weight", ("layers/w_up",), (f, d), transpose=True),
        Entry(L + "mlp.down_proj.weight", ("layers/w_down",), (d, f), transpose=True),
        Entry("model.norm.weight", ("final_norm",), (d,)),
    ]
    if not c.tie_word_embeddings:
        entries.append(Entry(LM_HEAD, ("lm_head",), (v, d), transpose=True))
    return KeyMap(naming, tuple(entries), (r"rotary_emb\.inv_freq$",))


def detect_naming(config: ModelConfig, names) -> str:
    """Which spelling a file uses, from its tensor names."""
    if config.family != "gpt2":
        return "transformers"
    names = list(names)
    if any(n.startswith("denoise_model.") or n == "embed_tokens.weight" for n in names):
        return "diffugpt"
    if any(n.startswith("transformer.") for n in names):
        return "transformers"
    return "bare"


def keymap(config: ModelConfig, naming: str = "transformers") -> KeyMap:
    if config.family == "gpt2":
        if naming not in GPT2_NAMINGS:
            raise ValueError(f"GPT-2 tensor naming {naming!r} is not one of {tuple(GPT2_NAMINGS)}")
        return gpt2_keymap(config, naming)
    if naming != "transformers":
        raise ValueError(f"{config.family} has only the 'transformers' tensor naming, not {naming!r}")
    return llama_keymap(config)


def embedding_path(config: ModelConfig) -> str:
    return "wte" if config.family == "gpt2" else "embed"
