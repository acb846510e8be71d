"""The shipped run configs, and the loop's non-finite safety stop (in-process)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffujax.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted([*(ROOT / "configs").glob("*.yaml"),
                  *(ROOT / "diffujax" / "assets").glob("*.yaml")])


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"diffugpt_s.yaml", "diffugpt_m.yaml", "diffullama_7b.yaml", "smollm2_135m_demo.yaml",
            "tiny.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.output_dir and cfg.train.steps > 0
    assert cfg.data.sources and (cfg.model.checkpoint or cfg.model.init)
    assert cfg.train.steps > cfg.optimizer.warmup_steps
    from diffujax.train.optim import make_schedule

    schedule = make_schedule(cfg.optimizer, cfg.train.steps)
    assert float(schedule(cfg.optimizer.warmup_steps)) == pytest.approx(cfg.optimizer.peak_lr)
    if cfg.model.init:  # a random model: its config must build too
        assert cfg.resolve_model_config().mask_token_id is not None


def test_nonfinite_steps_stop_the_run_with_the_last_good_state(tmp_path, monkeypatch, capsys):
    """Every loss is NaN: each update is skipped, and once ``max_bad_steps`` in a row are seen the
    run stops (status 3) with a checkpoint whose params are still the initial ones."""
    import diffujax.train.step as step_module
    from diffujax.parallel.mesh import make_layout
    from diffujax.train import checkpointing as C
    from diffujax.train.loop import EXIT_BAD_STEPS, train
    from diffujax.runs.metrics import read_jsonl
    from diffujax.train.state import (abstract_train_state, create_train_state,
                                      train_state_shardings)

    real = step_module.diffusion_loss_sums

    def poisoned(*args, **kwargs):
        sums = real(*args, **kwargs)
        return type(sums)(**{**vars(sums), "weighted": sums.weighted * jnp.nan})

    monkeypatch.setattr(step_module, "diffusion_loss_sums", poisoned)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"output_dir={tmp_path}", "train.steps=10", "train.max_bad_steps=3",
        "optimizer.warmup_steps=1", "logging.every_steps=1", "logging.eval_every=0",
        "logging.sample_every=0", "logging.tensorboard=false", "checkpoint.every_steps=100",
        "model.init.num_layers=1"])
    assert train(cfg) == EXIT_BAD_STEPS
    err = capsys.readouterr().err
    # Metrics are read one step behind the device (which keeps it busy); the step dispatched
    # after the limit was reached is a no-op, so the count is exact.
    assert "stopped at step 3: the last 3 steps had a non-finite loss" in err
    assert "update skipped (3 in a row, 3 in total)" in err
    assert "4 in a row" not in err

    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["skipped_steps"] == 1 for r in records)
    assert not (tmp_path / "final").exists()

    model_cfg = cfg.resolve_model_config()
    layout = make_layout(cfg.mesh)
    ckpt = C.TrainCheckpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [3]
    target = C.abstract_like(abstract_train_state(cfg, model_cfg),
                             train_state_shardings(cfg, model_cfg, layout))
    restored = ckpt.restore_latest(target)
    ckpt.close()
    fresh = create_train_state(cfg, model_cfg, layout)
    assert int(restored.state.step) == 3 and int(restored.state.total_bad_steps) == 3
    for a, b in zip(jax.tree.leaves(restored.state.params), jax.tree.leaves(fresh.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nonfinite_steps_right_after_a_resume_blame_the_checkpoint(tmp_path, monkeypatch,
                                                                   capsys):
    """A run resumes and every step after is non-finite: it stops after exactly max_bad_steps,
    says to suspect the checkpoint it resumed from, and rotation keeps that (finite) step although
    keep_last=1."""
    import diffujax.train.step as step_module
    from diffujax.train import checkpointing as C
    from diffujax.train.loop import EXIT_BAD_STEPS, train

    args = [f"output_dir={tmp_path}", "train.steps=4", "train.max_bad_steps=2",
            "optimizer.warmup_steps=1", "logging.every_steps=1", "logging.eval_every=0",
            "logging.sample_every=0", "logging.tensorboard=false", "checkpoint.every_steps=2",
            "checkpoint.keep_last=1", "model.init.num_layers=1"]
    assert train(load_config(ROOT / "configs" / "tiny.yaml", args)) == 0
    real = step_module.diffusion_loss_sums

    def poisoned(*a, **kw):
        sums = real(*a, **kw)
        return type(sums)(**{**vars(sums), "weighted": sums.weighted * jnp.nan})

    monkeypatch.setattr(step_module, "diffusion_loss_sums", poisoned)
    capsys.readouterr()
    cfg = load_config(ROOT / "configs" / "tiny.yaml", args + ["train.steps=10"])
    assert train(cfg) == EXIT_BAD_STEPS
    err = capsys.readouterr().err
    assert "stopped at step 6: the last 2 steps had a non-finite loss" in err
    assert "every step since resuming from checkpoint step 4 was non-finite: suspect that" in err
    ckpt = C.TrainCheckpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [4, 6]
    ckpt.close()


def test_a_crash_between_steps_saves_the_work_first(tmp_path, monkeypatch, capsys):
    """A data error at step 4 (after 3 steps, no periodic checkpoint yet): the run saves step 3,
    then raises the original error."""
    from diffujax.data.pipeline import Pipeline
    from diffujax.train import checkpointing as C
    from diffujax.train.loop import train

    real_iterator = Pipeline.iterator

    class Failing:
        def __init__(self, it):
            self.it, self.n = it, 0

        def __next__(self):
            self.n += 1
            if self.n == 4:
                raise OSError("disk on fire")
            return next(self.it)

        def __getattr__(self, name):
            return getattr(self.it, name)

    monkeypatch.setattr(Pipeline, "iterator", lambda self: Failing(real_iterator(self)))
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"output_dir={tmp_path}", "train.steps=10", "optimizer.warmup_steps=1",
        "logging.eval_every=0", "logging.sample_every=0", "logging.tensorboard=false",
        "checkpoint.every_steps=100", "model.init.num_layers=1"])
    with pytest.raises(OSError, match="disk on fire"):
        train(cfg)
    assert "checkpoint of step 3 saved before stopping" in capsys.readouterr().err
    ckpt = C.TrainCheckpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [3]
    ckpt.close()
