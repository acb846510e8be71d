"""Never lose work: ``diffujax train`` killed (SIGKILL), preempted (SIGTERM) or left with a
damaged newest checkpoint resumes, and its logged losses equal those of an uninterrupted run
EXACTLY. Reference: the uninterrupted run itself (same config, same machine, CPU)."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from diffujax.train.metrics import read_jsonl

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 20
ARGS = ["--config", "configs/tiny.yaml", f"train.steps={STEPS}", "optimizer.warmup_steps=3",
        "checkpoint.every_steps=5", "checkpoint.keep_last=3", "logging.every_steps=1",
        "logging.eval_every=10", "logging.eval_batches=1"]
NO_SAMPLES = "logging.sample_every=0"  # samples do not touch the training stream; they cost time


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A frozen copy of tiny.yaml's corpus (the repository's sources change while we test)."""
    root = tmp_path_factory.mktemp("corpus")
    for src in sorted((ROOT / "diffujax").rglob("*.py")):
        dst = root / "train" / src.relative_to(ROOT).as_posix().replace("/", "__")
        dst.parent.mkdir(exist_ok=True)
        shutil.copyfile(src, dst)
    (root / "eval").mkdir()
    shutil.copyfile(ROOT / "README.md", root / "eval" / "README.md")
    return [f"data.sources=[{{path: '{root / 'train'}'}}]",
            f"data.eval_sources=[{{path: '{root / 'eval'}'}}]"]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    return env


def _start(out_dir, corpus, *extra):
    cmd = [sys.executable, "-m", "diffujax.cli", "train", *ARGS, *corpus, f"output_dir={out_dir}",
           *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _run(out_dir, corpus, *extra, expect=0):
    proc = _start(out_dir, corpus, *extra)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == expect, out
    return out


def _wait_for_step(proc, out_dir, step, checkpoint=None, timeout=120):
    """Poll the run's metrics.jsonl until ``step`` is logged (and ``checkpoint`` finalised)."""
    path = out_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before step {step}:\n{proc.stdout.read()}"
        ready = checkpoint is None or (out_dir / "checkpoints" / str(checkpoint) /
                                       "_CHECKPOINT_METADATA").exists()
        if ready and path.exists() and any(r["step"] >= step for r in _losses_safe(path)):
            return
        time.sleep(0.01)
    raise TimeoutError(f"step {step} not reached in {timeout}s")


def _losses_safe(path):
    try:
        return read_jsonl(path)
    except ValueError:  # a line being written
        return []


def _losses(out_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(out_dir / "metrics.jsonl")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    """The uninterrupted run (with samples at its last step)."""
    out_dir = tmp_path_factory.mktemp("reference")
    _run(out_dir, corpus, f"logging.sample_every={STEPS}")
    return out_dir


def test_uninterrupted_run_outputs(reference):
    losses = _losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1]  # it learns
    records = read_jsonl(reference / "metrics.jsonl", kind=None)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20] and all(r["ppl_bound"] > 1 for r in evals)
    assert [len(r["samples"]) for r in records if r["kind"] == "text"] == [4]
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    assert (reference / "config.yaml").is_file()
    assert sorted(int(p.name) for p in (reference / "checkpoints").iterdir()) == [10, 15, 20]

    from diffujax.checkpoint import store

    cfg, params = store.load(reference / "final")  # what `diffujax eval/generate` read
    assert cfg.mask_token_id == 258 and (reference / "final" / "tokenizer.json").is_file()


def test_sigkill_then_resume_is_exact(reference, corpus, tmp_path):
    proc = _start(tmp_path, corpus, NO_SAMPLES)
    _wait_for_step(proc, tmp_path, 7, checkpoint=5)
    proc.kill()  # SIGKILL: no handler, no cleanup, possibly in the middle of an async save
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    out = _run(tmp_path, corpus, NO_SAMPLES)
    assert "resumed from" in out
    assert _losses(tmp_path) == _losses(reference)


def test_sigterm_saves_then_resume_is_exact(reference, corpus, tmp_path):
    proc = _start(tmp_path, corpus, NO_SAMPLES)
    _wait_for_step(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "SIGTERM: checkpoint of step" in out
    stopped = max(_losses(tmp_path))  # every dispatched step is logged before exiting
    assert (tmp_path / "checkpoints" / str(stopped) / "_CHECKPOINT_METADATA").is_file()
    assert _losses(tmp_path) == {s: v for s, v in _losses(reference).items() if s <= stopped}
    out = _run(tmp_path, corpus, NO_SAMPLES)
    assert f"resumed from {tmp_path / 'checkpoints' / str(stopped)}" in out
    assert _losses(tmp_path) == _losses(reference)


def test_damaged_latest_checkpoint_falls_back_to_previous(reference, corpus, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    state = run / "checkpoints" / str(STEPS) / "state"
    biggest = max((p for p in state.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])  # truncated write
    out = _run(run, corpus, NO_SAMPLES)
    assert f"checkpoint step {STEPS} in" in out and "unusable" in out
    assert f"resumed from {run / 'checkpoints' / str(STEPS - 5)}" in out
    moved = [p.name.split("-")[0] for p in (run / "checkpoints" / "corrupt").iterdir()]
    assert moved == [str(STEPS)]
    assert _losses(run) == _losses(reference)
