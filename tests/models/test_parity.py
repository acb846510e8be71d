"""Logits parity with Hugging Face transformers (the independent reference: torch, CPU, float32)
on tiny randomly initialised GPT-2, LLaMA and Qwen2 models, through the converter's in-memory path.

Error measure: max |diffujax - torch| over all logits, relative to max |torch logit|.
Full attention is compared with torch given an all-zeros 4D additive mask (no causal mask).
"""

import functools

import numpy as np
import pytest
import torch
import transformers

from diffujax.attention import causal, full
from diffujax.checkpoint import from_state_dict
from diffujax.models import forward

V, L, B = 96, 24, 2
GPT2 = dict(model_type="gpt2", vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32,
            bos_token_id=0, eos_token_id=0)
LLAMA = dict(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
             rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)
# Qwen2: q/k/v biases (randomised below, so a dropped bias shows), a large RoPE base.
QWEN2 = dict(model_type="qwen2", vocab_size=V, hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1000000.0, bos_token_id=0,
             eos_token_id=0)
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=16)  # L=24 runs past the original length

CASES = {
    "gpt2": GPT2,
    "gpt2_untied": {**GPT2, "tie_word_embeddings": False},
    "llama_mha_untied": {**LLAMA, "num_key_value_heads": 4, "tie_word_embeddings": False},
    "llama_gqa_tied": {**LLAMA, "num_key_value_heads": 2, "tie_word_embeddings": True,
                       "rope_theta": 500.0},
    # transformers 4.x spelling: rope_theta + rope_scaling at the top level.
    "llama3_rope_scaling": {**LLAMA, "num_key_value_heads": 2, "rope_theta": 500000.0,
                            "rope_scaling": LLAMA3_SCALING},
    # transformers 5.x spelling: everything under rope_parameters.
    "llama3_rope_parameters": {**LLAMA, "num_key_value_heads": 1, "tie_word_embeddings": True,
                               "rope_parameters": {"rope_theta": 10000.0, **LLAMA3_SCALING}},
    "qwen2_gqa_tied": {**QWEN2, "tie_word_embeddings": True},  # Qwen2.5-0.5B's shape
    "qwen2_mha_untied": {**QWEN2, "num_key_value_heads": 4, "tie_word_embeddings": False},
}


def randomize(model, seed):
    """Non-trivial values everywhere (default init leaves biases 0 and norms 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if ("ln" in name or "norm" in name) and name.endswith("weight")
                    else 0.1 * noise)
    return model


def hf_model(hf_config: dict, seed=0):
    cfg = transformers.AutoConfig.for_model(**hf_config)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return randomize(model, seed).eval()


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(case):
        if case not in cache:
            ref = hf_model(CASES[case])
            config, params = from_state_dict(CASES[case], ref.state_dict())
            cache[case] = ref, config, functools.partial(forward, config, params)
        return cache[case]

    return get


def tokens(seed=0):
    return np.random.default_rng(seed).integers(0, V, (B, L))


def torch_logits(model, ids, bidirectional=False):
    mask = torch.zeros(B, 1, L, L) if bidirectional else None  # 4D masks are used as given
    with torch.no_grad():
        return model(torch.as_tensor(ids), attention_mask=mask).logits.float().numpy()


def rel_err(ours, ref):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(models, case, bidirectional):
    ref_model, _, model = models(case)
    ids = tokens()
    ref = torch_logits(ref_model, ids, bidirectional)
    ours = model(ids, full() if bidirectional else causal())
    assert ours.shape == (B, L, V)
    assert rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("case", ["gpt2", "llama_gqa_tied", "qwen2_gqa_tied"])
def test_full_attention_is_bidirectional(models, case):
    """Changing the last token moves the logits at position 0 under full attention only."""
    ref_model, _, model = models(case)
    a = tokens()
    b = a.copy()
    b[:, -1] = (b[:, -1] + 1) % V
    for m in (lambda x: torch_logits(ref_model, x, True), lambda x: np.asarray(model(x, full()))):
        assert np.max(np.abs(m(a)[:, 0] - m(b)[:, 0])) > 1e-4
    assert np.array_equal(np.asarray(model(a, causal()))[:, :-1], np.asarray(model(b, causal()))[:, :-1])


@pytest.mark.parametrize("case", ["gpt2", "llama_gqa_tied", "qwen2_gqa_tied"])
def test_bfloat16_stays_close(models, case):
    """bfloat16 parameters and compute against the float32 torch reference: loose tolerance."""
    ref_model, _, _ = models(case)
    config, params = from_state_dict(CASES[case], ref_model.state_dict(), dtype="bfloat16")
    config = config.replace(dtype="bfloat16", param_dtype="bfloat16")
    model = functools.partial(forward, config, params)
    ids = tokens(1)
    ours = model(ids, causal())
    assert str(params["layers"]["attn"]["q_proj"]["kernel"].dtype) == "bfloat16"
    assert rel_err(ours, torch_logits(ref_model, ids)) <= 3e-2
