"""``eval`` and ``generate`` on a mesh against the same calls on one device (the reference: the
unsharded computation of the same math). A tiny random LLaMA saved as a diffujax checkpoint with
a word-level tokenizer; 8 simulated CPU devices (tests/conftest.py)."""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from diffujax.config import MeshSection, MeshShape
from diffujax.inference.perplexity import evaluate, read_blocks
from diffujax.inference.generation import build_canvas, sample
from diffujax.parallel.mesh import make_layout
from diffujax.runtime import load_for_inference, layout_from_args, parse_mesh

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # tests/word_tokenizer.py
from word_tokenizer import write_word_tokenizer  # noqa: E402

V, MASK, EOS = 64, 62, 63  # w0..w60, <unk>=61, <mask>, <eos> (also BOS)
SEQ_LEN = 16
MESHES = {"fsdp4_tensor2": (1, 4, 2), "data2_fsdp2_tensor2": (2, 2, 2)}


def write_tokenizer(directory: pathlib.Path) -> None:
    write_word_tokenizer(directory, words=V - 3, unk=V - 3, mask=MASK, eos=EOS)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``(checkpoint dir, text file)``."""
    from diffujax.checkpoint import save
    from diffujax.models import LlamaConfig, init_params

    root = tmp_path_factory.mktemp("inference_mesh")
    (root / "tok").mkdir()
    write_tokenizer(root / "tok")
    config = LlamaConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=64, tie_word_embeddings=False, max_positions=64,
                         mask_token_id=MASK, bos_token_id=EOS, eos_token_id=EOS)
    params = init_params(config, seed=0)
    # Larger weights than the 0.02 init: peaked distributions, so greedy choices are no near-ties
    # that float rounding (sharded vs unsharded sums) could flip.
    params = jax.tree.map(lambda x: x * 8.0, params)
    save(root / "ckpt", config, params, tokenizer_from=root / "tok")
    rng = np.random.default_rng(0)
    text = root / "text.txt"
    text.write_text(" ".join(f"w{i}" for i in rng.integers(0, V - 3, 4 * SEQ_LEN)) + "\n")
    return root / "ckpt", text


@functools.cache
def _model(ckpt, mesh_shape=None):
    if mesh_shape is None:
        return load_for_inference(str(ckpt))
    data, fsdp, tensor = mesh_shape
    section = MeshSection(shape=MeshShape(data=data, fsdp=fsdp, tensor=tensor))
    layout = make_layout(section, jax.devices()[:data * fsdp * tensor])
    return load_for_inference(str(ckpt), layout=layout)


@functools.cache
def _results(ckpt, text, mesh_shape=None):
    """AR and diffusion estimates and two samplers' tokens, on one device or a mesh."""
    model = _model(ckpt, mesh_shape)
    # 3 blocks x 2 draws = 6 rows in batches of 3: rounded up to 4 rows on the 4 batch shards of
    # both meshes, the last batch padded.
    blocks = read_blocks(model.tokenizer, str(text), SEQ_LEN, 3)
    ar = evaluate(model, blocks, objective="ar", batch_size=3)
    diffusion = evaluate(model, blocks, objective="diffusion", draws=2, batch_size=3, seed=1)
    ids, src, _ = build_canvas(model, "w1 w2 w3", 8, "w4 w5")
    canvas, srcs = np.tile(ids, (3, 1)), np.tile(src, (3, 1))  # 3 rows: padded to 4 on a mesh
    confidence, _ = sample(model, canvas, srcs, sampler="confidence", steps=4, seed=0)
    ancestral, _ = sample(model, canvas, srcs, sampler="ancestral", steps=4, seed=3)
    return ar, diffusion, confidence.tokens, ancestral.tokens


@pytest.mark.parametrize("mesh_shape", list(MESHES.values()), ids=list(MESHES))
def test_mesh_matches_single_device(files, mesh_shape):
    ckpt, text = files
    ar, diffusion, confidence, ancestral = _results(ckpt, text, mesh_shape)
    ar_ref, diffusion_ref, confidence_ref, ancestral_ref = _results(ckpt, text)
    for est, ref in ((ar, ar_ref), (diffusion, diffusion_ref)):
        np.testing.assert_allclose(est.mean_nll, ref.mean_nll, rtol=1e-5)
        np.testing.assert_allclose(est.std_error, ref.std_error, rtol=1e-4)
        assert (est.num_tokens, est.num_sequences) == (ref.num_tokens, ref.num_sequences)
    # 3 blocks; the diffusion estimate averages each block's 2 draws and counts blocks as units.
    assert ar_ref.num_sequences == diffusion_ref.num_sequences == 3
    assert diffusion_ref.num_draws == 2 and diffusion_ref.num_tokens == ar_ref.num_tokens
    assert confidence.shape == ancestral.shape == (3, confidence_ref.shape[1])
    np.testing.assert_array_equal(confidence, confidence_ref)
    np.testing.assert_array_equal(ancestral, ancestral_ref)
    assert len({tuple(row) for row in ancestral}) > 1  # the rows really drew different samples
    assert not (confidence == MASK).any()


def test_params_are_restored_into_their_shards(files):
    params = _model(files[0], MESHES["fsdp4_tensor2"]).params
    wq = params["layers"]["attn"]["q_proj"]["kernel"]  # [layers, embed, heads, head_dim]
    assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
    assert wq.addressable_shards[0].data.shape == (2, 32 // 4, 4 // 2, 8)
    assert params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")


def test_cli_eval_on_a_mesh(files, capsys):
    from diffujax.cli import main

    ckpt, text = files
    argv = ["eval", "--checkpoint", str(ckpt), "--text", str(text), "--objective", "ar",
            "--seq-len", str(SEQ_LEN), "--blocks", "3", "--batch-size", "3", "--json",
            "--distributed", "false"]
    assert main(argv + ["--mesh", "data=2,fsdp=-1,tensor=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = _results(ckpt, text)[0]
    np.testing.assert_allclose(out["nelbo"], ref.mean_nll, rtol=1e-5)
    assert out["tokens"] == ref.num_tokens
    assert main(argv + ["--mesh", "data=3,tensor=2"]) == 2  # 6 of 8 devices: a clear error
    assert "8 are available" in capsys.readouterr().err


def test_mesh_option():
    assert parse_mesh("auto") == "auto" and parse_mesh("none") is None
    assert parse_mesh("tensor=2,fsdp=-1") == MeshShape(data=1, fsdp=-1, tensor=2)
    for bad in ("pipeline=2", "fsdp=2,fsdp=2", "fsdp=two", "data=-1,fsdp=-1", "data=0"):
        with pytest.raises(ValueError):
            parse_mesh(bad)
    args = argparse.Namespace(mesh="auto", distributed="false")
    layout = layout_from_args(args)  # more than one device: all of them on fsdp
    assert layout.axis_sizes == {"data": 1, "fsdp": 8, "tensor": 1}
    assert layout.rules == MeshSection().rule_table()
