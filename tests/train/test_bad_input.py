"""Bad input to ``diffujax train / eval / generate``: one line on stderr naming the option or key
and its valid range, exit status 2, before any weight is loaded where possible, and nothing
written. Run through the CLI entry point in-process (the subprocess tests cover the process)."""

import shutil

import jax
import numpy as np
import pytest
from damage import flip_a_byte_orbax_misses, orbax_read
from train_runs import ARGS, NO_SAMPLES, ROOT, STEPS, cli_error, losses

from diffujax.cli import main as cli


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fail the test if a command gets as far as reading model weights."""
    from diffujax.checkpoint import store
    from diffujax.models import flatten

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the arguments were checked")

    monkeypatch.setattr(store, "_restore", refuse)


EVAL = [  # (arguments, what the message must say)
    (["--seq-len", "0"], "--seq-len 0: must be >= 2"),
    (["--seq-len", "1"], "--seq-len 1: must be >= 2"),
    (["--seq-len", "129"], "--seq-len 129: must be <= 128, the model's maximum positions"),
    (["--blocks", "0"], "--blocks 0: must be >= 1"),
    (["--draws", "0"], "--draws 0: must be >= 1"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--seed", "-1"], "--seed -1: must be >= 0"),
    (["--block-size", "65"], "--block-size 65: must be in 0..64 (--seq-len 64; 0: the whole"
                             " sequence)"),
    (["--block-size", "-1"], "--block-size -1: must be in 0..64"),
]
GENERATE = [
    (["--steps", "0"], "--steps 0: must be >= 1"),
    (["--steps", "-3"], "--steps -3: must be >= 1"),
    (["--length", "0"], "--length 0: must be >= 1"),
    (["--length", "-5"], "--length -5: must be >= 1"),
    (["--length", "128"], "--length 128: the canvas (prompt, 128 generated tokens) is 129 tokens,"
                          " more than the model's 128 positions"),
    (["--prompt", "x" * 120, "--length", "8"], "is 129 tokens, more than the model's 128"),
    (["--num-samples", "0"], "--num-samples 0: must be >= 1"),
    (["--temperature", "-0.5"], "--temperature -0.5: must be >= 0"),
    (["--temperature", "nan"], "--temperature nan: must be >= 0"),
    (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
    (["--top-k", "0"], "--top-k 0: must be in 1..264"),
    (["--top-k", "265"], "--top-k 265: must be in 1..264"),
    (["--sampler", "semi_ar", "--block-length", "0"], "--block-length 0: must be >= 1"),
    (["--suffix", "end", "--infill-length", "0"], "--infill-length 0: must be >= 1"),
    (["--infill-length", "4"], "--infill-length 4: must be given with --suffix"),
    (["--sampler", "threshold", "--threshold", "0"], "--threshold 0.0: must be in (0, 1]"),
]


@pytest.mark.parametrize("extra, message", EVAL, ids=lambda x: " ".join(x)
                         if isinstance(x, list) else None)
def test_eval_arguments(reference, capsys, no_weight_reads, extra, message):
    argv = ["eval", "--checkpoint", str(reference / "final"), "--text", str(ROOT / "README.md"),
            "--seq-len", "64"]
    assert message in cli_error(capsys, argv + extra)


@pytest.mark.parametrize("extra, message", GENERATE, ids=lambda x: " ".join(x)[:40]
                         if isinstance(x, list) else None)
def test_generate_arguments(reference, capsys, no_weight_reads, extra, message):
    argv = ["generate", "--checkpoint", str(reference / "final")]
    assert message in cli_error(capsys, argv + extra)


def test_damaged_model_checkpoints(reference, tmp_path, capsys):
    """NaN weights (found at load, one reduction per array, named), a flipped byte that orbax
    reads without complaint (found by the checksums, named) and a half-deleted checkpoint: one
    line each from eval and generate."""
    from diffujax.checkpoint import store
    from diffujax.models import flatten

    cfg, params = store.load(reference / "final")
    flat = {k: np.array(v) for k, v in flatten(params).items()}
    flat["layers/attn/q_proj/kernel"][0, 1, 2, 3] = np.nan
    store.save(tmp_path / "nan", cfg, flat, tokenizer_from=reference / "final")
    flipped = tmp_path / "flipped"
    shutil.copytree(reference / "final", flipped)
    flip_a_byte_orbax_misses([p for p in (flipped / "params").rglob("*") if p.parent.name == "d"],
                             lambda: jax.tree.leaves(orbax_read(flipped / "params")))
    half = tmp_path / "half"
    shutil.copytree(reference / "final", half)
    files = sorted(p for p in (half / "params").rglob("*") if p.is_file())
    for p in files[: len(files) // 2]:
        p.unlink()
    text = str(ROOT / "README.md")
    for argv in (["eval", "--checkpoint", str(tmp_path / "nan"), "--text", text, "--seq-len", "64"],
                 ["generate", "--checkpoint", str(tmp_path / "nan"), "--steps", "4"]):
        assert "parameter 'layers/attn/q_proj/kernel' holds NaN or inf values" in cli_error(capsys, argv)
    for argv in (["eval", "--checkpoint", str(flipped), "--text", text, "--seq-len", "64"],
                 ["generate", "--checkpoint", str(flipped), "--steps", "4"]):
        line = cli_error(capsys, argv)
        assert str(flipped) in line and "does not match its saved checksum" in line
    with pytest.raises(store.CheckpointError, match="does not match its saved checksum"):
        store.load(flipped, dtype="bfloat16")  # verified before the cast
    unrecorded = tmp_path / "unrecorded"  # checksums.json lost: damaged, not unverified
    shutil.copytree(reference / "final", unrecorded)
    (unrecorded / "checksums.json").unlink()
    with pytest.raises(store.CheckpointError, match="checksums.json: missing"):
        store.load(unrecorded)
    for argv in (["eval", "--checkpoint", str(half), "--text", text, "--seq-len", "64"],
                 ["generate", "--checkpoint", str(half), "--steps", "4"]):
        line = cli_error(capsys, argv)
        assert str(half) in line and ("cannot be read" in line or "missing" in line)


def _train(out_dir, *extra):
    return ["train", *ARGS, f"output_dir={out_dir}", NO_SAMPLES, *extra]


RUN_CONFIG = [  # run-config values that cannot work, refused when the config loads
    ("diffusion.mask_token_id=264", "diffusion.mask_token_id: 264 is outside the vocabulary"
                                    " (0..263)"),
    ("diffusion.mask_token_id=-1", "diffusion.mask_token_id: -1 is outside the vocabulary"),
    ("diffusion.mask_token_id=256", "diffusion.mask_token_id: 256 is the EOS token"),
    ("model.init.hidden_size=66", "num_heads: (4) must divide hidden_size (66)"),
    ("data.seq_len=256", "data.seq_len: (256) exceeds the model's maximum positions (128)"),
    ("mesh.shape={data: 1, fsdp: 1, tensor: 8}", "mesh.shape (tensor): size 8 must divide the"
                                                 " model's heads (4)"),
    ("data.options.seq_length=3", "unknown config key 'data.options.seq_length'"),
    ("data.options.seq_len=3", "data.options.seq_len: set data.seq_len instead"),
    ("data.sources=[{path: x, fromat: text}]", "unknown config key 'data.sources[0].fromat'"),
    ("data.sources=[{path: x, format: csv}]", "data.sources[0].format: 'csv' is not one of"),
    ("diffusion.per_sequence_norm=true", "unknown config key 'diffusion.per_sequence_norm'"),
    ("optimizer.warmup_steps=20", "optimizer.warmup_steps: (20) must be below the cosine decay's"
                                  " end (optimizer.decay_steps, else train.steps: 20)"),
]


@pytest.mark.parametrize("override, message", RUN_CONFIG, ids=[o for o, _ in RUN_CONFIG])
def test_run_config_values_that_cannot_work(tmp_path, capsys, override, message):
    assert message in cli_error(capsys, _train(tmp_path / "run", override))
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_checkpoint_model_is_checked_before_its_weights(reference, tmp_path, capsys,
                                                          no_weight_reads):
    argv = ["train", "--config", "configs/tiny.yaml", f"output_dir={tmp_path / 'run'}",
            "model.init=null", f"model.checkpoint={reference / 'final'}",
            "diffusion.mask_token_id=256"]
    assert "diffusion.mask_token_id: 256 is the EOS token" in cli_error(capsys, argv)


def test_resume_refuses_what_the_checkpoint_cannot_honour(reference, corpus, tmp_path, capsys,
                                                          no_weight_reads):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    config_before = (run_dir / "config.yaml").read_text()
    line = cli_error(capsys, _train(run_dir, *corpus, "model.init.hidden_size=32",
                                 "model.init.num_heads=2", "diffusion.mask_token_id=257"))
    for part in ("model.init.hidden_size: 64 -> 32", "model.init.num_heads: 4 -> 2",
                 "diffusion.mask_token_id: 258 -> 257", "start a new run in another output_dir"):
        assert part in line
    line = cli_error(capsys, _train(run_dir, *corpus, "train.steps=18"))
    assert "train.steps=18 is below the checkpoint's step 20" in line
    assert (run_dir / "config.yaml").read_text() == config_before  # still the run's own


def test_resume_applies_and_reports_what_it_can_honour(reference, corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    assert cli(_train(run_dir, *corpus, f"train.steps={STEPS + 2}", "optimizer.peak_lr=1e-3")) == 0
    err = capsys.readouterr().err
    assert "config changes applied from this step on:" in err
    assert "optimizer.peak_lr: 0.003 -> 0.001" in err and f"train.steps: {STEPS} -> {STEPS + 2}" in err
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 3))
    assert {s: v for s, v in got.items() if s <= STEPS} == losses(reference)
    assert "peak_lr: 0.001" in (run_dir / "config.yaml").read_text()


def test_a_lost_data_state_is_only_restarted_when_asked(reference, corpus, tmp_path, capsys):
    """No step holds its data-iterator state: the resume is refused (nothing moved), naming the
    key that allows it; with ``checkpoint.restart_data=true`` it resumes and says so."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    for data in (run_dir / "checkpoints").glob("*/data"):
        shutil.rmtree(data)
    line = cli_error(capsys, _train(run_dir, *corpus))
    assert "no data-iterator state" in line and "checkpoint.restart_data=true" in line
    assert not (run_dir / "checkpoints" / "corrupt").exists()
    assert cli(_train(run_dir, *corpus, "checkpoint.restart_data=true")) == 0
    err = capsys.readouterr().err
    assert f"resumed from {run_dir / 'checkpoints' / str(STEPS)}" in err
    assert "the data stream restarts" in err
