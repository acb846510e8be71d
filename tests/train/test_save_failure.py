"""A checkpoint save that fails in the background of an asynchronous save (a full disk: the
write raises "No space left on device" in orbax's commit thread, injected) stops the run with one
line naming that checkpoint and the intact one before it, without the tracebacks orbax logs and
without saving past it; the rerun resumes from the intact step and logs exactly the losses of an
uninterrupted run. The checkpointer sees the failure between steps, before any later save."""

import errno
import os
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest
from orbax.checkpoint._src.handlers.json_checkpoint_handler import JsonCheckpointHandler
from train_runs import FAULT_WORKER, ROOT, env, losses

from diffujax.train.checkpointing import SaveFailed, TrainCheckpointer

ARGS = ["--config", "configs/tiny.yaml", "train.steps=6", "optimizer.warmup_steps=1",
        "data.seq_len=32", "data.global_batch=8", "checkpoint.every_steps=2",
        "logging.every_steps=1", "logging.eval_every=0", "logging.sample_every=0"]


def test_a_failed_background_save_is_seen_before_the_next_save(tmp_path, monkeypatch):
    """With keep_last=1 retention drops step 2 when the save of step 4 starts; step 4 never
    commits, so step 2 stays on disk and listed (the run names it as the intact one)."""
    real = JsonCheckpointHandler._save_fn

    async def full_disk(self, x, directory):
        if directory.name.startswith("meta"):  # one item of the save fails, in the background
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await real(self, x, directory)

    ckpt = TrainCheckpointer(tmp_path / "checkpoints", save_every=2, keep_last=1)
    state = {"w": jnp.arange(4.0)}
    assert ckpt.save(2, state, data_state={"i": 0})
    ckpt.wait()  # a good save
    monkeypatch.setattr(JsonCheckpointHandler, "_save_fn", full_disk)
    assert ckpt.save(4, state, data_state={"i": 1})  # started: the failure comes later
    deadline = time.monotonic() + 60
    with pytest.raises(SaveFailed) as caught:
        while time.monotonic() < deadline:  # what the loop does between steps
            ckpt.check()
            time.sleep(0.01)
    assert str(caught.value) == (f"checkpoint {tmp_path / 'checkpoints' / '4'} could not be"
                                 " written: No space left on device")
    with pytest.raises(SaveFailed):  # no later save starts on a failed checkpointer
        ckpt.save(6, state, data_state={"i": 2})
    assert ckpt.all_steps() == [2]
    ckpt.close()  # does not raise again
    assert ckpt.all_steps() == [2] and (tmp_path / "checkpoints" / "2" / "state").is_dir()


def _train(out_dir, corpus, faults=None):
    cmd = [sys.executable, str(FAULT_WORKER), "train", *ARGS, corpus[0], f"output_dir={out_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(faults), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    return proc.returncode, proc.stdout


@pytest.mark.integration
def test_a_full_disk_during_a_save_stops_the_run_at_that_save(corpus, tmp_path):
    code, out = _train(tmp_path / "reference", corpus)
    assert code == 0, out
    run_dir = tmp_path / "run"
    code, out = _train(run_dir, corpus, faults="ckpt_json#4=enospc")  # the step-4 save's config
    assert code == 2, out
    lines = [x for x in out.splitlines() if x.startswith("diffujax train: error:")]
    assert len(lines) == 1 and "Traceback" not in out, out
    assert (f"checkpoint {run_dir / 'checkpoints' / '4'} could not be written: No space left on"
            f" device; checkpoint {run_dir / 'checkpoints' / '2'} is intact") in lines[0]
    assert "saved before stopping" not in out  # no save after the failing one
    steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == ["2"]
    code, out = _train(run_dir, corpus)
    assert code == 0, out
    assert f"resumed from {run_dir / 'checkpoints' / '2'}" in out
    assert losses(run_dir) == losses(tmp_path / "reference")
