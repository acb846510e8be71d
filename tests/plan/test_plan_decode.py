"""``diffujax plan --what decode``: one pass of the cached block decoder (docs/algorithms.md §9)
compiled by the real TPU compiler for a 4-chip v5e at a given batch and KV-cache length.
References: the KV cache's bytes and the pass's matmul FLOPs counted by hand from the model's
shapes; ``decode_blocks`` itself (a spy on the function it calls per pass, and its own pass
counter on CPU for the tokens-per-pass assumption); the throughput formula applied to the
report's own pass time."""

import json

import jax
import numpy as np
import pytest

from diffujax.cli import main
from diffujax.config import load_config
from diffujax.diffusion import decoding
from diffujax.models import LlamaConfig, cached_fn_for, init_cache, init_params
from diffujax.parallel import tpu_env
from diffujax.plan import plan
from diffujax.plan.analysis import make_target
from diffujax.plan.estimate import tokens_per_pass
from diffujax.plan.programs import decode_step_program, plan_model_config
from diffujax.plan.report import format_report

TOPOLOGY = "v5litepod-4"
BLOCK = 8
# tiny.yaml's llama: 2 layers, hidden 64, 4 query heads and 2 KV heads of 16, MLP 192, vocab 264.
BLOCK_MODEL = [f"diffusion.block_size={BLOCK}", "diffusion.anneal_steps=0", "mesh.shape.fsdp=2",
               "mesh.shape.tensor=2"]


@pytest.fixture(scope="module")
def report():
    cfg = load_config("configs/tiny.yaml", BLOCK_MODEL)
    return plan(cfg, TOPOLOGY, what="decode", batch=4, context=60)  # 60 -> 64 whole blocks


def hand_matmul_flops(rows, n, length, layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16,
                      mlp=192, vocab=264):
    """2 x multiply-adds of one pass: q/k/v/o projections, SwiGLU's three matmuls, the block's
    queries against every cached key (q.k and p.v over the whole cache), the LM head."""
    tokens = rows * n
    projections = tokens * hidden * (2 * heads * head_dim + 2 * kv_heads * head_dim)
    attention = 2 * rows * heads * n * length * head_dim
    per_layer = projections + 3 * tokens * hidden * mlp + attention
    return 2 * (layers * per_layer + tokens * hidden * vocab)


def test_decode_step_memory_and_flops_by_hand(report):
    (program,) = report["programs"]
    assert program["name"] == "decode_step" and program["attention"] == {"cached": "xla"}
    assert program["decode_step"] == dict(batch=4, context=60, cache_length=64,
                                          block_size=BLOCK)
    mem = program["memory"]
    # keys and values x layers x rows per batch shard (4 / fsdp 2) x 64 x 2 KV heads x 16, f32
    assert mem["cache"] == 2 * (2 * 2 * 64 * 2 * 16 * 4)
    assert mem["batch"] == 2 * BLOCK * 4  # the block's int32 tokens, split over the rows
    assert mem["fits"] and mem["total"] >= mem["params"] + mem["cache"]
    assert program["matmul_flops"] == hand_matmul_flops(4, BLOCK, 64)
    # the compiled pass: one layer scan, the whole layer's KV written in place (no loop on data)
    assert program["compiler_cycles"]["cycles"] > 0


def test_decode_step_reports_tokens_per_second_per_chip(report):
    e, chips = report["estimate"], report["target"]["devices"]
    assert chips == 4
    assert e["pass_seconds"] == e["step_seconds"] == pytest.approx(
        e["xla_seconds"] + e["kernel_seconds"] + e["exposed_communication_seconds"])
    assert e["mfu"] == pytest.approx(hand_matmul_flops(4, BLOCK, 64) / (
        chips * report["target"]["peak_flops_per_chip"] * e["pass_seconds"]))
    per_row = {"one_token_per_denoising_pass": BLOCK / (BLOCK + 1),
               "whole_block_per_denoising_pass": BLOCK / 2}
    assert e["tokens_per_pass_per_row"] == pytest.approx(per_row)
    for key, tokens in per_row.items():
        assert e["tokens_per_second_per_chip"][key] == pytest.approx(
            4 * tokens / e["pass_seconds"] / chips)
    text = format_report(report)
    rate = e["tokens_per_second_per_chip"]
    assert (f"tokens/s per chip: {rate['one_token_per_denoising_pass']:,.0f} at one token per"
            " denoising pass" in text)
    assert "KV cache 64.0 KiB per chip (4 rows x 64 positions over 4 chips)" in text


