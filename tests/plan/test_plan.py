"""``diffujax plan``: the train step, eval and sampling programs compiled by the real TPU compiler
(libtpu) for multi-chip TPU descriptions on this CPU-only machine, with the kernels (backend
auto). References: parameter bytes per device counted by hand from the shapes and the sharding
rules; the batch a real data pipeline yields; the model FLOP formula written out; a brute-force
search for ``--fit``'s bisection.

The compiles are shared (module fixtures): tiny train step (annealed + full), a GPT-2-small shape,
eval, generate.
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from diffujax.cli import main
from diffujax.config import load_config
from diffujax.data.tokenizer import load_tokenizer
from diffujax.models import param_specs
from diffujax.parallel import tpu_env
from diffujax.parallel.topology import parse_slice, slice_devices
from diffujax.plan import search as fit_module
from diffujax.plan import plan
from diffujax.plan.analysis import make_target
from diffujax.plan.programs import abstract_batch, plan_model_config
from diffujax.plan.report import format_fit, format_report
from diffujax.train.data import build_data

FSDP_X_TP = ["mesh.shape.fsdp=2", "mesh.shape.tensor=2"]  # 4 chips of v5p-8


@pytest.fixture(scope="module")
def tiny_cfg():
    # anneal_steps > 0: the step while annealing (Pallas TPU kernel) and after (splash).
    return load_config("configs/tiny.yaml", FSDP_X_TP + ["optimizer.grad_accum_steps=2"])


@pytest.fixture(scope="module")
def tiny_report(tiny_cfg):
    return plan(tiny_cfg, "v5p-8", what="train")


@pytest.fixture(scope="module")
def gpt2_report():
    """A GPT-2-small shape (diffugpt_s's plan.model: 12 x 768, vocabulary 50257) on FSDP x TP,
    its layers scanned (the config unrolls them: minutes more to compile; test_unrolled_compile
    compiles that path)."""
    cfg = load_config("configs/diffugpt_s.yaml", FSDP_X_TP + [
        "data.seq_len=256", "data.global_batch=8", "diffusion.anneal_steps=0",
        "model.scan_layers=true"])
    return plan(cfg, "v5p-8", what="train")


def test_tiny_train_step_compiles_with_the_kernels(tiny_report):
    train, full = tiny_report["programs"]
    assert tiny_report["target"]["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert tiny_report["target"]["device_kind"] == "TPU v5"
    assert (train["name"], train["attention"]) == ("train", {"annealed": "pallas_tpu"})
    assert (full["name"], full["attention"]) == ("train_full", {"full": "splash"})
    for program in (train, full):
        # forward, dq and dkv kernels, once per layer (2) and micro-batch (2)
        assert program["kernel_calls"] == 3
        assert {k["runs"] for k in program["compiler_cycles"]["kernels"]} == {4}
        assert program["memory"]["fits"] and tiny_report["fits"]
    assert {k["declared"] for k in train["compiler_cycles"]["kernels"]} == {True}


def test_regression_kernels_partition_in_a_multichip_train_step(tiny_report):
    """Before the kernels ran under shard_map, compiling this step for a multi-chip TPU raised
    'Mosaic kernels cannot be automatically partitioned'. Now it compiles, the kernels are in the
    program, and their operands are per-device shards (batch 8 / fsdp 2, heads 4 / tensor 2)."""
    kernels = tiny_report["programs"][0]["compiler_cycles"]["kernels"]
    fwd = next(k for k in kernels if "fwd" in k["name"])
    micro_rows, seq, heads, head_dim = 8, 128, 4, 16
    per_device = 4 * (micro_rows // 2) * (heads // 2) * seq * seq * head_dim
    assert fwd["flops"] == per_device


def _hand_param_bytes(model_cfg, mesh_sizes: dict) -> int:
    """Bytes of one device's parameter shards: FSDP splits `embed`, TP splits heads, MLP and
    vocabulary (a dimension the axis does not divide stays whole), float32."""
    axis_of = {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
               "vocab": "tensor"}
    total = 0
    for spec in param_specs(model_cfg).values():
        used, elems = set(), 1
        for dim, name in zip(spec.shape, spec.axes):
            axis = axis_of.get(name)
            split = mesh_sizes.get(axis, 1) if axis and axis not in used else 1
            if split > 1 and dim % split == 0:
                used.add(axis)
                elems *= dim // split
            else:
                elems *= dim
        total += elems * 4
    return total


def test_hbm_report_matches_a_hand_count(tiny_cfg, tiny_report, gpt2_report):
    for cfg, report in ((tiny_cfg, tiny_report), (None, gpt2_report)):
        if cfg is None:
            cfg = load_config("configs/diffugpt_s.yaml")
        model_cfg, _ = plan_model_config(cfg)
        params = _hand_param_bytes(model_cfg, report["target"]["mesh"])
        for program in report["programs"]:
            mem = program["memory"]
            assert mem["params"] == params
            # AdamW: two moments like the params, plus a few scalar counters
            assert 2 * params <= mem["optimizer"] <= 2 * params + 64
            assert mem["total"] >= mem["params"] + mem["optimizer"] + mem["temporaries"]
    # For a real model XLA's own argument size agrees with the logical count (tile padding only).
    mem = gpt2_report["programs"][0]["memory"]
    assert mem["input_padding"] < 0.02 * (mem["params"] + mem["optimizer"])


def test_gpt2_small_shape_on_fsdp_x_tp(gpt2_report):
    (program,) = gpt2_report["programs"]
    assert program["attention"] == {"full": "splash"} and program["kernel_calls"] == 3
    assert gpt2_report["model"]["params"] == 124_439_808  # GPT-2 small, tied head
    # The run's step: GPT-2's config.json rates (0.1) drop out in training, so the plan's does.
    assert gpt2_report["config"]["dropout"] is True
    # FSDP gathers weights and reduces gradients; TP adds its all-reduces.
    assert {"all-gather", "all-reduce"} <= set(program["collectives"])
    # The 50257-row embedding is not divisible by tensor=2, so it stays split on embed only;
    # nothing is gathered whole but per-layer slices.
    assert "layers/attn/q_proj/kernel" not in program["gathered_whole"]
    # Model FLOPs: 6 N_matmul + 12 L d_attn per token, full bidirectional attention.
    d, layers, vocab, seq = 768, 12, 50257, 256
    n_matmul = layers * (4 * d * d + 2 * d * 4 * d) + d * vocab
    flops = (6 * n_matmul + 12 * layers * seq * d) * 8 * seq
    assert gpt2_report["model_flops_per_step"] == pytest.approx(flops)
    est = gpt2_report["estimate"]
    assert est["step_seconds"] > 0 and 0 < est["mfu"] < 1
    assert est["compute_seconds"] >= est["kernel_seconds"] > 0


def test_the_estimate_says_what_bounds_the_step(gpt2_report):
    """The step's time by category adds up to the estimate (the categories split the compiler's
    cycles; the kernels and the exposed communication are their own), largest first, and the
    text report prints it; GPT-2's 50257-token softmax and loss is a category of its own."""
    est = gpt2_report["estimate"]
    parts = {p["category"]: p["seconds"] for p in est["bound_by"]}
    assert sum(parts.values()) == pytest.approx(est["step_seconds"])
    assert sum(p["share"] for p in est["bound_by"]) == pytest.approx(1.0)
    assert parts["Pallas kernels"] == pytest.approx(est["kernel_seconds"])
    assert parts["matmul"] > 0 and parts["vocabulary"] > 0
    seconds = [p["seconds"] for p in est["bound_by"]]
    assert seconds == sorted(seconds, reverse=True)
    assert f"bound by: {est['bound_by'][0]['category']} " in format_report(gpt2_report)


