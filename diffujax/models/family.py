"""What diffujax knows about one model family, as one record (``models/registry.py`` lists them).

A family file (``gpt2.py``, ``llama.py``, ``qwen2.py``) defines its config class, its weight table
(``param_specs``), its network (a Flax NNX module built from that table) and its Hugging Face
key map, and ends with one ``Family(...)``. Everything else is derived from that record:
initialisation, abstract shapes, shardings and weight-decay masks from the weight table, the
converters from the key map, and the training FLOP count from the weight table too
(``models.matmul_params``).

Key map: each ``Entry`` is one tensor of the Hugging Face file: its name (``{i}`` stands for the
layer index), the diffujax path(s) it fills (the slice ``[i]`` of a stacked per-layer weight), its
shape in the file, and whether it is a torch ``Linear`` weight stored ``[out, in]``. Conversion is
always the same three moves (transpose, split the fused last axis, reshape to heads), so an entry
is data, not code, and both directions are exact (no arithmetic on values).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable

import numpy as np

from diffujax.models.configs import ModelConfig

LM_HEAD = "lm_head.weight"  # the untied output head's tensor name in every family


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

    def entry_for(self, path: str) -> Entry:
        """The entry that fills diffujax parameter ``path`` alone (e.g. the embedding)."""
        return next(e for e in self.entries if e.paths == (path,))


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # ``config.family`` and the ``model.init.family`` of a run config
    config: type[ModelConfig]  # from_hf / to_hf for config.json
    # The network, a Flax NNX module: module(config, rngs=...) builds it from its weight table
    # (module.weight_table(config)); model(tokens, pattern, positions=None, dropout_key=None)
    # -> logits; model.decode(tokens, pattern, cache, offset, positions=None) -> (logits, cache)
    # runs it against a KV cache (models/cache.py).
    module: type
    hf_keys: Callable[[ModelConfig, str], KeyMap]  # (config, naming) -> key map
    embedding: str  # path of the input embedding table (also the output head when tied)
    hf_model_types: tuple[str, ...]  # config.json ``model_type`` values read as this family
    hf_architectures: tuple[str, ...]  # config.json ``architectures`` read as this family
    lookups: tuple[str, ...] = ()  # other tables indexed, never multiplied (GPT-2's positions)
    namings: tuple[str, ...] = ("transformers",)  # tensor spellings; the first is the default
    naming_of: Callable[[list[str]], str] | None = None  # the spelling a file's names use

    def keymap(self, config: ModelConfig, naming: str = "transformers") -> KeyMap:
        if naming not in self.namings:
            raise ValueError(f"{self.name} tensor naming {naming!r} is not one of {self.namings}")
        return self.hf_keys(config, naming)

    def detect_naming(self, names: Iterable[str]) -> str:
        """Which spelling a file uses, from its tensor names."""
        return self.naming_of(list(names)) if self.naming_of else self.namings[0]

