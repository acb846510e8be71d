"""Every script in benchmarks/ runs at a tiny size, so that none breaks unnoticed (the TPU
block-size search, which compiles for TPU chips, in tests/tpu/test_block_sizes_benchmark.py). The
scripts run in-process through their ``main``; where one compares diffujax with a plain PyTorch
implementation on the same weights, the agreement it prints as a check is asserted."""

import math
import pathlib
import runpy
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # word_tokenizer.py

from word_tokenizer import save_word_checkpoint  # noqa: E402



def script(name: str):
    """``main`` of ``benchmarks/NAME.py`` (scripts, not a package)."""
    return runpy.run_path(str(ROOT / "benchmarks" / f"{name}.py"))["main"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random 2-layer LLaMA saved by diffujax, with a word-level tokenizer (w0..w60)."""
    return save_word_checkpoint(tmp_path_factory.mktemp("benchmarks"), words=61, num_layers=2,
                                max_positions=512)


def test_train_step_matches_the_torch_step():
    """The command behind the README's train-step figure, on its tiny model: the first-step losses
    of diffujax's step and the torch step (same weights, same noised batch) agree."""
    [r] = script("train_step")(["--model", "tiny", "--batch", "2", "--seq-len", "16",
                                "--steps", "1"])
    assert r["jax_loss"] == pytest.approx(r["torch_loss"], rel=1e-5)
    assert r["jax_tokens_s"] > 0 and r["torch_tokens_s"] > 0


def test_attention_backends():
    rows = script("attention")(["--lengths", "128", "--tokens", "128", "--kinds", "full",
                                "annealed", "--iters", "1"])
    assert {(r["backend"], r["kind"]) for r in rows} == {
        (b, k) for b in ("xla", "pallas_tpu", "pallas_gpu") for k in ("full", "annealed")}
    assert [r for r in rows if "error" in r] == []  # the script turns a failure into a row
    assert all(r["fb"] > 0 for r in rows)


def test_sampling(checkpoint, capsys):
    script("sampling")(["--checkpoint", str(checkpoint), "--batch-sizes", "2", "--steps", "2",
                        "--length", "8", "--thresholds", "0.5"])
    out = capsys.readouterr().out
    [row] = [line.split() for line in out.splitlines() if line.strip().startswith("2 ")]
    assert len(row) == 4 and row[3].endswith("x")  # batch, diffujax and torch tok/s, ratio
    assert "threshold 0.50: " in out


def test_tasks_table(checkpoint):
    from diffujax.tasks.runner import TASKS

    results = script("tasks_table")(["--checkpoint", str(checkpoint), "--limit", "1",
                                     "--humaneval-items", "1", "--levels", "2", "--steps", "2",
                                     "--batch-size", "2"])
    assert [(r["task"], r["objective"]) for r in results] == [
        (t, o) for o in ("ar", "diffusion") for t in TASKS]
    assert all(r["items"] == 1 for r in results)


def test_adaptation(checkpoint, tmp_path):
    """Both recipes train from the same checkpoint and are scored at step 0, every 2 steps and at
    the last; step 0 is the base model, so the full-sequence and the block bound differ there
    only by the bound (same weights), and training moves both."""
    rows = script("adaptation")(["--checkpoint", str(checkpoint), "--steps", "3",
                                 "--eval-every", "2", "--seq-len", "16", "--batch", "8",
                                 "--block-size", "4", "--eval-batches", "1",
                                 "--output-dir", str(tmp_path), "--json"])
    assert [(r["block_size"], r["step"]) for r in rows] == [(b, s) for b in (0, 4)
                                                             for s in (0, 2, 3)]
    assert all(math.isfinite(r["nelbo"]) and r["nelbo"] > 0 for r in rows)
    for block in (0, 4):
        curve = [r["nelbo"] for r in rows if r["block_size"] == block]
        assert curve[0] != curve[-1]  # the steps trained the model that was scored
    assert (tmp_path / "block4" / "final").is_dir() and (tmp_path / "full" / "final").is_dir()