def test_eval_program_compiles_through_the_cli(capsys, monkeypatch):
    # The CLI adds the run's libtpu flags to LIBTPU_INIT_ARGS and records them: kept out of this
    # test process's environment (libtpu reads it once; test_comms checks the flags themselves).
    # libtpu starts first, so the made-up flags below are recorded, never read (were this test the
    # first of its process to start libtpu, libtpu would abort on them).
    slice_devices(parse_slice("v5p-8"))
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_users_own=1")
    monkeypatch.setattr(tpu_env, "COLLECTIVE_FLAGS", {"v5p": ("--xla_a_flag=true",)})
    code = main(["plan", "--config", "configs/tiny.yaml", "--topology", "v5p-8", "--what", "eval",
                 "--json"] + FSDP_X_TP)
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["fits"]
    (program,) = report["programs"]
    assert program["name"] == "eval" and program["attention"] == {"full": "splash"}
    assert program["rows"] == 16 and program["kernel_calls"] == 1  # forward only
    assert "estimate" not in report
    assert report["target"]["libtpu_flags"] == ["--xla_users_own=1", "--xla_a_flag=true"]


def test_generate_program_compiles(tiny_cfg):
    report = plan(tiny_cfg, "v5p-8", what="generate")
    (program,) = report["programs"]
    assert program["name"] == "generate" and program["memory"]["fits"]
    assert program["rows"] == 2  # one row per batch shard (fsdp=2)
    assert program["kernel_calls"] >= 1 and "optimizer" not in program["memory"]


def test_abstract_batch_is_what_the_pipeline_yields(tiny_cfg):
    model_cfg, _ = plan_model_config(tiny_cfg)
    tokenizer = load_tokenizer(tiny_cfg.data.tokenizer, model_vocab_size=model_cfg.vocab_size)
    pipeline, _ = build_data(tiny_cfg, tokenizer, model_cfg)
    real = next(pipeline.iterator())
    target = make_target(tiny_cfg, "v5p-8")
    abstract = abstract_batch(tiny_cfg, tiny_cfg.data.global_batch, target.layout)
    assert set(abstract) == set(real)
    for name, value in real.items():
        assert abstract[name].shape == np.shape(value)
        assert abstract[name].dtype == np.asarray(value).dtype


