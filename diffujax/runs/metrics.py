"""Every training number a user sees, computed in one place and written from one place.

- FLOPs per token, device peaks and MFU: ``flops`` (pure arithmetic, also the planner's).
- ``Throughput``: tokens/s, step time, MFU and ETA from wall-clock time between log points.
- ``RunLogger``: console progress (tqdm on a terminal, one plain line per log step otherwise),
  TensorBoard event files (tensorboardX) and ``metrics.jsonl`` (one JSON object per log step, the
  machine-readable record that tests and scripts read). Only process 0 writes.
- ``StepProfiler``: a ``jax.profiler`` trace of a range of steps.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time

import jax
from tqdm import tqdm

from diffujax import paths
from diffujax.runs import tb_remote
from diffujax.runs.flops import mfu
from diffujax.runs.tensorboardx import Event, EventsWriter, SessionLog
from diffujax.runs.tensorboardx import scalar as scalar_summary
from diffujax.runs.tensorboardx import text as text_summary
from diffujax.runs.wandb_log import WandbLogger

# ------------------------------------------------------------------------------------ throughput


class Throughput:
    """Rates from wall-clock time between log points.

    Time starts at ``start(step)`` (call it after the first step has finished, so compilation is
    not counted). Because steps are dispatched asynchronously, time is only meaningful at points
    where the host has waited for the device (e.g. after fetching the logged loss).
    """

    def __init__(self, *, tokens_per_step: int, flops_per_token: float, total_steps: int,
                 num_devices: int | None = None, peak_per_device: float | None = None):
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_token * tokens_per_step
        self.total_steps = total_steps
        self.num_devices = num_devices or jax.device_count()
        self.peak = peak_per_device
        self._t0 = self._last_t = None
        self._step0 = self._last_step = 0
        self.paused_s = 0.0  # eval, sampling, blocking checkpoint time: not training throughput

    def start(self, step: int, now: float | None = None):
        self._t0 = self._last_t = time.perf_counter() if now is None else now
        self._step0 = self._last_step = step
        self.paused_s = 0.0

    def pause(self, seconds: float):
        self.paused_s += seconds

    @property
    def started(self) -> bool:
        return self._t0 is not None

    def update(self, step: int, now: float | None = None) -> dict:
        """Numbers for the window since the last update; ETA from the whole run's average rate
        (which includes the pauses, since they recur)."""
        now = time.perf_counter() if now is None else now
        if self._t0 is None or step <= self._last_step:
            return {}
        step_time = max(now - self._last_t - self.paused_s, 1e-9) / (step - self._last_step)
        tokens_per_s = self.tokens_per_step / step_time
        flops_per_s = self.flops_per_step / step_time
        average = (now - self._t0) / max(step - self._step0, 1)
        out = {"step_time_s": step_time, "tokens_per_s": tokens_per_s,
               "tokens_per_s_per_device": tokens_per_s / self.num_devices,
               "model_tflops_per_s_per_device": flops_per_s / self.num_devices / 1e12,
               "eta_s": max(self.total_steps - step, 0) * average}
        m = mfu(flops_per_s, self.num_devices, self.peak)
        if m is not None:
            out["mfu"] = m
        self._last_t, self._last_step, self.paused_s = now, step, 0.0
        return out


# ------------------------------------------------------------------------------------ formatting


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    d, s = divmod(int(round(seconds)), 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def format_si(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.1f}"


def summary_line(step: int, total: int, m: dict) -> str:
    """The one-line console summary of a log step."""
    parts = [f"step {step}/{total}"]
    if "loss" in m:
        parts.append(f"loss {m['loss']:.4f}")
    if "lr" in m:
        parts.append(f"lr {m['lr']:.2e}")
    if "grad_norm" in m:
        parts.append(f"gnorm {m['grad_norm']:.3g}")
    if "tokens_per_s" in m:
        parts.append(f"tok/s {format_si(m['tokens_per_s'])}")
        parts.append(f"mfu {m['mfu']:.1%}" if "mfu" in m else "mfu n/a")
    if "eta_s" in m:
        parts.append(f"eta {format_duration(m['eta_s'])}")
    if m.get("skipped_steps"):
        parts.append(f"skipped {int(m['skipped_steps'])}")
    return " | ".join(parts)


# Throughput's numbers go under "perf/" in TensorBoard, every other scalar under "train/".
_PERF = {"tokens_per_s", "tokens_per_s_per_device", "model_tflops_per_s_per_device", "mfu",
         "step_time_s", "eta_s"}


# ------------------------------------------------------------------------------------ the writer


class WriterError(OSError):
    """Writing the run's metrics or TensorBoard events failed (disk full, I/O error)."""


