"""``diffujax train`` with ``output_dir=gs://...`` against a real GCS API (the emulator of
tests/gcs_emulator.py): it trains and checkpoints into the bucket, a SIGKILL in the middle of a
save loses nothing (the resumed run logs exactly the losses of an uninterrupted one), and the run
exports from the bucket. Multi-host: a relative or host-local output_dir is refused.
References: the uninterrupted run; the model checkpoint the run wrote (for the export);
transformers loading the export."""

import json
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
import transformers
from safetensors.torch import load_file

from diffujax import paths
from diffujax.checkpoint import export
from diffujax.cli import main as cli
from diffujax.runs.metrics import read_jsonl

pytestmark = pytest.mark.integration  # runs of the CLI into the GCS emulator, gloo jobs

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
STEPS = 12
ARGS = ["--config", "configs/tiny.yaml", f"train.steps={STEPS}", "optimizer.warmup_steps=3",
        "checkpoint.every_steps=5", "checkpoint.keep_last=3", "logging.every_steps=1",
        "logging.eval_every=0", "logging.sample_every=0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A frozen copy of some repository sources (they change while we test)."""
    root = tmp_path_factory.mktemp("corpus")
    for src in sorted((ROOT / "diffujax" / "train").glob("*.py")):
        (root / src.name).write_bytes(src.read_bytes())
    return [f"data.sources=[{{path: '{root}'}}]"]


def _start(out, corpus, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT),
               JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    return subprocess.Popen([sys.executable, "-m", "diffujax.cli", "train", *ARGS, *corpus,
                             f"output_dir={out}", *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(out, corpus, *extra):
    proc = _start(out, corpus, *extra)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    return log


def _losses(url):
    return {r["step"]: r["loss"] for r in read_jsonl(f"{url}/metrics.jsonl")}


@pytest.fixture(scope="module")
def reference(gcs, corpus):
    url = gcs.url_for("run")
    _run(url, corpus)
    return url


def test_run_writes_everything_into_the_bucket(gcs, reference):
    names = [n.split("/", 1)[1] for n in gcs.objects(reference)]
    assert "config.yaml" in names and "metrics.jsonl" in names
    assert any(n.startswith("tensorboard/events.out.tfevents.") for n in names)
    steps = {n.split("/")[1] for n in names if n.startswith("checkpoints/")}
    assert steps == {"5", "10", "12"}
    for step in steps:  # orbax's commit marker, and our per-process data-iterator state
        assert f"checkpoints/{step}/commit_success.txt" in names
        assert f"checkpoints/{step}/data/process_0-of-1.json" in names
    assert "final/.complete" in names and "final/tokenizer.json" in names
    losses = _losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1]


def _tfrecords(data: bytes):
    """Records of a TFRecord stream (the event file format), checking every CRC."""
    from tensorboardX.record_writer import masked_crc32c

    pos = 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
        body = data[pos + 12:pos + 12 + length]
        assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == \
            masked_crc32c(body)
        yield body
        pos += 16 + length


def test_tensorboard_events_in_the_bucket_are_readable(reference):
    from tensorboardX.proto import event_pb2

    loss = {}
    files = paths.list_files(f"{reference}/tensorboard")
    assert files and all("tfevents" in f.name for f in files)
    for f in files:
        for record in _tfrecords(f.read_bytes()):
            event = event_pb2.Event.FromString(record)
            for v in event.summary.value:
                if v.tag == "train/loss":
                    loss[event.step] = v.simple_value
    expected = _losses(reference)
    assert sorted(loss) == list(range(1, STEPS + 1))
    assert all(abs(loss[s] - expected[s]) <= 1e-6 * abs(expected[s]) for s in loss)


def test_sigkill_mid_save_then_resume_from_the_bucket_is_exact(gcs, reference, corpus):
    url = gcs.url_for("killed")
    proc = _start(url, corpus)
    deadline, seen = time.monotonic() + 240, []
    while time.monotonic() < deadline:  # kill as soon as the step-10 save starts writing
        assert proc.poll() is None, proc.stdout.read()
        seen = [n for n in gcs.objects(f"{url}/checkpoints/") if "/checkpoints/10" in n]
        if seen:
            proc.kill()
            break
        time.sleep(0.02)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and seen
    assert not any(n.endswith("commit_success.txt") for n in seen)  # killed mid-save
    log = _run(url, corpus)
    assert "resumed from gs://" in log
    assert _losses(url) == _losses(reference)


def test_export_from_the_bucket(gcs, reference, tmp_path):
    hf_url = gcs.url_for("hf")
    assert cli(["export", reference, hf_url]) == 0  # a training run, read from the bucket
    local = tmp_path / "hf"
    local.mkdir()
    for f in paths.list_files(hf_url):
        paths.copy_file(f, local / f.name)
    # Reference: the model checkpoint the run itself wrote at its last step.
    final = export(f"{reference}/final", tmp_path / "from-final")
    a, b = load_file(local / "model.safetensors"), load_file(final / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    model = transformers.AutoModelForCausalLM.from_pretrained(local)
    assert model.config.vocab_size == 264


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_run_starts_from_a_model_checkpoint_in_the_bucket(reference, corpus, tmp_path):
    """``model.checkpoint=gs://.../final``: the weights are read from the bucket. One step at
    learning rate 0 (the first of the warmup) leaves them as read, so the new run's final/ equals
    the bucket's checkpoint exactly (reference: that checkpoint, loaded by store.load)."""
    import numpy as np

    from diffujax.checkpoint import store
    from diffujax.models import flatten

    log = _run(tmp_path / "run", corpus, "model.init=null", f"model.checkpoint={reference}/final",
               "train.steps=1", "optimizer.schedule=constant")
    assert f"initialised from {reference}/final" in log
    _, base = store.load(f"{reference}/final")
    _, trained = store.load(tmp_path / "run" / "final")
    for (name, a), (_, b) in zip(sorted(flatten(base).items()), sorted(flatten(trained).items()),
                                 strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_multi_host_output_dir_must_be_shared(tmp_path):
    """2 CPU processes (gloo). host-local: ``~/run`` with a different HOME per process, as on
    two hosts with their own disks; shared: an absolute path both see."""
    cases = {"relative": "runs/x", "host-local": "~/run", "shared": str(tmp_path / "run")}
    port = _free_port()
    procs = []
    for i in range(2):
        home = tmp_path / f"home{i}"
        home.mkdir()
        env = dict(os.environ, HOME=str(home), JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
                   XLA_FLAGS="--xla_force_host_platform_device_count=1")
        procs.append(subprocess.Popen([sys.executable, str(HERE / "run_dir_worker.py"), str(i),
                                       str(port), *cases.values()], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    results = [dict(zip(cases, [json.loads(line) for line in log.splitlines()
                                if line.startswith("{")])) for log in logs]
    for r in results:
        assert "a relative path on a 2-process run" in r["relative"]["error"]
        assert "is local to each host (processes [1] do not see" in r["host-local"]["error"]
        assert r["shared"] == {"ok": cases["shared"]}
    assert not list((tmp_path / "run").iterdir())  # the probe file is removed
