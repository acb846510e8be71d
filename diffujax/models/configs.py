"""What every family's model config shares: the base dataclass and the helpers that read and write
a Hugging Face ``config.json`` (each family's own dataclass lives in its file: ``gpt2.py``,
``llama.py``, ``qwen2.py``; ``registry.config_from_hf`` picks one)."""

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
    block_size: int = 0  # 0: full-sequence model; N: block diffusion (docs/algorithms.md §9)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # How attention is computed (backend, block sizes): part of the compiled program, not of
    # the model's weights; never written to config.json.
    attention: AttentionConfig = AttentionConfig()
    # none | dots_with_attention | dots | full: what the backward pass recomputes per layer
    # (layers.REMAT_POLICIES)
    remat: str = "none"
    # the layers as one lax.scan over their stacked weights (True), or unrolled (False:
    # layers.unrolled_layers; a longer program, no stacked buffers of saved activations)
    scan_layers: bool = True
    # Keys of the source config.json that diffujax does not model but writes back on export, as
    # canonical JSON so the config stays hashable (it is static under jit).
    extra_hf: str = "{}"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def extra_json(hf: dict, modeled) -> str:
    return json.dumps({k: v for k, v in hf.items() if k not in modeled}, sort_keys=True)


def first_id(value):
    """HF allows a list of EOS ids; diffujax uses the first. The original value is kept in
    ``extra_hf`` (special-token keys are not in ``_MODELED``) and written back on export."""
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def special_ids(hf: dict, cfg: "ModelConfig") -> None:
    """Write bos/eos/pad ids, keeping the source's own spelling (a list of EOS ids stays a list)."""
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key not in hf and getattr(cfg, key) is not None:
            hf[key] = getattr(cfg, key)


def diffusion_keys(hf: dict, cfg: "ModelConfig") -> None:
    """Write what a diffusion model adds to config.json: its mask token and, for a block model
    (docs/algorithms.md §9), ``diffusion_block_size``. transformers ignores both keys, so the
    file still loads there as the plain AR model its weights are."""
    if cfg.mask_token_id is not None:
        hf["mask_token_id"] = cfg.mask_token_id
    if cfg.block_size > 0:
        hf["diffusion_block_size"] = cfg.block_size


def block_size_from(hf: dict) -> int:
    """``diffusion_block_size`` of a config.json (absent: 0, a full-sequence model)."""
    value = hf.get("diffusion_block_size", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"config.json key 'diffusion_block_size'={value!r}: must be an integer"
                          " >= 0 (0: a full-sequence model)")
    return value


def require(hf: dict, key: str, arch: str):
    if key not in hf:
        raise ConfigError(f"config.json for {arch} is missing required key {key!r}")
    return hf[key]
