"""What a run writes last survives a SIGKILL in the middle of it, and the rerun finishes it: a
killed write of ``final/`` into a bucket (the GCS emulator: objects without their completion
marker), a kill between ``final/`` and ``final_ema/`` on a local disk. Reference: the parameters
(and EMA) of the run's last training checkpoint, which the model checkpoints must hold."""

import signal
import subprocess
import sys

import numpy as np
import pytest
from train_runs import FAULT_WORKER, ROOT, env

from diffujax import paths
from diffujax.checkpoint import store
from diffujax.models import flatten
from diffujax.train.export import load_params

pytestmark = pytest.mark.integration

STEPS = 2
ARGS = ["--config", "configs/tiny.yaml", f"train.steps={STEPS}", "optimizer.warmup_steps=1",
        "data.seq_len=32", "data.global_batch=8", f"checkpoint.every_steps={STEPS}",
        "logging.every_steps=1", "logging.eval_every=0", "logging.sample_every=0",
        "optimizer.ema_decay=0.5"]


def _train(out_dir, corpus, faults: str = "") -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(FAULT_WORKER), "train", *ARGS, corpus[0], f"output_dir={out_dir}"]
    return subprocess.run(cmd, cwd=ROOT, env=env(faults or None), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)


def _assert_models_are_the_last_step(out_dir):
    step_dir = paths.resolve(out_dir) / "checkpoints" / str(STEPS)
    for name, key in (("final", "params"), ("final_ema", "ema")):
        _, params = store.load(paths.resolve(out_dir) / name)  # refuses a missing marker
        want = flatten(load_params(step_dir, params_key=key))
        got = flatten(params)
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=f"{name}/{k}")


def test_a_kill_while_final_is_written_into_a_bucket_is_repaired_by_the_rerun(gcs, corpus):
    url = gcs.url_for("final-killed")
    killed = _train(url, corpus, faults="model#1=kill")
    assert killed.returncode == -signal.SIGKILL, killed.stdout
    names = [n.split("/", 1)[1] for n in gcs.objects(url)]
    assert any(n.startswith("final/") for n in names)  # written in part ...
    assert "final/.complete" not in names  # ... and not finished
    rerun = _train(url, corpus)
    assert rerun.returncode == 0, rerun.stdout
    assert "final/.complete" in [n.split("/", 1)[1] for n in gcs.objects(url)]
    _assert_models_are_the_last_step(url)


def test_a_kill_between_final_and_final_ema_is_repaired_by_the_rerun(corpus, tmp_path):
    killed = _train(tmp_path, corpus, faults="model#2=kill")
    assert killed.returncode == -signal.SIGKILL, killed.stdout
    assert paths.is_complete(tmp_path / "final") and not (tmp_path / "final_ema").exists()
    rerun = _train(tmp_path, corpus)
    assert rerun.returncode == 0, rerun.stdout
    _assert_models_are_the_last_step(tmp_path)
