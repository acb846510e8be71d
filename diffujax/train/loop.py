"""``diffujax train --config RUN.yaml [key=value ...]``: the training loop.

One run lives in ``output_dir``::

    config.yaml        the resolved config of the latest attempt
    metrics.jsonl      one JSON record per log step / eval / sample (process 0)
    tensorboard/       event files: loss, lr, grad norm, anneal ratio, tokens/s, MFU, ELBO, samples
    checkpoints/STEP/  training state + data-iterator state (see ``checkpointing``)
    final/             the trained model as a diffujax checkpoint (``diffujax eval/generate``)

Starting a run whose ``output_dir`` already holds checkpoints resumes from the newest readable
one; on CPU the loss trajectory after a resume is bit-identical to an uninterrupted run (noise
keys and the attention pattern follow from the step, the data iterator state is restored).

Exit status: 0 done; 3 stopped after ``train.max_bad_steps`` consecutive non-finite steps (the
last good state is saved); 143 / 130 stopped by SIGTERM / SIGINT after saving a checkpoint (run
the same command again to resume); 2 a bad config or argument, another run holding
``output_dir``, or a write failure (the last checkpoint is intact).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

import jax
import numpy as np

from diffujax import paths
from diffujax.attention.pattern import anneal_end, is_annealing
from diffujax.config import to_dict, to_yaml
from diffujax.data.tokenizer import load_tokenizer
from diffujax.parallel.mesh import make_layout
from diffujax.models import matmul_params
from diffujax.runs.flops import peak_flops_per_device
from diffujax.runs.lock import RunLockError, run_lock
from diffujax.runs.metrics import RunLogger, StepProfiler, Throughput, WriterError
from diffujax.runs.preemption import PreemptionGuard
from diffujax.runs.run_dir import resolve_output_dir
from diffujax.train.checkpointing import SaveFailed, TrainCheckpointer
from diffujax.train.data import build_data, data_changes, data_identity, source_reports
from diffujax.train.evaluation import Evaluator, eval_due, periodic_eval
from diffujax.train.export import export_final
from diffujax.train.resume import check_resume
from diffujax.train.startup import initial_state
from diffujax.train.state import apply_fn_for_run, model_flops_per_token, model_params
from diffujax.train.step import make_train_step, step_config

log = logging.getLogger(__name__)

EXIT_BAD_STEPS = 3
EXIT_SIGNAL = {"SIGTERM": 143, "SIGINT": 130}


# ------------------------------------------------------------------------------------ the loop


def _window_summary(rows: list[dict]) -> dict:
    """The log line's numbers from host copies of the per-step metrics since the last one."""
    good = [r for r in rows if not r["skipped"]]
    mean = lambda k: float(np.mean([r[k] for r in good])) if good else float("nan")
    return {"loss": mean("loss"), "unweighted_loss": mean("unweighted_masked_loss"),
            "grad_norm": mean("grad_norm"), "lr": float(rows[-1]["lr"]),
            "anneal_ratio": float(rows[-1]["anneal_ratio"]),
            "noised_fraction": mean("noised_fraction"),
            "skipped_steps": int(sum(r["skipped"] for r in rows)),
            "total_skipped_steps": int(rows[-1]["total_bad_steps"])}


@dataclasses.dataclass
class _Pending:
    """A dispatched step whose metrics the host has not read yet (read one step later, which
    keeps the device busy), with the data position before it (to undo a halted step)."""

    step: int
    metrics: dict
    data_state_before: dict


def train(cfg) -> int:
    """Run (or resume) the training described by ``cfg``; returns the exit status."""
    resolve_output_dir(cfg.output_dir)  # refused before anything is written, if it cannot work
    out_dir = paths.resolve(cfg.output_dir)
    notes: list[str] = []
    # One writer per run directory (process 0 writes for the run).
    lock = run_lock(out_dir, notes) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock as held, PreemptionGuard() as guard:  # from here on SIGTERM / SIGINT: save, exit
        run = _Run(cfg, guard, notes, held)
        try:
            status = run.loop()
        except RunLockError:
            run.logger.abandon()  # the directory is another run's now: write nothing more
            raise
        except BaseException:
            run.close(raise_errors=False)  # the error in flight is the one to report
            raise
        run.close()
        return status


