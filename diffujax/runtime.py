"""What ``eval`` and ``generate`` share: a converted checkpoint ready for inference."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from diffujax.models import ModelConfig, functional


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    apply_fn: Callable  # apply_fn(params, tokens, pattern) -> logits
    params: Any
    tokenizer: Any

    def mask_token_id(self) -> int:
        if self.config.mask_token_id is None:
            raise ValueError("the checkpoint has no mask token: convert it without --no-mask-token"
                             " (or with --mask-token-id N) to use the diffusion objective")
        return int(self.config.mask_token_id)


def load_for_inference(checkpoint: str, *, dtype: str | None = None,
                       attention_backend: str | None = None) -> LoadedModel:
    """Load parameters, config and tokenizer of a diffujax checkpoint directory."""
    from diffujax.checkpoint.store import load_model
    from diffujax.data.tokenizer import load_tokenizer

    config, model = load_model(checkpoint, dtype=dtype)
    if attention_backend:
        model.config = config = config.replace(attention_backend=attention_backend)
    apply_fn, params = functional(model)
    tokenizer = load_tokenizer(checkpoint)
    tokenizer.check_model_vocab(config.vocab_size)
    return LoadedModel(config, apply_fn, params, tokenizer)
