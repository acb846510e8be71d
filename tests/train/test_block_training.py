"""Block diffusion in training (docs/algorithms.md §9): the config keys and their errors, which
block size each step runs with (schedule, composed with annealing), a block train step that
learns, the training loop switching compiled steps along a schedule, and resuming with a changed
schedule."""

import dataclasses
import pathlib

import jax
import numpy as np
import pytest

from diffujax.attention.pattern import is_annealing
from diffujax.config import ConfigError, load_config
from diffujax.train.resume import check_resume
from diffujax.train.step import make_train_step, step_config

import train_worker

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"  # data.seq_len 128


@pytest.mark.parametrize("override, message", [
    ("diffusion.block_size=-1", "diffusion.block_size: -1 must be >= 0"),
    ("diffusion.block_size=129", "diffusion.block_size: block size 129 exceeds data.seq_len"
                                 " (128)"),
    ("diffusion.block_schedule=[[0, 8], [0, 16]]", "diffusion.block_schedule[1]: step 0 must"
     " come after the previous entry's step 0 (steps strictly increasing)"),
    ("diffusion.block_schedule=[[5, 8], [2, 16]]", "diffusion.block_schedule[1]: step 2 must"
     " come after the previous entry's step 5"),
    ("diffusion.block_schedule=[[0, 0]]", "diffusion.block_schedule[0]: block size 0 must be"
                                          " >= 1"),
    ("diffusion.block_schedule=[[-1, 8]]", "diffusion.block_schedule[0]: step -1 must be >= 0"),
    ("diffusion.block_schedule=[[0, 8, 2]]", "diffusion.block_schedule[0]: [0, 8, 2] must be a"
                                             " pair [step, block_size]"),
    ("diffusion.block_schedule=[[0, 8], [10, 256]]", "diffusion.block_schedule[1]: block size"
                                                     " 256 exceeds data.seq_len (128)"),
    ("diffusion.block_schedule=[8]", "diffusion.block_schedule[0]: expected a list, got int 8"),
    ("diffusion.complementary_mask=2", "diffusion.complementary_mask: expected a boolean"),
    ("model.init.block_size=8", "model.init.block_size: set diffusion.block_size instead"),
])
def test_bad_block_settings_are_named_in_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_schedule_says_which_block_size_each_step_runs():
    # warmup-stable-decay: blocks of 8, then the whole sequence, then blocks of 8 again
    cfg = load_config(TINY, ["diffusion.block_size=32", "diffusion.anneal_steps=4",
                             "diffusion.block_schedule=[[2, 8], [5, 128], [7, 8]]",
                             "train.steps=9", "optimizer.warmup_steps=1"])
    sizes = [cfg.block_size_at(step) for step in range(9)]
    assert sizes == [32, 32, 8, 8, 8, 0, 0, 8, 8]  # 128 = data.seq_len: the whole sequence
    programs = [(c.diffusion.block_size, c.diffusion.block_schedule, is_annealing(step, 4))
                for step, c in ((step, step_config(cfg, step)) for step in range(9))]
    # annealing composes: the ramp (steps 0..2, r = (step + 1) / 4 < 1) then the full pattern
    assert programs == [(32, (), True), (32, (), True), (8, (), True), (8, (), False),
                        (8, (), False), (0, (), False), (0, (), False), (8, (), False),
                        (8, (), False)]
    # The model records what it is trained as at the end: blocks of 8.
    assert cfg.resolve_model_config().block_size == 8
    assert load_config(TINY).resolve_model_config().block_size == 0  # the default: unchanged
    assert load_config(TINY, ["diffusion.block_size=128"]).resolve_model_config().block_size == 0


def test_a_scheduled_config_must_be_resolved_before_compiling():
    cfg = train_worker.make_config("llama", diffusion__block_schedule=[[0, 4]])
    model_cfg = cfg.resolve_model_config()
    with pytest.raises(ValueError, match="pass step_config"):
        make_train_step(cfg, model_cfg, None, layout=None)


def _train(cfg, steps):
    """``steps`` train steps on one fixed batch, each run by the program the training loop would
    pick for it: (initial params, final state, the programs compiled, the batch)."""
    from diffujax.models import apply_fn_for
    from diffujax.parallel.mesh import make_layout
    from diffujax.train.state import create_train_state

    layout = make_layout(cfg.mesh, jax.devices()[:1])
    model_cfg = cfg.resolve_model_config()
    apply_fn = apply_fn_for(model_cfg)
    state = create_train_state(cfg, model_cfg, layout)
    initial = jax.tree.map(np.asarray, state.params)
    batch = layout.make_global_batch(train_worker.global_batches(1)[0])
    compiled, programs = {}, set()
    for step in range(steps):
        run_cfg = step_config(cfg, step)
        block = run_cfg.diffusion.block_size
        annealing = is_annealing(step, cfg.diffusion.anneal_steps)
        if block not in compiled:
            compiled[block] = make_train_step(run_cfg, model_cfg, apply_fn, layout)
        state, metrics = compiled[block](state, batch, annealing)
        programs.add((block, annealing))
        assert not int(metrics["skipped"]) and np.isfinite(float(metrics["loss"]))
    return initial, state, sorted(programs), batch


