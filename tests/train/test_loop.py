"""The shipped run configs, and the loop's non-finite safety stop (in-process).

Reference for the hyperparameters: docs/algorithms.md §2 (paper and reference code)."""

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


@pytest.mark.parametrize("name, expect", [
    ("diffugpt_s.yaml", dict(seq_len=512, global_batch=256, steps=1_000_000, peak_lr=3e-4,
                             schedule="cosine", warmup_steps=2000, anneal_steps=10_000,
                             mask_token_id=10541)),
    ("diffugpt_m.yaml", dict(seq_len=1024, global_batch=1280, steps=160_000, peak_lr=3e-4,
                             schedule="cosine", warmup_steps=2000, anneal_steps=10_000,
                             mask_token_id=50257)),
    ("diffullama_7b.yaml", dict(seq_len=2048, peak_lr=2e-5, schedule="constant", b1=0.9,
                                b2=0.95, weight_decay=0.1, mask_token_id=811, dtype="bfloat16")),
])
def test_paper_hyperparameters(name, expect):
    cfg = load_config(ROOT / "configs" / name)
    got = dict(seq_len=cfg.data.seq_len, global_batch=cfg.data.global_batch, steps=cfg.train.steps,
               peak_lr=cfg.optimizer.peak_lr, schedule=cfg.optimizer.schedule,
               warmup_steps=cfg.optimizer.warmup_steps, anneal_steps=cfg.diffusion.anneal_steps,
               mask_token_id=cfg.diffusion.mask_token_id, b1=cfg.optimizer.b1,
               b2=cfg.optimizer.b2, weight_decay=cfg.optimizer.weight_decay, dtype=cfg.model.dtype)
    assert {k: got[k] for k in expect} == expect


def test_nonfinite_steps_stop_the_run_with_the_last_good_state(tmp_path, monkeypatch, capsys):
    """Every loss is NaN: each update is skipped, and once ``max_bad_steps`` in a row are seen the
    run stops (status 3) with a checkpoint whose params are still the initial ones."""
    import diffujax.train.step as step_module
    from diffujax.parallel.mesh import make_mesh
    from diffujax.train import checkpointing as C
    from diffujax.train.loop import EXIT_BAD_STEPS, train
    from diffujax.train.metrics import read_jsonl
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
    # Metrics are read one step behind the device (which keeps it busy), so the stop comes one
    # step after the limit is reached.
    assert "stopped at step 4: the last 4 steps had a non-finite loss" in err
    assert "update skipped (3 in a row, 3 in total)" in err

    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["skipped_steps"] == 1 for r in records)
    assert not (tmp_path / "final").exists()

    model_cfg = cfg.resolve_model_config()
    mesh = make_mesh(cfg.mesh)
    rules = cfg.mesh.rule_table()
    ckpt = C.TrainCheckpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [4]
    target = C.abstract_like(abstract_train_state(cfg, model_cfg),
                             train_state_shardings(cfg, model_cfg, mesh, rules))
    restored = ckpt.restore_latest(target)
    ckpt.close()
    fresh = create_train_state(cfg, model_cfg, mesh, rules)
    assert int(restored.state.step) == 4 and int(restored.state.total_bad_steps) == 4
    for a, b in zip(jax.tree.leaves(restored.state.params), jax.tree.leaves(fresh.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


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
