"""The family registry: each family's record against transformers (the independent side).

- the FLOP count read off the weight table equals the weights of transformers' own matmul
  layers (``nn.Linear`` / GPT-2's ``Conv1D``; a tied head counted once), and published sizes;
- config.json is read into the right family and written back so transformers builds the same
  architecture; settings a family does not implement are refused by name.
"""

import pytest
import torch
import transformers
from transformers.pytorch_utils import Conv1D

from diffujax.models import (FAMILIES, ConfigError, GPT2Config, LlamaConfig, Qwen2Config,
                             config_from_hf, matmul_params)

TINY = {
    "gpt2": dict(model_type="gpt2", vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=8),
    "llama": dict(model_type="llama", vocab_size=50, hidden_size=16, intermediate_size=24,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", vocab_size=50, hidden_size=16, intermediate_size=24,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1),
}


def torch_matmul_weights(model) -> int:
    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, Conv1D)) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += m.weight.numel()
    return total


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", list(TINY))
def test_matmul_params_equal_transformers_matmul_weights(family, tied):
    config = config_from_hf({**TINY[family], "tie_word_embeddings": tied})
    assert config.family == family
    hf = transformers.AutoConfig.for_model(**config.to_hf())
    model = transformers.AutoModelForCausalLM.from_config(hf)
    assert matmul_params(config) == torch_matmul_weights(model)


def test_qwen25_7b_matches_published_size():
    """Qwen2.5-7B: 6.53B non-embedding parameters (the model card), untied 152064 x 3584 head."""
    cfg = Qwen2Config(vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28,
                      num_kv_heads=4, intermediate_size=18944, tie_word_embeddings=False)
    d, kv_dim = 3584, 4 * 128
    by_hand = 28 * (2 * d * d + 2 * d * kv_dim + 3 * d * 18944) + d * 152064
    assert matmul_params(cfg) == by_hand
    assert abs(matmul_params(cfg) - d * 152064 - 6.53e9) / 6.53e9 < 2e-3


def test_config_json_picks_the_family():
    assert type(config_from_hf(TINY["qwen2"])) is Qwen2Config
    assert type(config_from_hf(TINY["gpt2"])) is GPT2Config
    mistral = {**TINY["llama"], "model_type": "mistral", "sliding_window": None}
    assert type(config_from_hf(mistral)) is LlamaConfig
    by_arch = {k: v for k, v in TINY["qwen2"].items() if k != "model_type"}
    assert type(config_from_hf({**by_arch, "architectures": ["Qwen2ForCausalLM"]})) is Qwen2Config
    with pytest.raises(ConfigError, match="unknown architecture.*qwen2"):
        config_from_hf({"model_type": "bert"})
    assert sorted(FAMILIES) == ["gpt2", "llama", "qwen2"]


def test_qwen2_config_round_trip_and_refusals():
    hf = transformers.AutoConfig.for_model(**TINY["qwen2"], rope_theta=1e6, max_window_layers=3,
                                           sliding_window=4096).to_dict()
    cfg = config_from_hf(hf)
    assert cfg.rope_theta == 1e6 and cfg.num_kv_heads == 1
    back = cfg.to_hf()
    assert back["model_type"] == "qwen2" and back["architectures"] == ["Qwen2ForCausalLM"]
    assert back["use_sliding_window"] is False and back["max_window_layers"] == 3
    assert "attention_bias" not in back  # a LLaMA key that Qwen2 does not have
    assert config_from_hf(back) == cfg
    with pytest.raises(ConfigError, match="use_sliding_window"):
        config_from_hf({**hf, "use_sliding_window": True})
    with pytest.raises(ConfigError, match="layer_types.*sliding_attention"):
        config_from_hf({**hf, "layer_types": ["full_attention", "sliding_attention"]})
