"""Tiny Hugging Face model directories written by transformers / torch / safetensors themselves
(the independent side of every checkpoint test)."""

import json
import pathlib

import pytest
import torch
import transformers
from safetensors.torch import save_file

V = 64
GPT2 = dict(model_type="gpt2", vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=16,
            bos_token_id=63, eos_token_id=63)
LLAMA = dict(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=48,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=32, bos_token_id=63, eos_token_id=63)
QWEN2 = dict(LLAMA, model_type="qwen2", rope_theta=1000000.0)  # + q/k/v biases


def tiny_model(hf_config: dict, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(**hf_config)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # non-trivial biases and norms
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return model.to(dtype).eval()


def write_tokenizer(directory, mask_token=None, size=V):
    """A word-level tokenizer with exactly ``size`` ids: w0..w{size-3}, <unk>, <eos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(size - 2)}
    vocab.update({"<unk>": size - 2, "<eos>": size - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(pathlib.Path(directory) / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "unk_token": "<unk>"}
    if mask_token:
        config["mask_token"] = mask_token
    (pathlib.Path(directory) / "tokenizer_config.json").write_text(json.dumps(config))


def rename(state_dict, naming):
    """GPT-2 state dict (``transformer.`` names) in another spelling."""
    out = {}
    for k, v in state_dict.items():
        if naming == "bare":
            k = k.removeprefix("transformer.")
        elif naming == "diffugpt":
            k = "embed_tokens.weight" if k == "transformer.wte.weight" else k.replace("transformer.", "denoise_model.")
        out[k] = v
    return out


def write_hf(directory, model, fmt="safetensors", naming="transformers", tokenizer=True, extra=None):
    """``fmt``: safetensors | sharded (both by save_pretrained) | bin (torch.save) | raw (our
    renamed state dict through safetensors' own writer)."""
    directory = pathlib.Path(directory)
    if fmt in ("safetensors", "sharded"):
        model.save_pretrained(directory, max_shard_size="20KB" if fmt == "sharded" else "5GB")
    else:
        directory.mkdir(parents=True)
        model.config.save_pretrained(directory)
        sd = {k: v.contiguous() for k, v in rename(model.state_dict(), naming).items()}
        sd.update(extra or {})
        if fmt == "bin":
            torch.save(sd, directory / "pytorch_model.bin")
        else:
            save_file({k: v.clone() for k, v in sd.items()}, directory / "model.safetensors",
                      metadata={"format": "pt"})
    if tokenizer:
        write_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def hf_gpt2(tmp_path_factory):
    """A read-only GPT-2 HF directory (save_pretrained, with tokenizer) and its torch model."""
    model = tiny_model(GPT2)
    return write_hf(tmp_path_factory.mktemp("hf") / "gpt2", model), model


def leftovers(parent, name):
    """Temporary directories a failed write would have left next to ``parent/name``."""
    return [p.name for p in pathlib.Path(parent).iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture(scope="session")
def hf():
    """The helpers above, for tests (conftest modules are not importable by name)."""
    import types

    return types.SimpleNamespace(V=V, GPT2=GPT2, LLAMA=LLAMA, QWEN2=QWEN2, tiny_model=tiny_model,
                                 write_hf=write_hf, write_tokenizer=write_tokenizer,
                                 rename=rename, leftovers=leftovers)
