"""A resume that changes what the learning-rate schedule is drawn from says so: extending
``train.steps`` stretches a decay that ends at ``train.steps`` (the rate of every later step
changes), and the list of applied changes gives the new schedule and the next step's rate, old
and new, against the cosine formula written out here."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from diffujax.config import load_config, to_dict
from diffujax.train.resume import check_resume

ROOT = Path(__file__).resolve().parents[2]
PEAK, WARMUP = 3e-3, 10  # configs/tiny.yaml's peak_lr; min_lr_ratio: the default 0.1


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # tiny.yaml's paths are relative to the repository


def _config(*overrides) -> dict:
    return to_dict(load_config("configs/tiny.yaml", [f"optimizer.warmup_steps={WARMUP}",
                                                     *overrides]))


def cosine_lr(count: int, decay_steps: int) -> float:
    """Linear warmup to PEAK, then half a cosine down to 0.1 * PEAK at ``decay_steps``."""
    if count < WARMUP:
        return PEAK * count / WARMUP
    end = 0.1 * PEAK
    progress = min(count - WARMUP, decay_steps - WARMUP) / (decay_steps - WARMUP)
    return end + (PEAK - end) * 0.5 * (1 + math.cos(math.pi * progress))


def test_longer_train_steps_lists_the_stretched_schedule():
    lines = check_resume(_config("train.steps=100"), _config("train.steps=200"), 60, "run/60")
    assert lines[0] == "train.steps: 100 -> 200"
    assert len(lines) == 2, lines
    assert lines[1] == (
        f"learning-rate schedule redrawn: warmup to 0.003 over {WARMUP} steps, then cosine decay"
        f" to 0.0003 at step 200 (was: warmup to 0.003 over {WARMUP} steps, then cosine decay to"
        f" 0.0003 at step 100); step 61 trains at lr {cosine_lr(60, 200):.3g} (was"
        f" {cosine_lr(60, 100):.3g})")


def test_no_schedule_line_where_the_schedule_does_not_change():
    fixed = check_resume(_config("train.steps=100", "optimizer.decay_steps=100"),
                         _config("train.steps=200", "optimizer.decay_steps=100"), 60, "run/60")
    assert fixed == ["train.steps: 100 -> 200"]
    constant = check_resume(_config("train.steps=100", "optimizer.schedule=constant"),
                            _config("train.steps=200", "optimizer.schedule=constant"), 60, "r")
    assert constant == ["train.steps: 100 -> 200"]
    assert check_resume(_config("logging.every_steps=5"), _config(), 60, "r") == [
        "logging.every_steps: 5 -> 10"]


def test_a_new_peak_lr_redraws_the_schedule():
    lines = check_resume(_config(), _config("optimizer.peak_lr=0.001"), 50, "r")
    assert lines[-1].startswith("learning-rate schedule redrawn: warmup to 0.001 over")


def test_weight_decay_scope_changes_on_resume():
    """Switching to the reference's ``all`` is honoured and listed."""
    assert check_resume(_config(), _config("optimizer.weight_decay_scope=all"), 60, "r") == [
        "optimizer.weight_decay_scope: 'matrices' -> 'all'"]