def test_several_slices_put_data_across_slices():
    cfg = load_config("configs/tiny.yaml", ["mesh.shape.data=2", "mesh.shape.fsdp=2",
                                            "mesh.shape.tensor=2"])
    target = make_target(cfg, "v5p-8", num_slices=2)
    assert target.num_devices == 8
    devices = target.mesh.devices  # [data, fsdp, tensor]
    for i in range(2):
        assert {d.slice_index for d in devices[i].flat} == {i}
    with pytest.raises(ValueError, match="multiple of mesh.num_slices"):
        make_target(load_config("configs/tiny.yaml"), "v5p-8", num_slices=2)


def test_fit_bisection_finds_what_brute_force_finds(monkeypatch):
    """The search on a synthetic memory / time model (no compiles): HBM falls with the
    micro-batch, remat trades time for memory, a loss chunk trades a little time for the
    logits' memory; brute force over every setting is the reference."""
    cfg = load_config("configs/tiny.yaml", ["diffusion.anneal_steps=0", "data.global_batch=64",
                                            "model.loss_chunk=32",
                                            "mesh.shape.fsdp=4"])
    # HBM per chip and row (plus 10 for the state), and the time multiplier of the recompute;
    # the logits' HBM per row and the chunks' time multiplier, by loss chunk
    hbm = {"none": 20, "dots_with_attention": 14, "dots": 12, "full": 4}
    cost = {"none": 1.0, "dots_with_attention": 1.1, "dots": 1.15, "full": 1.35}
    logits = {0: 8, 32: 1}
    chunk_cost = {0: 1.0, 32: 1.02}
    total = lambda remat, chunk, accum: (  # noqa: E731
        (hbm[remat] + logits[chunk]) * (64 / accum / 4) + 10)
    seconds = lambda remat, chunk, accum: (  # noqa: E731
        cost[remat] * chunk_cost[chunk] * (1 + 0.05 * accum))

    def fake_programs(run_cfg, model_cfg, layout):
        return [SimpleNamespace(remat=model_cfg.remat, chunk=run_cfg.model.loss_chunk,
                                accum=run_cfg.optimizer.grad_accum_steps)]

    def fake_compile(program, target, model_cfg):
        used = total(program.remat, program.chunk, program.accum)
        return dict(memory=dict(total=used, fits=used <= 100), setting=(
            program.remat, program.chunk, program.accum))

    def fake_estimate(compiled, target, peak, flops, tokens):
        s = seconds(*compiled["setting"])
        return dict(step_seconds=s, mfu=0.5 / s)

    monkeypatch.setattr(fit_module, "train_programs", fake_programs)
    monkeypatch.setattr(fit_module, "compile_program", fake_compile)
    monkeypatch.setattr(fit_module, "estimate_step", fake_estimate)
    result = fit_module.fit(cfg, "v5p-8")
    assert fit_module.REMATS == ("none", "dots_with_attention", "dots", "full")
    choices = fit_module.accumulation_choices(64, 4)
    assert choices == [1, 2, 4, 8, 16]
    assert fit_module.loss_chunk_choices(128, 1024) == [0, 128, 256]  # LOSS_CHUNKS and its own
    chunks = fit_module.loss_chunk_choices(32, 128)  # L = 128: 256 is the unchunked loss
    assert chunks == [0, 32]
    settings = [(r, c, a) for r in fit_module.REMATS for c in chunks for a in choices]
    brute = min((seconds(*s), s) for s in settings if total(*s) <= 100)
    best = result["best"]
    remat, chunk, accum = brute[1]
    assert best["overrides"] == [f"optimizer.grad_accum_steps={accum}", f"model.remat={remat}",
                                 f"model.loss_chunk={chunk}"]
    assert best["step_seconds"] == pytest.approx(brute[0])
    assert brute[1] == ("none", 32, 4)  # the numbers above make it the one to find
    assert len(result["tried"]) < len(settings)  # bisection, not all
    assert "remat=none                loss_chunk=32   grad_accum_steps=4" in format_fit(result)


def test_block_train_step_compiles_for_a_multichip_v5p():
    """Block diffusion (docs/algorithms.md §9): the two-stream train step, blocks of 32 of 128,
    compiled by the real TPU compiler for 4 v5p chips (FSDP x TP), kernels under shard_map; its
    attention runs over the 2L = 256 positions of [x_t ; x_0]."""
    cfg = load_config("configs/tiny.yaml", FSDP_X_TP + [
        "diffusion.block_size=32", "diffusion.anneal_steps=0", "diffusion.complementary_mask=true",
        "model.init.num_layers=1"])
    report = plan(cfg, "v5p-8", what="train")
    (program,) = report["programs"]
    assert program["name"] == "train_blocks32" and program["memory"]["fits"]
    assert program["kernel_calls"] >= 1
    kernels = program["compiler_cycles"]["kernels"]
    assert kernels and all(k["runs"] == 1 for k in kernels)  # one layer, no accumulation