class _TensorBoard:
    """TensorBoard event file written synchronously: an error surfaces in the caller."""

    def __init__(self, logdir: str, purge_step: int | None, flush_secs: float = 30.0):
        os.makedirs(logdir, exist_ok=True)
        self._writer = EventsWriter(os.path.join(logdir, "events"))
        if purge_step is not None:  # TensorBoard hides the events of later steps (a resume)
            self._writer.write_event(Event(step=purge_step, wall_time=time.time(),
                                           session_log=SessionLog(status=SessionLog.START)))
        self._flush_secs, self._last_flush = flush_secs, time.monotonic()

    def write(self, summary, step: int):
        self._writer.write_event(Event(summary=summary, step=int(step), wall_time=time.time()))
        if time.monotonic() - self._last_flush > self._flush_secs:
            self.flush()

    def flush(self):
        self._writer.flush()
        self._last_flush = time.monotonic()

    def close(self):
        self._writer.close()


class RunLogger:
    """Console + TensorBoard + ``metrics.jsonl`` (+ W&B with ``wandb``, the ``logging.wandb``
    settings) for one run; a no-op on processes other than 0.

    On resume from ``start_step`` the JSONL records and TensorBoard events of later steps (written
    by the interrupted attempt after its last checkpoint) are dropped, so every step appears once.
    """

    def __init__(self, output_dir, *, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, enabled: bool | None = None,
                 wandb: dict | None = None, run_config: dict | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.total_steps = total_steps
        self._bar = self._tb = self._jsonl = self._wandb = None
        self.recorded: set[tuple[str, int]] = set()  # (kind, step) of the records kept
        if not self.enabled:
            return
        output_dir = paths.resolve(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = path = output_dir / "metrics.jsonl"
        self.tb_dir = os.fspath(output_dir / "tensorboard")
        with self._guard(path):
            self.recorded = _truncate_jsonl(path, start_step)
            self._jsonl = paths.open_append(path)  # in a bucket: uploaded by flush() and close()
        if tensorboard:
            tb_remote.install()  # event files in a bucket go through diffujax.paths too
            with self._guard(self.tb_dir):
                self._tb = _TensorBoard(self.tb_dir, start_step + 1 if start_step else None)
        if wandb is not None:
            self._wandb = WandbLogger(wandb, output_dir, run_config)
        if sys.stderr.isatty():
            self._bar = tqdm(total=total_steps, initial=start_step, file=sys.stderr,
                             dynamic_ncols=True, desc="train",
                             bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}"
                                        " [{elapsed}]{postfix}")

    def train(self, step: int, scalars: dict):
        """One log step of training numbers (host floats)."""
        if not self.enabled:
            return
        self._scalars("train", step, scalars,
                      {f"{'perf' if k in _PERF else 'train'}/{k}": v for k, v in scalars.items()})
        if self._bar is not None:
            self._bar.n = step  # one refresh below, with the new postfix
            self._bar.set_postfix_str(summary_line(step, self.total_steps, scalars)
                                      .split(" | ", 1)[-1], refresh=True)
        else:
            self.message(summary_line(step, self.total_steps, scalars))

    def eval(self, step: int, scalars: dict, prefix: str = "eval"):
        if not self.enabled:
            return
        self._scalars(prefix, step, scalars, {f"{prefix}/{k}": v for k, v in scalars.items()})
        self.message(f"{prefix} @ step {step}: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in scalars.items()))

    def text(self, step: int, tag: str, texts):
        """A few generated samples: TensorBoard text summaries (markdown code blocks)."""
        if not self.enabled:
            return
        texts = list(texts)
        self._record("text", step, {tag: texts})
        if self._tb is not None:
            body = "\n\n".join(f"**{i}**\n\n```\n{t}\n```" for i, t in enumerate(texts))
            with self._guard(self.tb_dir):
                self._tb.write(text_summary(tag, body), step)
        if self._wandb is not None:
            self._wandb.text(step, tag, texts)

    def message(self, line: str):
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def flush(self):
        """Everything logged so far on disk / in the bucket (called before each checkpoint)."""
        if self._jsonl is not None:
            with self._guard(self.path):
                self._jsonl.flush()
        if self._tb is not None:
            with self._guard(self.tb_dir):
                self._tb.flush()

    def abandon(self):
        """Stop logging without writing anything more into the run directory (it belongs to
        another run now: the lease was lost). Records not yet flushed are dropped there; the
        console bar and W&B, which live elsewhere, are closed as usual."""
        self._tb = self._jsonl = None
        self.close()

    def close(self):
        """Flush and close everything; a failure is raised after all are closed."""
        error = None
        for name in ("_bar", "_tb", "_jsonl", "_wandb"):
            handle = getattr(self, name)
            where = getattr(self, "tb_dir" if name == "_tb" else "path", "")
            setattr(self, name, None)
            if handle is None:
                continue
            try:
                with self._guard(where):
                    handle.close()
            except WriterError as e:
                error = error or e
        if error is not None:
            raise error

    @staticmethod
    @contextlib.contextmanager
    def _guard(where):
        try:
            yield
        except OSError as e:
            if isinstance(e, WriterError):
                raise
            raise WriterError(f"writing {where} failed: {e.strerror or e}") from e

    def _scalars(self, kind, step, scalars, tagged):
        """One record of ``scalars`` in the log; each of ``tagged`` (tag: value) to TensorBoard
        (the finite numbers) and W&B."""
        self._record(kind, step, scalars)
        if self._tb is not None:
            with self._guard(self.tb_dir):
                for tag, value in tagged.items():
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        self._tb.write(scalar_summary(tag, float(value)), step)
        if self._wandb is not None:
            self._wandb.log(step, tagged)

    def _record(self, kind, step, values):
        if self._jsonl is not None:
            with self._guard(self.path):
                self._jsonl.write(json.dumps({"kind": kind, "step": int(step), **values},
                                             allow_nan=True) + "\n")
            self.recorded.add((kind, int(step)))


def _truncate_jsonl(path, start_step: int) -> set[tuple[str, int]]:
    """Keep only records of steps <= start_step (a fresh run, start_step 0, starts empty);
    returns the (kind, step) of the records kept."""
    path = paths.resolve(path)
    if not path.exists():
        return set()
    keep, kept = [], set()
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
            if record["step"] <= start_step:
                keep.append(line if line.endswith("\n") else line + "\n")
                kept.add((record.get("kind"), int(record["step"])))
        except (ValueError, KeyError, TypeError):
            continue  # a half-written last line of a killed run
    paths.write_text_atomic(path, "".join(keep))
    return kept


def read_jsonl(path, kind: str | None = "train") -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (of one kind, or all with ``kind=None``)."""
    text = paths.resolve(path).read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]


# ------------------------------------------------------------------------------------ profiling


class StepProfiler:
    """Trace steps ``first..last`` (inclusive, step numbers as the loop counts them) into
    ``logdir`` (``logdir/plugins/profile``: TensorBoard's profile tab when ``logdir`` is the
    TensorBoard dir; the ``.trace.json.gz`` opens in Perfetto). A ``logdir`` in a bucket gets
    the trace uploaded once it is written (the profiler writes local files)."""

    def __init__(self, logdir, steps=()):
        self.logdir = os.fspath(logdir)
        self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (None, None)
        self._dir = None  # where the trace being taken is written; None: no trace running

    def before(self, step: int):
        if self.first is not None and self._dir is None and self.first <= step <= self.last:
            self._dir = (tempfile.mkdtemp(prefix="diffujax-profile-")
                         if paths.is_remote(self.logdir) else self.logdir)
            jax.profiler.start_trace(self._dir)

    def after(self, step: int, sync=None) -> bool:
        """Stop after step ``last``; ``sync`` (an array of the step) is waited on first so the
        trace holds the device work of the step. True when a trace was just written."""
        if self._dir is None or step < self.last:
            return False
        if sync is not None:
            jax.block_until_ready(sync)
        self.close()
        return True

    def close(self):
        if self._dir is None:
            return
        jax.profiler.stop_trace()
        if self._dir != self.logdir:
            paths.copy_tree(self._dir, self.logdir)
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None
