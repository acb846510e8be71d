"""``diffujax train`` as the user runs it (a subprocess of the CLI), on one small config shared
by every resume / fault test, and what they read back (losses, metrics records)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time

from diffujax.runs.metrics import read_jsonl

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 20
ARGS = ["--config", "configs/tiny.yaml", f"train.steps={STEPS}", "optimizer.warmup_steps=3",
        "checkpoint.every_steps=5", "checkpoint.keep_last=3", "logging.every_steps=1",
        "logging.eval_every=10", "logging.eval_batches=1"]
NO_SAMPLES = "logging.sample_every=0"  # samples do not touch the training stream; they cost time
WITH_SAMPLES = f"logging.sample_every={STEPS}"  # as the reference run
FAULT_WORKER = pathlib.Path(__file__).with_name("fault_worker.py")


def make_corpus(root: pathlib.Path) -> list[str]:
    """A frozen copy of tiny.yaml's corpus (the repository's sources change while we test)."""
    for src in sorted((ROOT / "diffujax").rglob("*.py")):
        dst = root / "train" / src.relative_to(ROOT).as_posix().replace("/", "__")
        dst.parent.mkdir(exist_ok=True, parents=True)
        shutil.copyfile(src, dst)
    (root / "eval").mkdir()
    shutil.copyfile(ROOT / "README.md", root / "eval" / "README.md")
    return [f"data.sources=[{{path: '{root / 'train'}'}}]",
            f"data.eval_sources=[{{path: '{root / 'eval'}'}}]"]


def env(faults: str | None = None, go: str | None = None) -> dict:
    out = dict(os.environ, PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    out.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    out.pop("DIFFUJAX_TEST_FAULTS", None)
    if faults:
        out["DIFFUJAX_TEST_FAULTS"] = faults
    if go:
        out["DIFFUJAX_TEST_GO"] = go
    return out


def start(out_dir, corpus, *extra, faults: str | None = None,
          go: str | None = None) -> subprocess.Popen:
    """``diffujax train`` (through ``fault_worker.py``, which injects ``faults``, when given;
    ``go``: the file a ``wait`` fault waits for)."""
    entry = [str(FAULT_WORKER)] if faults else ["-m", "diffujax.cli"]
    cmd = [sys.executable, *entry, "train", *ARGS, *corpus, f"output_dir={out_dir}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(faults, go), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run(out_dir, corpus, *extra, expect=0, faults: str | None = None) -> str:
    proc = start(out_dir, corpus, *extra, faults=faults)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == expect, out
    return out


def records_safe(path) -> list[dict]:
    try:
        return read_jsonl(path, kind=None)
    except (ValueError, FileNotFoundError):  # a line being written
        return []


def wait_for_step(proc, out_dir, step, checkpoint=None, timeout=120):
    """Poll the run's metrics.jsonl until ``step`` is logged (and ``checkpoint`` finalised)."""
    path = pathlib.Path(out_dir) / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before step {step}:\n{proc.stdout.read()}"
        ready = checkpoint is None or (pathlib.Path(out_dir) / "checkpoints" / str(checkpoint) /
                                       "_CHECKPOINT_METADATA").exists()
        if ready and any(r["kind"] == "train" and r["step"] >= step for r in records_safe(path)):
            return
        time.sleep(0.01)
    raise TimeoutError(f"step {step} not reached in {timeout}s")


def losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(pathlib.Path(out_dir) / "metrics.jsonl")}


def record_values(out_dir) -> dict[tuple[str, int], object]:
    """Every record of metrics.jsonl by (kind, step), reduced to what must not depend on
    interruptions (throughput and timing are dropped); a (kind, step) twice is an error."""
    out = {}
    for r in read_jsonl(pathlib.Path(out_dir) / "metrics.jsonl", kind=None):
        key = (r["kind"], r["step"])
        assert key not in out, f"{key} recorded twice"
        out[key] = {"train": lambda: (r["loss"], r["grad_norm"], r["skipped_steps"]),
                    "eval": lambda: r["nelbo"], "text": lambda: r["samples"]}[r["kind"]]()
    return out


def cli_error(capsys, argv, code=2) -> str:
    """Run the CLI in-process with ``argv``; it must exit ``code`` with exactly one
    ``diffujax ...`` error line on stderr and no traceback: that line."""
    from diffujax.cli import main as cli
    assert cli(argv) == code
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("diffujax ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
