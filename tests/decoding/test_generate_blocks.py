"""``diffujax generate`` on a block diffusion model and with ``--sampler ar``, and the block size
in config.json: written, read back, refused when bad, and ignored by transformers (which loads
a block checkpoint as the plain AR model its weights are)."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from diffujax.attention import causal
from diffujax.checkpoint import save
from diffujax.cli import main as cli
from diffujax.config import MeshSection, MeshShape
from diffujax.inference.generation import decode
from diffujax.models import ConfigError, config_from_hf, forward
from diffujax.parallel.mesh import make_layout
from diffujax.runtime import load_for_inference
from diffujax.tasks.engine import Engine, Row
from tiny_models import tiny_model

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/word_tokenizer.py
from word_tokenizer import write_word_tokenizer  # noqa: E402

WORDS, UNK, MASK, EOS = 60, 60, 61, 62
BLOCK = 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{"blocks": ..., "full": ...}``: the same tiny LLaMA, with block size 4 and without."""
    root = tmp_path_factory.mktemp("generate_blocks")
    (root / "tok").mkdir()
    write_word_tokenizer(root / "tok", words=WORDS, unk=UNK, mask=MASK, eos=EOS)
    config, params = tiny_model("llama", mask_token_id=MASK, bos_token_id=EOS,
                                eos_token_id=EOS, max_positions=46)
    out = {}
    for name, size in (("blocks", BLOCK), ("full", 0)):
        out[name] = save(root / name, config.replace(block_size=size), params,
                         tokenizer_from=root / "tok")
    return out, config, params