class _Run:
    """One attempt at a run: set-up (restore or initialise), the step loop, the way out."""

    def __init__(self, cfg, guard, notes: list[str], lock=None):
        t0 = self.t0 = time.perf_counter()
        self.cfg, self.guard, self.lock = cfg, guard, lock
        self.out_dir = out_dir = paths.resolve(cfg.output_dir)  # a local path or a bucket URL
        c, lg = cfg.checkpoint, cfg.logging
        self.layout = make_layout(cfg.mesh)
        self.ckpt = TrainCheckpointer(out_dir / "checkpoints", save_every=c.every_steps,
                                      keep_last=c.keep_last, keep_every=c.keep_every,
                                      async_save=c.async_save, restart_data=c.restart_data)
        self.run_config = to_dict(cfg)
        self.model_cfg, self.state, restored = initial_state(cfg, self.layout, self.ckpt,
                                                             notes)
        self.restored_step = int(restored.step) if restored else None
        self.start = self.step = self.restored_step or 0
        if restored is not None:
            changes = check_resume(restored.config, self.run_config, self.start,
                                   str(self.ckpt.directory / str(self.start)))
            if changes:
                notes.append("config changes applied from this step on: " + "; ".join(changes))
        apply_fn = apply_fn_for_run(cfg, self.model_cfg)
        self.tokenizer_dir = cfg.tokenizer_dir()
        tokenizer = load_tokenizer(self.tokenizer_dir, model_vocab_size=self.model_cfg.vocab_size)
        self.pipeline, sources = build_data(cfg, tokenizer, self.model_cfg,
                                            shard=self.layout.data_shard())
        self.data_sources = data_identity(sources)
        self.data_iter = self.pipeline.iterator()
        if restored is not None:
            self._resume_data(restored, c.restart_data, notes)
        self.data_state = self.data_iter.get_state()  # always the position that goes with state
        if jax.process_index() == 0:  # only once the checkpoint accepted this config and data
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(to_yaml(cfg))
        self.evaluator = Evaluator(cfg, self.model_cfg, apply_fn, self.layout, tokenizer)
        self._steps = {}  # block size -> the step function of those steps (both phases)
        self._block_size = None  # of the last step run
        self._annealing = None  # the phase of the last step run
        self._apply_fn = apply_fn

        self.logger = RunLogger(out_dir, total_steps=cfg.train.steps, start_step=self.start,
                                tensorboard=lg.tensorboard, wandb=lg.wandb,
                                run_config=to_dict(cfg))
        for line in notes + source_reports(sources) + self.evaluator.reports:
            self.logger.message(line)
        seq_len = cfg.data.seq_len
        self.tokens_per_step = cfg.data.global_batch * seq_len
        flops = model_flops_per_token(cfg, self.model_cfg)
        peak = peak_flops_per_device()
        self.throughput = Throughput(tokens_per_step=self.tokens_per_step, flops_per_token=flops,
                                     total_steps=cfg.train.steps, peak_per_device=peak)
        self.logger.message(
            f"model: {self.model_cfg.family}, {matmul_params(self.model_cfg) / 1e6:.1f}M matmul"
            f" params, {flops / 1e9:.3f} GFLOP/token; mesh"
            f" {self.layout.axis_sizes} of"
            f" {jax.devices()[0].device_kind}; peak"
            f" {'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'} per device;"
            f" steps {self.start}..{cfg.train.steps}; set up in {time.perf_counter() - t0:.1f}s")
        self.profiler = StepProfiler(out_dir / "tensorboard", lg.profile_steps)
        self.meta = {"model_config": self.model_cfg.to_hf(),
                     "tokenizer_dir": self.tokenizer_dir, "seq_len": seq_len,
                     "data_sources": self.data_sources}
        # The log window of the checkpoint step: a log line after a resume averages the same
        # steps as it would have without the interruption.
        self.window = list((restored.meta or {}).get("log_window", [])) if restored else []
        self.bad_in_a_row = 0
        self.finite_since_restore = False
        self.pending: _Pending | None = None

    def _resume_data(self, restored, restart_data: bool, notes: list[str]):
        """Put the data stream where the checkpoint left it, if the data is what it recorded
        (``data_identity``); a changed corpus is refused unless ``checkpoint.restart_data``,
        which restarts the stream from its start (as does a step without a data state)."""
        where = f"{self.ckpt.directory / str(self.start)} (step {self.start})"
        changes = data_changes((restored.meta or {}).get("data_sources"), self.data_sources)
        if changes and not restart_data:
            raise ValueError(
                f"cannot resume {where}: the training data changed since it was saved ("
                + "; ".join(changes) + "). Put the data back to continue the run exactly, or set"
                " checkpoint.restart_data=true to go on with this data (its stream restarts)")
        if changes:
            notes.append(f"checkpoint.restart_data: the training data changed since step"
                         f" {self.start} ({'; '.join(changes)}); the data stream restarts from"
                         " its start")
        elif restored.data_state is None:
            notes.append(f"checkpoint.restart_data: step {self.start} holds no data-iterator"
                         " state for this process; the data stream restarts from its start")
        else:
            self.data_iter.set_state(restored.data_state)

    def _step_fn(self):
        """``(step function, annealing phase)`` of the next step (``step_config``,
        ``pattern.is_annealing``). Once the annealing ramp has reached r = 1 the phase is off and
        the step compiles again with the plain full pattern (the same numbers, the kernels'
        full-attention paths: cuDNN, splash, no hash). Each block size of
        ``diffusion.block_schedule`` has its own step function, made the first time it comes
        into force (docs/algorithms.md §9)."""
        run_cfg = step_config(self.cfg, self.step)
        d = run_cfg.diffusion
        if d.block_size != self._block_size:
            if self._block_size is not None or d.block_size:
                what = f"blocks of {d.block_size}" if d.block_size else "the whole sequence"
                self.logger.message(f"step {self.step}: training on {what}"
                                     " (diffusion.block_size / block_schedule)")
            self._block_size = d.block_size
        annealing = is_annealing(self.step, d.anneal_steps)
        if not annealing and self._annealing is not False and anneal_end(d.anneal_steps) > 0:
            self.logger.message(f"after step {self.step}: the attention mask is all open"
                                f" (diffusion.anneal_steps={d.anneal_steps}); full attention"
                                " from here")
        self._annealing = annealing
        if d.block_size not in self._steps:
            self._steps[d.block_size] = make_train_step(run_cfg, self.model_cfg, self._apply_fn,
                                                        self.layout)
        return self._steps[d.block_size], annealing

    # -- the loop --------------------------------------------------------------------------------

    def loop(self) -> int:
        cfg, total = self.cfg, self.cfg.train.steps
        stop = None
        try:
            self._catch_up()
            while self.step < total:
                if self.lock is not None:
                    self.lock.check()  # a lost lease: another run may own output_dir now
                self.ckpt.check()  # a save that failed in the background stops the run now
                if self.guard.requested(self.step):
                    stop = "signal"
                    break
                try:
                    local = next(self.data_iter)
                except StopIteration:
                    stop = "data"
                    break
                batch = self.layout.make_global_batch(local)
                self.profiler.before(self.step + 1)
                train_step, annealing = self._step_fn()
                self.state, metrics = train_step(self.state, batch, annealing)
                if self.profiler.after(self.step + 1, metrics):
                    self.logger.message(f"profile of steps {self.profiler.first}.."
                                        f"{self.profiler.last} written to"
                                        f" {self.out_dir / 'tensorboard' / 'plugins' / 'profile'}")
                before = self.data_state
                self.step += 1
                self.data_state = self.data_iter.get_state()
                previous, self.pending = self.pending, _Pending(self.step, metrics, before)
                if previous is not None and (stop := self._consume(previous)):
                    break
                if not self.throughput.started:  # the first step compiled: time from here
                    jax.block_until_ready(metrics)
                    self.throughput.start(self.step)
                    self.logger.message(f"first step (compilation) took"
                                        f" {time.perf_counter() - self.t0:.1f}s since start-up")
                last = self.step == total
                if self.ckpt.is_due(self.step) or eval_due(cfg, self.step) or last:
                    # This step's record is written before its checkpoint and its evaluation,
                    # so a kill during either loses nothing a resume does not redo.
                    if (stop := self._consume_pending()):
                        break
                    self._save(force=last)
                    self._evaluate()
            if stop == "bad_steps":
                self._undo_halted_step()
            else:
                stop = self._consume_pending() or stop
        except (WriterError, SaveFailed) as e:
            # The metrics of the steps since the last checkpoint may be incomplete: resuming
            # from that checkpoint redoes them, so it is the state to keep (it is on disk).
            raise self._writer_failed(e) from None
        except RunLockError:
            raise  # not ours to write any more: no emergency checkpoint
        except BaseException:
            self._emergency_save()
            raise
        try:
            return self._finish(stop)
        except SaveFailed as e:
            raise self._writer_failed(e) from None

    def _writer_failed(self, error) -> WriterError:
        try:
            if self.ckpt.failed is None:
                self.ckpt.wait()
            last = max((s for s in self.ckpt.all_steps()
                        if self.ckpt.failed is None or s != self.ckpt.failed.step), default=None)
        except Exception:  # noqa: BLE001 - the same disk may fail the checkpoint too
            last = None
        where = (f"checkpoint {self.ckpt.directory / str(last)} is intact" if last is not None
                 else "no checkpoint was saved yet")
        return WriterError(f"{error}; {where}: free the space (or fix the disk) and run the"
                           " same command again to resume")

    def _evaluate(self, **which):
        if not eval_due(self.cfg, self.step):
            return
        jax.block_until_ready(self.state)  # time the evaluation, not the step before it
        t = time.perf_counter()
        periodic_eval(self.cfg, self.evaluator, self.logger, model_params(self.state, ema=True),
                      self.step, **which)
        self.throughput.pause(time.perf_counter() - t)

    def _catch_up(self):
        """A resumed run whose checkpoint step was due for evaluation or samples that the
        metrics do not hold (the last attempt died doing them) does them first."""
        if self.restored_step is None:
            return
        recorded = self.logger.recorded
        self._evaluate(elbo=("eval", self.step) not in recorded,
                       samples=("text", self.step) not in recorded)

    def _consume_pending(self) -> str | None:
        pending, self.pending = self.pending, None
        return None if pending is None else self._consume(pending)

    def _undo_halted_step(self):
        """The step dispatched after the last allowed non-finite one changed nothing on the
        device (``halted``): forget it, and the batch it took."""
        if self.pending is not None:
            self.step = self.pending.step - 1
            self.data_state = self.pending.data_state_before
            self.pending = None

    def _consume(self, pending: _Pending) -> str | None:
        """Host copy of a finished step's metrics: log them; "bad_steps" if the run must stop."""
        lg, step = self.cfg.logging, pending.step
        host = {k: float(v) for k, v in jax.device_get(pending.metrics).items()}
        if host.pop("halted"):
            return "bad_steps"
        host["skipped"] = bool(host["skipped"])
        self.bad_in_a_row = int(host["bad_steps"])
        self.finite_since_restore = self.finite_since_restore or not host["skipped"]
        self.window.append(host)
        if host["skipped"]:
            self.logger.message(
                f"step {step}: non-finite loss or gradient (loss {host['loss']:.4g}, grad norm"
                f" {host['grad_norm']:.4g}): update skipped ({self.bad_in_a_row} in a row,"
                f" {int(host['total_bad_steps'])} in total)")
        if step % lg.every_steps == 0 or step == self.cfg.train.steps:
            scalars, self.window = _window_summary(self.window), []
            scalars.update(self.throughput.update(step))
            self.logger.train(step, scalars)
        return "bad_steps" if self.bad_in_a_row >= self.cfg.train.max_bad_steps else None

    def _save(self, force: bool = False) -> bool:
        if not (force or self.ckpt.is_due(self.step)):
            return False
        jax.block_until_ready(self.state)  # time the save, not the step before it
        t = time.perf_counter()
        self.logger.flush()  # a bucket's metrics.jsonl is uploaded by this, at least per checkpoint
        meta = dict(self.meta, tokens_seen=self.step * self.tokens_per_step,
                    log_window=self.window)
        started = self.ckpt.save(self.step, self.state, data_state=self.data_state,
                                 config=self.run_config, force=force, meta=meta)
        self.throughput.pause(time.perf_counter() - t)
        return started

    def _emergency_save(self):
        """A crash between steps (data error, I/O, a second Ctrl-C) must not lose the work since
        the last checkpoint: the state is intact unless the step itself failed (buffers donated)."""
        try:
            if any(x.is_deleted() for x in jax.tree.leaves(self.state)
                   if isinstance(x, jax.Array)):
                return
            try:
                stop = self._consume_pending()  # its record first, as for any checkpoint
            except Exception as e:  # noqa: BLE001 - e.g. the metrics file is what failed
                stop = None
                log.warning("could not record the last step's metrics: %s", e)
            if stop == "bad_steps":
                self._undo_halted_step()
            if self._save(force=True):
                self.ckpt.wait()
                self.logger.message(f"error: checkpoint of step {self.step} saved before stopping")
        except Exception as e:  # noqa: BLE001 - the original error is the one to report
            log.warning("could not save a checkpoint after the error: %s", e)

    def _finish(self, stop: str | None) -> int:
        if stop == "data" and self.step == 0:  # nothing trained: no checkpoint, no final/
            d = self.cfg.data
            raise ValueError(f"the data ran out before step 1: data.sources hold less than one"
                             f" global batch ({d.global_batch} sequences of {d.seq_len} tokens)"
                             f" in data.num_epochs={d.num_epochs}; add data or epochs, or lower"
                             " data.global_batch")
        self._save(force=True)
        self.ckpt.wait()
        where = self.ckpt.directory / str(self.step)
        if stop == "bad_steps":
            self.logger.message(
                f"stopped at step {self.step}: the last {self.bad_in_a_row} steps had a non-finite"
                f" loss or gradient (train.max_bad_steps={self.cfg.train.max_bad_steps}); they"
                f" were skipped, so the weights are those of the last good step. Checkpoint"
                f" {where} holds that state.")
            if self.restored_step is not None and not self.finite_since_restore:
                self.logger.message(
                    f"every step since resuming from checkpoint step {self.restored_step} was"
                    " non-finite: suspect that checkpoint (damage its checksums cannot see) or"
                    " the config changes made on resume before the hyperparameters; it is kept"
                    " (rotation never removes the newest finite step), and earlier steps may be"
                    f" under {self.ckpt.directory}.")
            else:
                self.logger.message("Lower optimizer.peak_lr, enable clipping, or check the data.")
            return EXIT_BAD_STEPS
        if stop == "signal":
            self.logger.message(f"{self.guard.signal_name}: checkpoint of step {self.step} saved"
                                f" in {self.ckpt.directory}; run the same command again to resume")
            return EXIT_SIGNAL.get(self.guard.signal_name, 143)
        if stop == "data":
            self.logger.message(f"the data ran out at step {self.step} (data.num_epochs="
                                f"{self.cfg.data.num_epochs}); finishing early")
        # A rerun with nothing left to train still finishes what a killed attempt did not.
        export_final(self.out_dir, self.cfg, self.model_cfg, self.state, self.tokenizer_dir,
                     self.logger, missing_only=self.step == self.start)
        return 0

    def close(self, raise_errors: bool = True):
        """Close the writers and wait for the last save; with ``raise_errors`` the first failure
        is raised after everything was closed."""
        errors = []
        counts = self.pipeline.stats.summary()
        steps = [lambda: counts and self.logger.message(f"data: {counts}"), self.profiler.close,
                 self.logger.close, self.ckpt.close]
        for close in steps:
            try:
                close()
            except Exception as e:  # noqa: BLE001 - close the others, then report
                errors.append(e)
                log.warning("while closing the run: %s", e)
        if errors and raise_errors:
            raise errors[0]
