"""Never lose work: ``diffujax train`` killed (SIGKILL), preempted (SIGTERM) or left with a
damaged newest checkpoint resumes, and its logged losses equal those of an uninterrupted run
EXACTLY. Reference: the uninterrupted run itself (same config, same machine, CPU; the shared
``reference`` fixture of conftest.py)."""

import shutil
import signal

import pytest
from train_runs import NO_SAMPLES, STEPS, losses, run, start, wait_for_step

from diffujax.runs.metrics import read_jsonl

pytestmark = pytest.mark.integration  # runs of the CLI as processes


def test_uninterrupted_run_outputs(reference):
    got = losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got[STEPS] < got[1]  # it learns
    records = read_jsonl(reference / "metrics.jsonl", kind=None)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20] and all(r["ppl_bound"] > 1 for r in evals)
    assert [len(r["samples"]) for r in records if r["kind"] == "text"] == [4]
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    assert (reference / "config.yaml").is_file()
    assert sorted(int(p.name) for p in (reference / "checkpoints").iterdir()) == [10, 15, 20]
    assert not (reference / ".lock").exists()  # released at the end

    from diffujax.checkpoint import store

    cfg, params = store.load(reference / "final")  # what `diffujax eval/generate` read
    assert cfg.mask_token_id == 258 and (reference / "final" / "tokenizer.json").is_file()


def test_sigkill_then_resume_is_exact(reference, corpus, tmp_path):
    proc = start(tmp_path, corpus, NO_SAMPLES)
    wait_for_step(proc, tmp_path, 7, checkpoint=5)
    proc.kill()  # SIGKILL: no handler, no cleanup, possibly in the middle of an async save
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    out = run(tmp_path, corpus, NO_SAMPLES)
    assert "resumed from" in out
    assert losses(tmp_path) == losses(reference)


def test_sigterm_saves_then_resume_is_exact(reference, corpus, tmp_path):
    proc = start(tmp_path, corpus, NO_SAMPLES)
    wait_for_step(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "SIGTERM: checkpoint of step" in out
    stopped = max(losses(tmp_path))  # every dispatched step is logged before exiting
    assert (tmp_path / "checkpoints" / str(stopped) / "_CHECKPOINT_METADATA").is_file()
    assert losses(tmp_path) == {s: v for s, v in losses(reference).items() if s <= stopped}
    out = run(tmp_path, corpus, NO_SAMPLES)
    assert f"resumed from {tmp_path / 'checkpoints' / str(stopped)}" in out
    assert losses(tmp_path) == losses(reference)


def test_damaged_latest_checkpoint_falls_back_to_previous(reference, corpus, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    state = run_dir / "checkpoints" / str(STEPS) / "state"
    biggest = max((p for p in state.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])  # truncated write
    out = run(run_dir, corpus, NO_SAMPLES)
    assert f"checkpoint step {STEPS} in" in out and "unusable" in out
    assert f"resumed from {run_dir / 'checkpoints' / str(STEPS - 5)}" in out
    moved = [p.name.split("-")[0] for p in (run_dir / "checkpoints" / "corrupt").iterdir()]
    assert moved == [str(STEPS)]
    assert losses(run_dir) == losses(reference)


# Across the switch from the annealed-attention step to the full-attention one: 10 steps, the
# mask all open after step 5 (anneal_steps 6), synchronous checkpoints every 4 steps.
SWITCH = ["train.steps=10", "diffusion.anneal_steps=6", "checkpoint.every_steps=4",
          "checkpoint.async=false", "logging.eval_every=0", NO_SAMPLES]
SWITCHED = "the attention mask is all open (diffusion.anneal_steps=6); full attention from here"


def test_sigkill_across_the_annealing_switch_then_resume_is_exact(corpus, tmp_path):
    """Killed around the switch before checkpoint 8, resumed from step 4 (annealed steps, then
    the switch), killed again after it, resumed from step 8 (full attention from its first
    step): every logged loss equals the uninterrupted run's, bit for bit. The kills strike at the
    6th / 5th metrics record a process writes (steps 6 and 9), so the resumed steps are known."""
    straight = run(tmp_path / "straight", corpus, *SWITCH)
    assert f"after step 5: {SWITCHED}" in straight
    run_dir = tmp_path / "killed"
    run(run_dir, corpus, *SWITCH, faults="jsonl#6=kill", expect=-signal.SIGKILL)
    second = run(run_dir, corpus, *SWITCH, faults="jsonl#5=kill", expect=-signal.SIGKILL)
    assert f"resumed from {run_dir / 'checkpoints' / '4'}" in second
    assert f"after step 5: {SWITCHED}" in second
    third = run(run_dir, corpus, *SWITCH)
    assert f"resumed from {run_dir / 'checkpoints' / '8'}" in third
    assert f"after step 8: {SWITCHED}" in third
    assert losses(run_dir) == losses(tmp_path / "straight")
    assert sorted(losses(run_dir)) == list(range(1, 11))
