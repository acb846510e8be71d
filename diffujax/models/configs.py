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


# config.json keys every family reads (or writes) alike; a family's ``_MODELED`` adds its own.
SHARED_KEYS = ("mask_token_id", "diffusion_block_size", "architectures", "model_type",
               "torch_dtype", "dtype", "transformers_version")
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def shared_from_hf(hf: dict, modeled) -> dict:
    """The fields every family reads alike: the mask token, ``diffusion_block_size`` (absent: 0,
    a full-sequence model), the special-token ids and, as ``extra_hf``, the keys not in
    ``modeled``. HF allows a list of EOS ids; diffujax uses the first (the special-token keys are
    not modeled, so the original value stays in ``extra_hf`` and goes back on export)."""
    block = hf.get("diffusion_block_size", 0)
    if isinstance(block, bool) or not isinstance(block, int) or block < 0:
        raise ConfigError(f"config.json key 'diffusion_block_size'={block!r}: must be an integer"
                          " >= 0 (0: a full-sequence model)")

    def first_id(value):
        if isinstance(value, (list, tuple)):
            return int(value[0]) if value else None
        return None if value is None else int(value)

    return dict(mask_token_id=hf.get("mask_token_id"), block_size=block,
                **{key: first_id(hf.get(key)) for key in SPECIAL_IDS},
                extra_hf=json.dumps({k: v for k, v in hf.items() if k not in modeled},
                                    sort_keys=True))


def shared_to_hf(cfg: ModelConfig, **fields) -> dict:
    """config.json: the source's unmodeled keys, the family's ``fields``, the special-token ids
    in the source's own spelling (a list of EOS ids stays a list) and what a diffusion model adds:
    its mask token and, for a block model (docs/algorithms.md §9), ``diffusion_block_size``.
    transformers ignores both, so the file still loads there as the plain AR model its weights
    are."""
    hf = json.loads(cfg.extra_hf)
    hf.update(fields)
    for key in SPECIAL_IDS:
        if key not in hf and getattr(cfg, key) is not None:
            hf[key] = getattr(cfg, key)
    if cfg.mask_token_id is not None:
        hf["mask_token_id"] = cfg.mask_token_id
    if cfg.block_size > 0:
        hf["diffusion_block_size"] = cfg.block_size
    return hf


def require(hf: dict, key: str, arch: str) -> int:
    """The integer at a key every config.json of ``arch`` has."""
    if key not in hf:
        raise ConfigError(f"config.json for {arch} is missing required key {key!r}")
    return int(hf[key])
