"""Faults ``diffujax train`` / ``export`` must survive, injected where the user meets them (the CLI
in a subprocess; ``fault_worker.py`` for faults at exact moments): damaged checkpoints, SIGKILL
during steps, saves, evaluation and sampling (at chosen and at seeded random moments), a double
Ctrl-C, a second writer, a failing disk. Reference: the shared uninterrupted run; every
recovered run must log exactly its records (losses, evaluations, samples)."""

import pathlib
import random
import re
import shutil
import signal
import time

import jax
import numpy as np
import pytest
from damage import flip_a_byte_orbax_misses
from train_runs import (NO_SAMPLES, STEPS, WITH_SAMPLES, losses, record_values, records_safe,
                        run, start, wait_for_step)

from diffujax.cli import main as cli

pytestmark = pytest.mark.integration  # runs of the CLI as processes


def _flip_a_byte_orbax_misses(step_dir: pathlib.Path) -> pathlib.Path:
    """A flipped byte in the step's array files that orbax reads without complaint but that
    changes the parameters."""
    from diffujax.train.export import load_params
    return flip_a_byte_orbax_misses((step_dir / "state").glob("ocdbt.process_*/d/*"),
                                    lambda: jax.tree.leaves(load_params(step_dir)))


def _progressed(proc, out_dir, step, timeout=300) -> bool:
    """Wait until the run logs ``step``: True, or False if it ended first."""
    path = pathlib.Path(out_dir) / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if any(r["kind"] == "train" and r["step"] >= step for r in records_safe(path)):
            return True
        time.sleep(0.01)
    return False


def _committed(out_dir) -> int:
    """The newest finalised checkpoint step (0 if none)."""
    steps = [int(p.parent.name) for p in (pathlib.Path(out_dir) / "checkpoints").glob(
        "*/_CHECKPOINT_METADATA") if p.parent.name.isdigit()]  # not orbax's "5.orbax-...-tmp"
    return max(steps, default=0)


def test_flipped_byte_and_lost_data_state_fall_back_and_export_uses_the_good_step(
        reference, corpus, tmp_path, capsys):
    """Step 20: one flipped byte in an array data file that orbax reads without complaint (found
    by the checksums); step 15: its data-iterator state deleted (incomplete).
    Export and resume both fall back; the resumed losses equal the reference's."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    ckpts = run_dir / "checkpoints"
    _flip_a_byte_orbax_misses(ckpts / "20")
    shutil.rmtree(ckpts / "15" / "data")

    # export: the newest step is damaged, so step 15 is exported (its data state is not needed)
    assert cli(["export", str(run_dir), str(tmp_path / "hf")]) == 0
    # the CLI shows diffujax's warnings as "warning:" lines on stderr (console.py)
    assert re.search(r"warning: checkpoint step 20 .*checkpoints/20: array .* does not match its"
                     r" saved checksum",
                     capsys.readouterr().err)
    from safetensors.numpy import load_file

    from diffujax.train.export import load_params
    exported = load_file(tmp_path / "hf" / "model.safetensors")["model.embed_tokens.weight"]
    np.testing.assert_array_equal(exported, load_params(ckpts / "15")["embed"]["embedding"])
    # a damaged step asked for by name: one line, non-zero exit
    assert cli(["export", str(ckpts / "20"), str(tmp_path / "hf20")]) == 1
    err = capsys.readouterr().err
    assert "does not match its saved checksum" in err and "Traceback" not in err
    assert not (tmp_path / "hf20").exists()

    out = run(run_dir, corpus, NO_SAMPLES)
    assert "checkpoint step 20" in out and "does not match its saved checksum" in out
    assert "checkpoint step 15" in out and "no data-iterator state" in out
    assert f"resumed from {ckpts / '10'}" in out
    assert sorted(p.name.split("-")[0] for p in (ckpts / "corrupt").iterdir()) == ["15", "20"]
    assert losses(run_dir) == losses(reference)


def test_kills_during_evaluation_and_sampling_and_a_double_ctrl_c(reference, corpus, tmp_path):
    """SIGKILL inside the evaluation of step 10, a double Ctrl-C inside it on the next attempt,
    SIGKILL inside the final sampling: every record of the reference is there, once, equal."""
    proc = start(tmp_path, corpus, WITH_SAMPLES, faults="elbo#1=kill")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out
    out = run(tmp_path, corpus, WITH_SAMPLES, faults="elbo#1=sigint2", expect=130)
    assert "resumed from" in out
    proc = start(tmp_path, corpus, WITH_SAMPLES, faults="samples#1=kill")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out
    run(tmp_path, corpus, WITH_SAMPLES)
    assert record_values(tmp_path) == record_values(reference)


def test_random_sigkills_and_a_second_writer(reference, corpus, tmp_path):
    """SIGKILL at seeded random moments (steps, async saves, evaluation, sampling, export) until
    the run completes; a second ``train`` on the same output_dir is refused while one runs, and
    the lock of a killed run is taken over."""
    rng = random.Random(20261201)
    go = tmp_path.parent / f"{tmp_path.name}.go"
    # The first run holds the directory, and waits at its first checkpoint ...
    proc = start(tmp_path, corpus, WITH_SAMPLES, faults="save#1=wait", go=str(go))
    while not (tmp_path / ".lock").exists():
        assert proc.poll() is None
        time.sleep(0.01)
    # ... until a second run on the same output_dir has been refused.
    refused = run(tmp_path, corpus, WITH_SAMPLES, expect=2)
    assert "is in use by another diffujax train" in refused and f"process {proc.pid}" in refused
    go.touch()
    outputs = []
    for kill in range(4):  # three kills, each after the attempt made progress, then completion
        if kill < 3 and _progressed(proc, tmp_path, _committed(tmp_path) + 1):
            time.sleep(rng.uniform(0.0, 3.0))
            proc.kill()
        out, _ = proc.communicate(timeout=300)
        outputs.append(f"[exit {proc.returncode}]\n{out}")
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, out
        proc = start(tmp_path, corpus, WITH_SAMPLES)
    assert proc.returncode == 0
    assert any("took over the run lock" in o for o in outputs[1:]), "\n=====\n".join(outputs)
    assert record_values(tmp_path) == record_values(reference)


def test_a_failing_disk_ends_the_run_at_once_and_keeps_the_checkpoint(reference, corpus,
                                                                      tmp_path):
    """A TensorBoard write and then a metrics.jsonl write fail with ENOSPC: each attempt exits 2
    at once with one line naming the file and the intact checkpoint; the rerun completes with
    the reference's records."""
    began = time.monotonic()
    out = run(tmp_path, corpus, WITH_SAMPLES, faults="tb#120=enospc", expect=2)
    assert time.monotonic() - began < 240
    line = [x for x in out.splitlines() if x.startswith("diffujax train: error:")]
    assert len(line) == 1 and "tensorboard failed: No space left on device" in line[0], out
    assert "is intact" in line[0]
    out = run(tmp_path, corpus, WITH_SAMPLES, faults="jsonl#4=enospc", expect=2)
    assert "metrics.jsonl failed: No space left on device" in out
    run(tmp_path, corpus, WITH_SAMPLES)
    assert record_values(tmp_path) == record_values(reference)
