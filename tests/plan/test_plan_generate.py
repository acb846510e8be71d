"""``diffujax plan --what generate`` on a block diffusion model: the cached block decoder
(docs/algorithms.md §9) compiled by the real TPU compiler for a 4-chip v5e, and its tokens/s
estimate. References: the decoder's own pass counter on CPU (a real decode with the planned
settings), the KV cache's bytes counted by hand, the HLO's while loop and donated buffers, and the
throughput formula applied to the report's own step time."""

import json
import re

import jax
import numpy as np
import pytest

from diffujax.cli import main
from diffujax.config import load_config
from diffujax.diffusion.decoding import decode_blocks
from diffujax.models import LlamaConfig, cached_fn_for, init_cache, init_params
from diffujax.parallel import tpu_env
from diffujax.plan.analysis import _no_persistent_cache, make_target
from diffujax.plan.programs import (bytes_per_device, decode_plan, plan_model_config,
                                    programs_for)
from diffujax.plan.report import format_report

TOPOLOGY = "v5litepod-4"
BLOCK_MODEL = ["diffusion.block_size=32", "diffusion.anneal_steps=0", "mesh.shape.fsdp=2",
               "mesh.shape.tensor=2"]


@pytest.mark.parametrize("seq_len, block_size", [(128, 32), (96, 20), (64, 8), (40, 16),
                                                  (48, 1)])
def test_decode_plan_counts_the_passes_a_real_decode_makes(seq_len, block_size):
    """The planned forward passes equal ``decode_blocks``' own counter on a tiny random model
    decoding the planned prompt and new tokens with the planned confidence rule (CPU), for block
    sizes that do and do not divide the prompt and the canvas, and blocks of one token (AR)."""
    plan = decode_plan(seq_len, block_size)
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1, intermediate_size=64, max_positions=256,
                         mask_token_id=63, block_size=block_size)
    width, new = plan["prompt_width"], plan["new_tokens"]
    assert width + new == seq_len
    prompt = np.random.default_rng(0).integers(0, 60, (2, width), dtype=np.int32)
    out = decode_blocks(cached_fn_for(config), init_params(config, seed=1), prompt,
                        np.full(2, width, np.int32), init_cache(config, 2, plan["canvas"]),
                        jax.random.key(0), block_size=block_size, new_tokens=new,
                        mask_token_id=63, sampler="confidence", steps=plan["steps_per_block"])
    assert int(out.forwards) == plan["forward_passes"]
    assert plan["loop_passes"] == plan["forward_passes"] - (width >= block_size)


def test_block_model_plans_the_cached_decoder():
    """The program is ``decode_blocks``: one ``while`` over the passes, the KV cache's two arrays
    donated, split over the batch shards as a hand count says."""
    cfg = load_config("configs/tiny.yaml", BLOCK_MODEL)
    model_cfg, _ = plan_model_config(cfg)
    target = make_target(cfg, TOPOLOGY)
    program, ar = programs_for("generate", cfg, model_cfg, target.layout)
    assert program.name == "generate_cached" and program.rows == 2  # fsdp=2 batch shards
    assert (ar.name, ar.decode) == ("generate_ar", decode_plan(128, 1))  # its AR baseline
    with _no_persistent_cache():  # compile-only executables cannot be read back
        hlo = program.lower().compile().as_text()
    assert "jit(decode_blocks)/while" in hlo and re.search(r"= \(.*\) while\(", hlo)
    header = hlo.split("entry_computation_layout")[0]
    assert len(re.findall(r"\((\d+), \{\}\)", header.split("buffer_donor=")[-1])) == 2, header
    # layers x one row per device x canvas x kv heads x head_dim, float32, keys and values
    per_device = 2 * (2 * 1 * program.decode["canvas"] * 2 * 16 * 4)
    assert bytes_per_device(program.inputs["cache"]) == per_device


def test_generate_plan_reports_tokens_per_second_per_chip(capsys, monkeypatch):
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "")  # this process's libtpu has started already
    monkeypatch.setattr(tpu_env, "COLLECTIVE_FLAGS", {})
    code = main(["plan", "--config", "configs/tiny.yaml", "--topology", TOPOLOGY, "--what",
                 "generate", "--json"] + BLOCK_MODEL)
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["fits"]
    programs = report["programs"]
    assert [p["name"] for p in programs] == ["generate_cached", "generate_ar"]
    assert report["estimate"] == programs[0]["estimate"]  # the headline: the block decoder
    chips = report["target"]["devices"]
    assert chips == 4
    for program, block in zip(programs, (32, 1)):
        assert program["attention"] == {"cached": "xla"}
        d, e = program["decode"], program["estimate"]
        assert d == decode_plan(128, block)  # tiny.yaml: seq_len 128
        assert e["step_seconds"] == pytest.approx(e["xla_seconds"] + e["kernel_seconds"]
                                                  + e["exposed_communication_seconds"])
        rate = program["rows"] * d["new_tokens"] / e["step_seconds"]
        assert e["tokens_per_second"] == pytest.approx(rate)
        assert e["tokens_per_second_per_chip"] == pytest.approx(rate / chips)
        assert e["forward_passes_per_token"] == pytest.approx(d["forward_passes"]
                                                              / d["new_tokens"])
        # The loop's collectives run once per pass of the plan, not once per call.
        assert (max(c["executions"] for c in program["collectives"].values())
                >= d["loop_passes"])
        text = format_report(report)  # what the CLI prints without --json
        assert (f"{e['tokens_per_second_per_chip']:,.0f} tokens/s per chip (4 chips)" in text)
        assert (f"{d['forward_passes']} forward passes"
                f" ({d['forward_passes'] / d['new_tokens']:.2f} per new token)" in text)
    assert "[generate_cached] cached block decoder, blocks of 32" in text
    assert "[generate_ar] AR KV-cache decoder" in text
    assert programs[1]["estimate"]["forward_passes_per_token"] == 1