def run_json(capsys, argv):
    assert cli(["generate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_block_model_decodes_with_the_cache_by_default(checkpoints, capsys):
    paths, _, _ = checkpoints
    argv = ["--checkpoint", str(paths["blocks"]), "--prompt", "w1 w2 w3", "--length", "10",
            "--keep-after-eos"]
    out = run_json(capsys, argv + ["--threshold", "1"])
    assert out["decoder"] == "blocks" and out["sampler"] == "threshold"
    # [EOS] w1 w2 w3 is one complete block: one prefill pass. The 10 new tokens fill blocks
    # 1..3 (positions 4..15); no probability exceeds 1, so each pass commits exactly one
    # token (the most confident): 4 denoising passes per block, a commit pass between blocks.
    assert out["forward_passes"] == 1 + 3 * BLOCK + 2
    assert out["text"].startswith("w1 w2 w3")
    model = load_for_inference(str(paths["blocks"]))
    api, _ = decode(model, [[EOS, 1, 2, 3]], new_tokens=10, sampler="threshold", steps=64,
                    seed=0, threshold=1.0, stop_at_eos=False)
    assert out["text"] == "w1 w2 w3" + model.tokenizer.decode_generated(api.tokens[0],
                                                                       stop_at_eos=False)
    # a lower threshold commits several tokens per pass on this model
    assert run_json(capsys, argv + ["--threshold", "0.1"])["forward_passes"] < 15


def test_ar_sampler_is_greedy_autoregressive_decoding(checkpoints, capsys):
    paths, config, params = checkpoints
    out = run_json(capsys, ["--checkpoint", str(paths["full"]), "--prompt", "w5 w6",
                            "--length", "6", "--ar", "--keep-after-eos"])
    assert out["decoder"] == "ar" and out["forward_passes"] == 6  # prefill + 5
    seq = [EOS, 5, 6]
    for _ in range(6):
        logits = forward(config, params, jnp.asarray([seq]), causal())
        seq.append(int(np.argmax(np.asarray(logits)[0, -1])))
    tokenizer = load_for_inference(str(paths["full"])).tokenizer
    assert out["text"] == "w5 w6" + tokenizer.decode_generated(seq[3:], stop_at_eos=False)


def test_task_engine_decodes_a_block_model_with_the_cache(checkpoints):
    """The task path: rows of different context and span lengths, decoded 3 at a time, each
    equal to that row decoded alone; a row with a suffix (infilling) is refused."""
    paths, _, _ = checkpoints
    model = load_for_inference(str(paths["blocks"]))
    engine = Engine(model, batch_size=3, seed=7)
    rows = [Row.make([EOS] + list(range(1, 1 + k)), [0] * span, row_id=10 + i)
            for i, (k, span) in enumerate([(2, 5), (6, 9), (3, 2), (9, 7)])]
    spans = engine.diffusion_decode(rows, sampler="threshold", threshold=0.2, steps=8)
    for row, span in zip(rows, spans):
        context = [t for t, f in zip(row.tokens, row.fixed) if f]
        alone, _ = decode(model, [context], new_tokens=len(span), sampler="threshold",
                          threshold=0.2, steps=8, seed=7, stop_at_eos=False,
                          row_ids=[row.row_id])
        assert span == [int(t) for t in alone.tokens[0]]
    with pytest.raises(ValueError, match="infilling .* is not defined"):
        engine.diffusion_decode([Row.make([EOS, 1], [0, 0], row_id=0, suffix=[5])])


@pytest.fixture
def no_weight_reads(monkeypatch):
    from diffujax.checkpoint import store

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the arguments were checked")

    monkeypatch.setattr(store, "_restore", refuse)


REFUSED = [
    ("blocks", ["--suffix", "w9"], "--suffix: infilling is not defined here: a block diffusion"
                                   " model (block size 4) decodes left to right"),
    ("full", ["--ar", "--suffix", "w9"], "--suffix: infilling is not defined here: AR decoding"),
    ("blocks", ["--block-length", "8"], "--block-length 8: a block diffusion model decodes in"
                                        " its own blocks of 4"),
    ("full", ["--ar", "--sampler", "confidence"],
     "--sampler confidence: must be left out or ar with --ar"),
    # [EOS] w1 w2 + 43 = 46 positions, the model's all, but 48 in whole blocks
    ("blocks", ["--length", "43"], "--length 43: the canvas (prompt, 43 generated tokens in"
                                   " whole blocks of 4) is 48 tokens, more than the model's 46"),
]


@pytest.mark.parametrize("which, extra, message", REFUSED)
def test_bad_generate_arguments_are_refused_before_weights_load(
        checkpoints, capsys, no_weight_reads, which, extra, message):
    paths, _, _ = checkpoints
    argv = ["generate", "--checkpoint", str(paths[which]), "--prompt", "w1 w2", *extra]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("diffujax ")]
    assert len(lines) == 1 and message in lines[0], err


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_block_size_round_trips_through_config_json_and_transformers_ignores_it(family):
    config, _ = tiny_model(family)
    config = config.replace(block_size=BLOCK)
    hf = config.to_hf()
    assert hf["diffusion_block_size"] == BLOCK and hf["mask_token_id"] == config.mask_token_id
    back = config_from_hf(hf)
    assert back.block_size == BLOCK and back.to_hf() == hf
    assert back.replace(extra_hf="{}") == config  # extra_hf: the special ids, kept as written
    assert "diffusion_block_size" not in config.replace(block_size=0).to_hf()
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**hf))
    assert type(model).__name__ == hf["architectures"][0]
    for bad in (-1, 2.5, "4", True):
        with pytest.raises(ConfigError, match="'diffusion_block_size'=.*must be an integer"):
            config_from_hf({**hf, "diffusion_block_size": bad})


def test_cached_decoding_on_a_mesh_equals_one_device(checkpoints):
    """Weights sharded fsdp 4 x tensor 2 over the 8 simulated devices, 3 rows padded to the 4
    batch shards: the same tokens as on one device, block decoder and AR decoder alike."""
    paths, _, _ = checkpoints
    section = MeshSection(shape=MeshShape(data=1, fsdp=4, tensor=2))
    meshed = load_for_inference(str(paths["blocks"]),
                                layout=make_layout(section, jax.devices()[:8]))
    single = load_for_inference(str(paths["blocks"]))
    prompts = [[EOS, 1, 2], [EOS, 4, 5, 6, 7, 8], [EOS]]
    for sampler in ("threshold", "ar"):
        options = dict(new_tokens=9, sampler=sampler, steps=8, seed=2, threshold=0.2,
                       stop_at_eos=False, timed=False)
        got, _ = decode(meshed, prompts, **options)
        want, _ = decode(single, prompts, **options)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        assert int(got.forwards) == int(want.forwards)
