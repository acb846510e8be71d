"""HF -> diffujax -> HF round trips. References: the source files as written by transformers,
torch.save or safetensors (read back with safetensors.torch / torch.load, not with diffujax), and
transformers itself reloading the export (no missing/unexpected keys, identical logits)."""

import json
import pathlib

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from diffujax.attention import causal
from diffujax.checkpoint import convert, export, load
from diffujax.models import forward

IGNORED = (".attn.bias",)  # GPT-2 causal-mask buffers: dropped by design


def read_all(directory) -> dict:
    d = pathlib.Path(directory)
    if (d / "pytorch_model.bin").exists():
        return torch.load(d / "pytorch_model.bin", weights_only=True)
    if (d / "model.safetensors").exists():
        return load_file(d / "model.safetensors")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(d / shard))
    assert set(out) == set(index["weight_map"])
    return out


def assert_bit_exact(src, out):
    expected = {k: v for k, v in src.items() if not k.endswith(IGNORED)}
    assert sorted(out) == sorted(expected)
    for name, a in expected.items():
        b = out[name]
        assert (b.dtype, b.shape) == (a.dtype, a.shape), name
        assert torch.equal(a.contiguous().view(torch.uint8), b.view(torch.uint8)), name


CASES = {  # family config, torch dtype, source format, GPT-2 naming
    "gpt2_safetensors": ("GPT2", {}, torch.float32, "safetensors", "transformers"),
    "gpt2_sharded": ("GPT2", {}, torch.float32, "sharded", "transformers"),
    "gpt2_bin_with_tied_head": ("GPT2", {}, torch.float32, "bin", "transformers"),
    "gpt2_bare_names_with_buffers": ("GPT2", {}, torch.float32, "raw", "bare"),
    "gpt2_diffugpt_names": ("GPT2", {}, torch.float32, "raw", "diffugpt"),
    "gpt2_untied": ("GPT2", {"tie_word_embeddings": False}, torch.float32, "safetensors", "transformers"),
    "llama_tied_f32": ("LLAMA", {"tie_word_embeddings": True}, torch.float32, "safetensors", "transformers"),
    "llama_untied_bf16": ("LLAMA", {"tie_word_embeddings": False}, torch.bfloat16, "safetensors", "transformers"),
    "llama_untied_bf16_sharded": ("LLAMA", {"tie_word_embeddings": False}, torch.bfloat16, "sharded", "transformers"),
    "llama_tied_bf16_bin": ("LLAMA", {"tie_word_embeddings": True}, torch.bfloat16, "bin", "transformers"),
    "qwen2_tied_f32": ("QWEN2", {"tie_word_embeddings": True}, torch.float32, "safetensors", "transformers"),
    "qwen2_untied_bf16_sharded": ("QWEN2", {"tie_word_embeddings": False}, torch.bfloat16, "sharded", "transformers"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_roundtrip_is_bit_exact(hf, tmp_path, case):
    family, changes, dtype, fmt, naming = CASES[case]
    model = hf.tiny_model({**getattr(hf, family), **changes}, dtype)
    extra = {}
    if naming == "bare":  # what openai-community/gpt2 ships besides the weights
        extra = {f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 16, 16)) for i in range(2)}
    src = hf.write_hf(tmp_path / "src", model, fmt, naming, extra=extra)
    convert(src, tmp_path / "ckpt", no_mask_token=True)
    sharded = fmt == "sharded"
    export(tmp_path / "ckpt", tmp_path / "out", max_shard_size="20KB" if sharded else "5GB")
    out_files = {p.name for p in (tmp_path / "out").iterdir()}
    assert ("model.safetensors.index.json" in out_files) == sharded
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= out_files
    assert_bit_exact(read_all(src), read_all(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")

    # diffujax computes the same function as the source model.
    ids = np.random.default_rng(0).integers(0, hf.V, (2, 12))
    with torch.no_grad():
        ref = model(torch.as_tensor(ids)).logits.float().numpy()
    config, params = load(tmp_path / "ckpt", dtype="float32")
    ours = np.asarray(forward(config, params, ids, causal()))
    err = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    assert err <= (1e-5 if dtype == torch.float32 else 2e-2)

    if naming != "diffugpt":  # the wrapper's names are not transformers' (tested below)
        # Both directories loaded the same way (model.to(bfloat16) would also cast rope buffers).
        ref_model = transformers.AutoModelForCausalLM.from_pretrained(
            src, dtype=dtype, attn_implementation="eager")
        reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "out", output_loading_info=True, dtype=dtype, attn_implementation="eager")
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        with torch.no_grad():
            ids = torch.as_tensor(ids)
            assert torch.equal(reloaded(ids).logits, ref_model(ids).logits)


def test_diffugpt_export_with_transformers_names(hf, tmp_path):
    model = hf.tiny_model(hf.GPT2)
    src = hf.write_hf(tmp_path / "src", model, "raw", "diffugpt")
    convert(src, tmp_path / "ckpt", no_mask_token=True)
    export(tmp_path / "ckpt", tmp_path / "out", naming="transformers")
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.as_tensor(np.random.default_rng(0).integers(0, hf.V, (1, 10)))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_export_casts_dtype(hf, tmp_path, hf_gpt2):
    src, _ = hf_gpt2
    convert(src, tmp_path / "ckpt", no_mask_token=True)
    export(tmp_path / "ckpt", tmp_path / "out", dtype="bfloat16")
    out, ref = read_all(tmp_path / "out"), read_all(src)
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    assert torch.equal(out["transformer.wte.weight"], ref["transformer.wte.weight"].to(torch.bfloat16))


def test_load_into_shardings_and_dtype(hf_gpt2, tmp_path):
    """Restored straight into a 2-device mesh (tests/conftest.py gives 8 CPU devices)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from diffujax.parallel.logical import logical_to_spec

    src, _ = hf_gpt2
    convert(src, tmp_path / "ckpt", no_mask_token=True)
    mesh = jax.make_mesh((2,), ("tensor",), axis_types=(jax.sharding.AxisType.Explicit,))
    sharding = lambda path, spec: NamedSharding(mesh, logical_to_spec(spec.axes, mesh_axes={"tensor": 2}))
    config, params = load(tmp_path / "ckpt", shardings=sharding, dtype="bfloat16")
    wq = params["layers"]["attn"]["q_proj"]["kernel"]
    assert wq.sharding.spec == P(None, None, "tensor", None) and str(wq.dtype) == "bfloat16"
    assert config.param_dtype == "bfloat16"
    ref = read_all(src)["transformer.h.1.attn.c_attn.weight"][:, :32].reshape(32, 4, 8)
    np.testing.assert_array_equal(np.asarray(wq[1], np.float32),
                                  ref.to(torch.bfloat16).float().numpy())


def test_save_of_loaded_params(hf_gpt2, tmp_path):
    """load -> save (e.g. after training) -> export is still the source, bit for bit."""
    from diffujax.checkpoint import save

    src, _ = hf_gpt2
    convert(src, tmp_path / "a", no_mask_token=True)
    config, params = load(tmp_path / "a")
    save(tmp_path / "b", config, params, tokenizer_from=tmp_path / "a")
    export(tmp_path / "b", tmp_path / "out")
    assert_bit_exact(read_all(src), read_all(tmp_path / "out"))
    assert (tmp_path / "out" / "tokenizer.json").exists()


@pytest.mark.parametrize("family", ["GPT2", "LLAMA", "QWEN2"])
def test_state_dict_round_trip_in_memory(hf, family):
    from diffujax.checkpoint import from_state_dict, to_state_dict

    model = hf.tiny_model({**getattr(hf, family), "tie_word_embeddings": False}, torch.bfloat16)
    sd = model.state_dict()
    out = to_state_dict(*from_state_dict(model.config.to_dict(), sd))
    assert_bit_exact(sd, {k: torch.from_numpy(v.view(np.int16)).view(torch.bfloat16)
                          for k, v in out.items()})
