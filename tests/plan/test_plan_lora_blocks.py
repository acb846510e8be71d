"""``diffujax plan`` on block diffusion and LoRA runs. References: the phases a training run walks
through, step by step (``step_config``, ``is_annealing``: what the loop's ``_step_fn`` reads),
for the programs plan compiles; the run's own step-0 state (``create_train_state`` on CPU) and a
hand count of the adapters' shapes for a LoRA run's memory."""


import jax
import numpy as np
import pytest

from diffujax.attention.pattern import is_annealing
from diffujax.config import load_config
from diffujax.parallel.mesh import make_layout
from diffujax.plan import plan
from diffujax.plan.analysis import make_target
from diffujax.plan.programs import plan_model_config, programs_for
from diffujax.plan.report import format_report
from diffujax.train.state import create_train_state
from diffujax.train.step import step_config


@pytest.mark.parametrize("anneal, schedule", [
    (50, "[[0, 32], [20, 64]]"),  # the block size changes while the mask anneals
    (10, "[[30, 64]]"),  # blocks of 32 (block_size), then 64 after the ramp
    (0, "[[0, 16], [40, 32], [70, 64]]")])
def test_plan_compiles_each_phase_the_run_walks_through(anneal, schedule):
    """One program per (block size, annealing phase) a run of ``train.steps`` meets, no more."""
    cfg = load_config("configs/tiny.yaml", [
        "diffusion.block_size=32", f"diffusion.anneal_steps={anneal}", "train.steps=100",
        f"diffusion.block_schedule={schedule}"])
    model_cfg, _ = plan_model_config(cfg)
    walked = {(step_config(cfg, s).diffusion.block_size, is_annealing(s, anneal))
              for s in range(cfg.train.steps)}
    programs = programs_for("train", cfg, model_cfg, make_target(cfg, "v5litepod-4").layout)
    planned = [(int(p.name.rsplit("_blocks", 1)[1]), p.pattern == "annealed") for p in programs]
    assert len(planned) == len(set(planned)) and set(planned) == walked


# tiny.yaml's llama: 2 layers, hidden 64, 4 query heads and 2 KV heads of 16, MLP 192, vocab 264
LAYERS, HIDDEN, Q, KV, MLP, VOCAB = 2, 64, 4 * 16, 2 * 16, 192, 264


def hand_adapters(rank):
    """Every projection's A [in, r] and B [r, out], per layer."""
    shapes = {"q": (HIDDEN, Q), "k": (HIDDEN, KV), "v": (HIDDEN, KV), "o": (Q, HIDDEN),
              "gate": (HIDDEN, MLP), "up": (HIDDEN, MLP), "down": (MLP, HIDDEN)}
    return LAYERS * sum(rank * (i + o) for i, o in shapes.values())


def test_lora_plan_memory_by_hand_and_against_the_runs_state():
    """A LoRA block-diffusion run on a data-parallel mesh (every chip holds the whole state, so
    bytes per chip are the state's): adapters, frozen base and optimizer state (AdamW's two
    moments of the adapters only) as counted by hand and as the run's own state holds them."""
    overrides = ["model.lora.rank=4", "diffusion.block_size=32", "diffusion.anneal_steps=0",
                 "mesh.shape.data=4", "mesh.shape.fsdp=1"]
    cfg = load_config("configs/tiny.yaml", overrides)
    report = plan(cfg, "v5litepod-4", what="train")
    (program,) = report["programs"]
    mem = program["memory"]
    base = (VOCAB * HIDDEN + HIDDEN
            + LAYERS * (HIDDEN * (2 * Q + 2 * KV) + 3 * HIDDEN * MLP + 2 * HIDDEN))
    assert report["model"]["params"] == base
    assert report["lora"] == dict(rank=4, alpha=16.0, targets=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        adapter_params=hand_adapters(4))
    assert (mem["params"], mem["frozen"]) == (4 * hand_adapters(4), 4 * base)  # float32
    assert 2 * mem["params"] <= mem["optimizer"] < 2 * mem["params"] + 64  # + step counters
    # the run's own step-0 state, on this machine's CPU
    state = create_train_state(load_config("configs/tiny.yaml", overrides[:3]),
                               cfg.resolve_model_config(), make_layout(
                                   load_config("configs/tiny.yaml").mesh, jax.devices()[:1]))
    nbytes = lambda tree: sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    assert (mem["params"], mem["frozen"], mem["optimizer"]) == (
        nbytes(state.params), nbytes(state.frozen), nbytes(state.opt_state))
    text = format_report(report)
    assert (f"HBM per chip: adapters 38.0 KiB, frozen base {4 * base / 1024:.1f} KiB, optimizer"
            in text)
    assert "LoRA: rank 4 (alpha 16) on q_proj, k_proj" in text