@pytest.mark.parametrize("steps, passes_per_block", [(BLOCK, BLOCK + 1), (1, 2)])
def test_tokens_per_pass_is_what_the_decoder_does(steps, passes_per_block):
    """The two regimes of ``tokens_per_pass`` on a real decode (CPU): the confidence rule with
    ``steps = N`` commits one token per denoising pass, with ``steps = 1`` the whole block; each
    block then takes a commit pass (all but the last). Prompt: one block (the prefill)."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1, intermediate_size=64, max_positions=64,
                         mask_token_id=63, block_size=BLOCK)
    blocks = 3
    prompt = np.random.default_rng(0).integers(0, 60, (2, BLOCK), dtype=np.int32)
    out = decoding.decode_blocks(
        cached_fn_for(config), init_params(config, seed=1), prompt, np.full(2, BLOCK, np.int32),
        init_cache(config, 2, (blocks + 1) * BLOCK), jax.random.key(0), block_size=BLOCK,
        new_tokens=blocks * BLOCK, mask_token_id=63, sampler="confidence", steps=steps)
    assert int(out.forwards) == 1 + blocks * passes_per_block - 1
    regime = ("one_token_per_denoising_pass" if steps == BLOCK
              else "whole_block_per_denoising_pass")
    assert tokens_per_pass(BLOCK)[regime] == BLOCK / passes_per_block
    assert tokens_per_pass(1) == dict(one_token_per_denoising_pass=1.0,
                                      whole_block_per_denoising_pass=1.0)


def test_the_planned_pass_is_the_one_the_decoder_calls(monkeypatch):
    """A spy on ``decoding.block_pass`` sees the same call (model function, block shape, block
    size) from lowering the plan's program and from ``decode_blocks`` decoding on CPU."""
    calls = []
    real = decoding.block_pass

    def spy(cached_fn, params, tokens, cache, offset, *, block_size):
        calls.append((cached_fn.func, cached_fn.args, tokens.shape, cache.length, block_size))
        return real(cached_fn, params, tokens, cache, offset, block_size=block_size)

    monkeypatch.setattr(decoding, "block_pass", spy)
    cfg = load_config("configs/tiny.yaml", BLOCK_MODEL)
    model_cfg, _ = plan_model_config(cfg)
    target = make_target(cfg, TOPOLOGY)
    decode_step_program(cfg, model_cfg, target.layout, 2, 3 * BLOCK).lower()
    assert len(calls) == 1
    planned = calls[0]
    prompt = np.random.default_rng(1).integers(0, 250, (2, BLOCK), dtype=np.int32)
    decoding.decode_blocks(cached_fn_for(model_cfg), init_params(model_cfg, seed=0), prompt,
                           np.full(2, BLOCK, np.int32), init_cache(model_cfg, 2, 3 * BLOCK),
                           jax.random.key(0), block_size=BLOCK, new_tokens=2 * BLOCK,
                           mask_token_id=int(model_cfg.mask_token_id), sampler="confidence",
                           steps=2)
    # its logits' shape, the prefill of the prompt's block, the loop's pass: the planned call
    assert calls[1:] == [planned] * 3


def _plan(args):
    return main(["plan", "--config", "configs/tiny.yaml", "--topology", TOPOLOGY] + args)


def test_decode_json_and_bad_input(capsys, monkeypatch):
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "")  # this process's libtpu has started already
    monkeypatch.setattr(tpu_env, "COLLECTIVE_FLAGS", {})
    assert _plan(["--what", "decode", "--json"] + BLOCK_MODEL) == 0
    r = json.loads(capsys.readouterr().out)
    # the defaults: one row per batch shard (fsdp=2), a cache of data.seq_len (128)
    assert r["programs"][0]["decode_step"] == dict(batch=2, context=128, cache_length=128,
                                                   block_size=BLOCK)
    assert r["estimate"]["tokens_per_second_per_chip"]["one_token_per_denoising_pass"] > 0
    for args, message in [
            (["--what", "decode", "diffusion.anneal_steps=0"], "not a block diffusion model"),
            (["--what", "decode", "--batch", "3"] + BLOCK_MODEL,
             "--batch 3: must be a positive multiple of the mesh's 2 batch shards"),
            (["--what", "decode", "--batch", "0"] + BLOCK_MODEL,
             "--batch 0: must be a positive multiple of the mesh's 2 batch shards"),
            (["--what", "decode", "--context", "0"] + BLOCK_MODEL, "--context 0: must be >= 1"),
            (["--what", "decode", "--context", "129"] + BLOCK_MODEL,
             "--context 129: a cache of 136 positions (whole blocks of 8) exceeds the model's"
             " 128 positions"),
            (["--batch", "4"], "--batch and --context belong to --what decode")]:
        assert _plan(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
