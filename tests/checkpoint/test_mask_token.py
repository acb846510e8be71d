"""Choosing / adding the mask token (docs/algorithms.md §1). References: numpy's mean of the source
embedding, the tokenizers library and transformers' AutoTokenizer reading the written tokenizer
files, and transformers loading the exported model."""

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer

from diffujax.checkpoint import convert, export, load
from diffujax.models import flatten


def params_of(ckpt):
    config, state = load(ckpt)
    return config, {k: np.asarray(v) for k, v in flatten(state).items()
                    if not k.startswith("layers/")}


def test_fresh_mask_token(hf, hf_gpt2, tmp_path):
    src, model = hf_gpt2
    V = hf.V
    convert(src, tmp_path / "ckpt")
    config, p = params_of(tmp_path / "ckpt")
    wte = model.transformer.wte.weight.detach().numpy()
    assert config.vocab_size == V + 1 and config.mask_token_id == V
    assert np.array_equal(p["wte/embedding"][:V], wte)
    np.testing.assert_allclose(p["wte/embedding"][V], wte.mean(0), rtol=1e-6, atol=1e-7)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["mask_token_id"] == V

    tok = Tokenizer.from_file(str(tmp_path / "ckpt" / "tokenizer.json"))
    assert tok.encode("w1 <|mask|> w2").ids == [1, V, 2]
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "ckpt").mask_token_id == V

    export(tmp_path / "ckpt", tmp_path / "out")
    hf_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (hf_cfg["vocab_size"], hf_cfg["mask_token_id"]) == (V + 1, V)
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                                      output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.mask_token_id == V
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").mask_token_id == V


def test_fresh_mask_token_untied_head(hf, tmp_path):
    model = hf.tiny_model({**hf.LLAMA, "tie_word_embeddings": False})
    src = hf.write_hf(tmp_path / "src", model)
    convert(src, tmp_path / "ckpt")
    config, p = params_of(tmp_path / "ckpt")
    head = model.lm_head.weight.detach().numpy()  # [V, D]
    assert config.vocab_size == hf.V + 1 and p["lm_head"].shape == (32, hf.V + 1)
    np.testing.assert_allclose(p["lm_head"][:, hf.V], head.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(p["embed/embedding"][hf.V], model.model.embed_tokens.weight.detach().numpy().mean(0),
                               rtol=1e-6, atol=1e-7)


def test_mask_token_id_given(hf_gpt2, tmp_path):
    """--mask-token-id N (DiffuGPT-S style): vocabulary and weights untouched."""
    src, _ = hf_gpt2
    convert(src, tmp_path / "ckpt", mask_token_id=10)
    config, _ = load(tmp_path / "ckpt")
    assert (config.vocab_size, config.mask_token_id) == (64, 10)
    export(tmp_path / "ckpt", tmp_path / "out")
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mask_token_id_equal_to_vocab_adds_a_token(hf_gpt2, tmp_path):
    """DiffuGPT-M style: --mask-token-id 50257 on a 50257-token GPT-2 adds the token."""
    convert(hf_gpt2[0], tmp_path / "ckpt", mask_token_id=64)
    config, _ = load(tmp_path / "ckpt")
    assert (config.vocab_size, config.mask_token_id) == (65, 64)


def test_mask_token_from_config_then_tokenizer(hf, tmp_path):
    model = hf.tiny_model(hf.GPT2)
    src = hf.write_hf(tmp_path / "src", model)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "mask_token_id": 7}))
    hf.write_tokenizer(src, mask_token="w9")
    convert(src, tmp_path / "a")
    assert load(tmp_path / "a")[0].mask_token_id == 7  # config.json wins
    (src / "config.json").write_text(json.dumps(cfg))
    convert(src, tmp_path / "b")
    assert load(tmp_path / "b")[0].mask_token_id == 9  # then the tokenizer's mask token
    assert load(tmp_path / "b")[0].vocab_size == hf.V


def test_padded_embedding_uses_a_spare_row(hf, tmp_path):
    """An embedding larger than the tokenizer: the fresh token takes the tokenizer's next id."""
    model = hf.tiny_model(hf.GPT2)
    src = hf.write_hf(tmp_path / "src", model, tokenizer=False)
    hf.write_tokenizer(src, size=60)
    convert(src, tmp_path / "ckpt")
    config, p = params_of(tmp_path / "ckpt")
    assert (config.vocab_size, config.mask_token_id) == (64, 60)
    wte = model.transformer.wte.weight.detach().numpy()
    np.testing.assert_allclose(p["wte/embedding"][60], wte.mean(0), rtol=1e-6, atol=1e-7)
    assert np.array_equal(np.delete(p["wte/embedding"], 60, 0), np.delete(wte, 60, 0))
    assert Tokenizer.from_file(str(tmp_path / "ckpt" / "tokenizer.json")).token_to_id("<|mask|>") == 60


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_convert_dtype(hf_gpt2, tmp_path, dtype):
    convert(hf_gpt2[0], tmp_path / "ckpt", dtype=dtype)
    config, p = params_of(tmp_path / "ckpt")
    assert config.param_dtype == dtype and all(str(a.dtype) == dtype for a in p.values())