def test_a_block_train_step_learns():
    """Blocks of 4 of 16 with complementary masking and the annealing ramp inside the blocks:
    the block NELBO of the training batch, on fixed draws, falls."""
    from diffujax.attention.pattern import full
    from diffujax.diffusion.blocks import block_diffusion_loss_sums
    from diffujax.models import apply_fn_for

    cfg = train_worker.make_config("llama", diffusion__block_size=4,
                                   diffusion__complementary_mask=True,
                                   diffusion__normalization="tokens", train__steps=20)
    initial, state, programs, batch = _train(cfg, 20)
    assert programs == [(4, False), (4, True)]  # annealed for steps 0..2, then full attention
    model_cfg = cfg.resolve_model_config()

    @jax.jit
    def nelbo(params):  # eight fixed draws of the block NELBO per token
        losses = [block_diffusion_loss_sums(
            apply_fn_for(model_cfg), params, batch["tokens"], jax.random.key(draw), block_size=4,
            mask_token_id=3, pattern=full(), normalization="tokens").loss for draw in range(8)]
        return sum(losses) / 8

    before, after = float(nelbo(initial)), float(nelbo(state.params))
    assert after < 0.75 * before, (before, after)


def test_the_loop_compiles_one_step_per_block_size_and_evaluates_the_block_bound(
        tmp_path, monkeypatch, capsys):
    import diffujax.train.loop as loop_module
    import diffujax.train.step as step_module
    from diffujax.runs.metrics import read_jsonl

    real = loop_module.make_train_step
    compiled = []

    def spy(run_cfg, model_cfg, *args):
        compiled.append((run_cfg.diffusion.block_size, model_cfg.block_size))
        return real(run_cfg, model_cfg, *args)

    monkeypatch.setattr(loop_module, "make_train_step", spy)
    real_elbo, scored_with = step_module.elbo_terms, []

    def elbo_spy(*args, **kwargs):
        scored_with.append(kwargs["block_size"])
        return real_elbo(*args, **kwargs)

    monkeypatch.setattr(step_module, "elbo_terms", elbo_spy)
    cfg = load_config(TINY, [
        f"output_dir={tmp_path}", "train.steps=4", "optimizer.warmup_steps=1",
        "diffusion.anneal_steps=0", "diffusion.block_schedule=[[0, 8], [2, 32], [3, 8]]",
        "data.seq_len=32", "data.global_batch=8", "model.init.num_layers=1",
        "logging.every_steps=1", "logging.eval_every=4", "logging.eval_batches=1",
        "logging.sample_every=0", "logging.tensorboard=false", "checkpoint.every_steps=100"])
    assert loop_module.train(cfg) == 0
    # blocks of 8 for steps 0, 1 and 3 (one program), the whole sequence for step 2
    assert compiled == [(8, 8), (0, 8)]
    err = capsys.readouterr().err
    assert "step 0: training on blocks of 8" in err
    assert "step 2: training on the whole sequence" in err
    assert "step 3: training on blocks of 8" in err
    (record,) = read_jsonl(tmp_path / "metrics.jsonl", kind="eval")
    assert np.isfinite(record["nelbo"]) and record["nelbo"] > 0 and record["tokens"] == 8 * 31
    assert scored_with == [8]  # the held-out bound is the block NELBO of the final block size


def test_resuming_may_change_the_block_schedule():
    old = load_config(TINY, ["diffusion.block_schedule=[[0, 8], [100, 128]]"])
    same = load_config(TINY, ["diffusion.block_schedule=[[0, 8], [100, 128]]"])
    new = load_config(TINY, ["diffusion.block_schedule=[[0, 8], [100, 128], [150, 8]]",
                             "diffusion.complementary_mask=true"])
    from diffujax.config import to_dict

    assert check_resume(to_dict(old), to_dict(same), 120, "ckpt") == []  # nothing changed
    lines = check_resume(to_dict(old), to_dict(new), 120, "ckpt")
    assert len(lines) == 2 and lines[0].startswith("diffusion.block_schedule: ")
    with pytest.raises(ValueError, match="diffusion.eps"):
        check_resume(to_dict(old), to_dict(load_config(TINY, ["diffusion.eps=0.01"])), 120, "c")


def test_eval_command_reports_the_block_bound(tmp_path, capsys):
    """``diffujax eval --block-size N``: the block NELBO, said in words and in the JSON line;
    the same number as ``evaluate`` computes for the model configured with that block size."""
    import json

    from diffujax.checkpoint import store
    from diffujax.cli import main
    from diffujax.inference.perplexity import evaluate, read_blocks
    from diffujax.models import LlamaConfig, init_params
    from diffujax.runtime import load_for_inference

    config = LlamaConfig(vocab_size=264, hidden_size=32, num_layers=1, num_heads=4,
                         num_kv_heads=2, intermediate_size=64, max_positions=64,
                         mask_token_id=258, bos_token_id=256, eos_token_id=256)
    store.save(tmp_path / "ckpt", config, init_params(config, seed=0),
               tokenizer_from=ROOT / "configs" / "tokenizers" / "bytes")
    argv = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--text", str(ROOT / "README.md"),
            "--seq-len", "32", "--blocks", "4", "--draws", "2", "--block-size", "8"]
    assert main(argv) == 0
    assert "block diffusion ELBO perplexity bound (blocks of 8)" in capsys.readouterr().out
    assert main(argv + ["--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = load_for_inference(str(tmp_path / "ckpt"))
    texts = read_blocks(model.tokenizer, str(ROOT / "README.md"), 32, 4)
    expected = evaluate(dataclasses.replace(model, config=model.config.replace(block_size=8)),
                        texts, objective="diffusion", draws=2)
    assert line["block_size"] == 8 and line["draws"] == 2 and line["tokens"] == 4 * 31
    np.testing.assert_allclose(line["nelbo"], expected.mean_nll, rtol=1e-5)
    np.testing.assert_allclose(line["stderr"], expected.std_error, rtol=1e-4)
