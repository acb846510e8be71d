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
the same command again to resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import time
import warnings

import jax
import numpy as np

from diffujax.config import load_config, to_dict, to_yaml
from diffujax.data.tokenizer import load_tokenizer
from diffujax.models import abstract_model, functional
from diffujax.parallel.mesh import (data_shard, make_global_batch, make_mesh,
                                    maybe_initialize_distributed)
from diffujax.train import metrics as M
from diffujax.train.checkpointing import TrainCheckpointer, model_config_to_meta
from diffujax.train.data import build_data, source_reports
from diffujax.train.evaluation import Evaluator, eval_due, periodic_eval
from diffujax.train.export import export_final
from diffujax.train.preemption import PreemptionGuard
from diffujax.train.resume import config_changes
from diffujax.train.startup import initial_state
from diffujax.train.state import params_of
from diffujax.train.step import make_train_step

log = logging.getLogger(__name__)

EXIT_BAD_STEPS = 3
EXIT_SIGNAL = {"SIGTERM": 143, "SIGINT": 130}


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "example: diffujax train --config configs/tiny.yaml train.steps=50 output_dir=runs/t\n\n"
        "Rerunning the same command resumes from the newest usable checkpoint in output_dir.\n"
        "Exit status: 0 done, 3 too many consecutive non-finite steps (last good state saved),\n"
        "143/130 SIGTERM/SIGINT (checkpoint saved first).")
    parser.add_argument("--config", metavar="PATH", help="run config (YAML); see configs/")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. train.steps=100 optimizer.peak_lr=1e-4")
    return parser


def run_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    # Before any other JAX call: multi-host jobs must join the distributed runtime first.
    maybe_initialize_distributed(cfg.mesh)
    _enable_compilation_cache()
    return train(cfg)


def _enable_compilation_cache():
    """Restarts after a preemption should not pay for compilation again: keep compiled steps in
    ``$DIFFUJAX_CACHE/jax`` unless the user chose a cache (``JAX_COMPILATION_CACHE_DIR``)."""
    if jax.config.jax_compilation_cache_dir:
        return
    root = os.environ.get("DIFFUJAX_CACHE") or os.path.expanduser("~/.cache/diffujax")
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


# ------------------------------------------------------------------------------------ the loop


@dataclasses.dataclass
class _Window:
    """Host copies of the per-step metrics since the last log line."""

    rows: list = dataclasses.field(default_factory=list)

    def add(self, m: dict):
        self.rows.append(m)

    def summary(self) -> dict:
        good = [r for r in self.rows if not r["skipped"]]
        mean = lambda k: float(np.mean([r[k] for r in good])) if good else float("nan")
        last = self.rows[-1]
        out = {"loss": mean("loss"), "unweighted_loss": mean("unweighted_masked_loss"),
               "grad_norm": mean("grad_norm"), "lr": float(last["lr"]),
               "anneal_ratio": float(last["anneal_ratio"]),
               "noised_fraction": mean("noised_fraction"),
               "skipped_steps": int(sum(r["skipped"] for r in self.rows)),
               "total_skipped_steps": int(last["total_bad_steps"])}
        self.rows = []
        return out


def train(cfg) -> int:
    """Run (or resume) the training described by ``cfg``; returns the exit status."""
    if not cfg.output_dir:
        raise ValueError("output_dir is not set (add output_dir=PATH)")
    for key, value in (("output_dir", cfg.output_dir), ("model.checkpoint", cfg.model.checkpoint)):
        if value and "://" in str(value):
            # Paths are handled as local files throughout; a URL would be written to a local
            # directory named after it and lost with the VM.
            raise ValueError(f"{key}={value}: URLs are not supported; mount the bucket (for"
                             " example with gcsfuse) or use a shared filesystem and pass its path")
    with PreemptionGuard() as guard:  # from here on SIGTERM / SIGINT mean "save, then exit"
        run = _Run(cfg, guard)
        try:
            return run.loop()
        finally:
            run.close()


class _Run:
    """One attempt at a run: set-up (restore or initialise), the step loop, the way out."""

    def __init__(self, cfg, guard):
        t0 = self.t0 = time.perf_counter()
        self.cfg, self.guard = cfg, guard
        self.out_dir = out_dir = pathlib.Path(cfg.output_dir).absolute()
        if jax.process_index() == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(to_yaml(cfg))
        c, lg = cfg.checkpoint, cfg.logging
        self.mesh, self.rules = make_mesh(cfg.mesh), cfg.mesh.rule_table()
        self.ckpt = TrainCheckpointer(out_dir / "checkpoints", save_every=c.every_steps,
                                        keep_last=c.keep_last, keep_every=c.keep_every,
                                        async_save=c.async_save)
        notes: list[str] = []
        self.model_cfg, self.state, restored = initial_state(cfg, self.mesh, self.rules,
                                                             self.ckpt, notes)
        self.start = self.step = int(restored.step) if restored else 0
        apply_fn = functional(abstract_model(self.model_cfg))[0]
        self.tokenizer_dir = cfg.tokenizer_dir()
        tokenizer = load_tokenizer(self.tokenizer_dir, model_vocab_size=self.model_cfg.vocab_size)
        self.pipeline, sources = build_data(cfg, tokenizer, self.model_cfg,
                                            shard=data_shard(self.mesh, self.rules))
        self.data_iter = self.pipeline.iterator()
        if restored is not None:
            if restored.data_state is not None:
                self.data_iter.set_state(restored.data_state)
            else:
                warnings.warn("the checkpoint holds no data-iterator state for this process (saved"
                              " with another process count?): the data stream restarts")
        self.data_state = self.data_iter.get_state()  # always the position that goes with state
        self.evaluator = Evaluator(cfg, self.model_cfg, apply_fn, self.mesh, self.rules, tokenizer)
        self.train_step = make_train_step(cfg, self.model_cfg, apply_fn, self.mesh, self.rules)
        self._full_attention_step = None
        self._apply_fn = apply_fn

        self.logger = M.RunLogger(out_dir, total_steps=cfg.train.steps, start_step=self.start,
                                  tensorboard=lg.tensorboard)
        for line in notes + source_reports(sources) + self.evaluator.reports:
            self.logger.message(line)
        self.run_config = to_dict(cfg)
        if restored is not None:
            changed = config_changes(restored.config, self.run_config)
            if changed:
                self.logger.message("config differs from the checkpoint's in: "
                                    + ", ".join(changed))
        seq_len = cfg.data.seq_len
        self.tokens_per_step = cfg.data.global_batch * seq_len
        flops = M.train_flops_per_token(self.model_cfg, seq_len)
        peak = M.peak_flops_per_device()
        self.throughput = M.Throughput(tokens_per_step=self.tokens_per_step, flops_per_token=flops,
                                       total_steps=cfg.train.steps, peak_per_device=peak)
        self.logger.message(
            f"model: {self.model_cfg.family}, {M.matmul_params(self.model_cfg) / 1e6:.1f}M matmul"
            f" params, {flops / 1e9:.3f} GFLOP/token; mesh"
            f" {dict(zip(self.mesh.axis_names, self.mesh.axis_sizes))} of"
            f" {jax.devices()[0].device_kind}; peak"
            f" {'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'} per device;"
            f" steps {self.start}..{cfg.train.steps}; set up in {time.perf_counter() - t0:.1f}s")
        self.profiler = M.StepProfiler(out_dir / "tensorboard", lg.profile_steps)
        self.meta = {"model_config": model_config_to_meta(self.model_cfg),
                     "tokenizer_dir": self.tokenizer_dir, "seq_len": seq_len}
        self.window = _Window()
        self.bad_in_a_row = 0

    def _step_fn(self):
        """The compiled step for the next step. Once the annealing ramp has reached r = 1 the
        pattern is all open; a second step compiled with the plain full pattern computes the same
        numbers but lets the kernels take their full-attention paths (cuDNN, splash, no hash)."""
        d = self.cfg.diffusion
        if d.anneal_steps <= 0 or self.step + 1 < d.anneal_steps:
            return self.train_step
        if self._full_attention_step is None:
            cfg = dataclasses.replace(self.cfg, diffusion=dataclasses.replace(d, anneal_steps=0))
            self._full_attention_step = make_train_step(cfg, self.model_cfg, self._apply_fn,
                                                        self.mesh, self.rules)
        return self._full_attention_step

    # -- the loop --------------------------------------------------------------------------------

    def loop(self) -> int:
        cfg, total = self.cfg, self.cfg.train.steps
        pending = None  # (step, device metrics) of the last dispatched step, read one step later
        stop = None
        try:
            while self.step < total:
                if self.guard.requested(self.step):
                    stop = "signal"
                    break
                try:
                    local = next(self.data_iter)
                except StopIteration:
                    stop = "data"
                    break
                batch = make_global_batch(local, self.mesh, self.rules)
                self.profiler.before(self.step + 1)
                self.state, metrics = self._step_fn()(self.state, batch)
                if self.profiler.after(self.step + 1, metrics):
                    self.logger.message(f"profile of steps {self.profiler.first}.."
                                        f"{self.profiler.last} written to"
                                        f" {self.out_dir / 'tensorboard' / 'plugins' / 'profile'}")
                self.step += 1
                self.data_state = self.data_iter.get_state()
                # Reading the previous step's metrics (not this one's) keeps the device busy.
                previous, pending = pending, (self.step, metrics)
                if previous is not None and (stop := self._consume(*previous)):
                    break
                if not self.throughput.started:  # the first step compiled: time from here
                    jax.block_until_ready(metrics)
                    self.throughput.start(self.step)
                    self.logger.message(f"first step (compilation) took"
                                        f" {time.perf_counter() - self.t0:.1f}s since start-up")
                self._save()
                if eval_due(cfg, self.step):
                    jax.block_until_ready(metrics)  # time the evaluation, not the step before it
                    t = time.perf_counter()
                    periodic_eval(cfg, self.evaluator, self.logger,
                                   params_of(self.state, ema=True), self.step)
                    self.throughput.pause(time.perf_counter() - t)
            if pending is not None:
                last = self._consume(*pending)
                stop = stop or last
        except BaseException:
            self._emergency_save()
            raise
        return self._finish(stop)

    def _consume(self, step: int, metrics) -> str | None:
        """Host copy of a finished step's metrics: log them; "bad_steps" if the run must stop."""
        lg = self.cfg.logging
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        host["skipped"] = bool(host["skipped"])
        self.bad_in_a_row = int(host["bad_steps"])
        self.window.add(host)
        if host["skipped"]:
            self.logger.message(
                f"step {step}: non-finite loss or gradient (loss {host['loss']:.4g}, grad norm"
                f" {host['grad_norm']:.4g}): update skipped ({self.bad_in_a_row} in a row,"
                f" {int(host['total_bad_steps'])} in total)")
        if step % lg.every_steps == 0 or step == self.cfg.train.steps:
            scalars = self.window.summary()
            scalars.update(self.throughput.update(step))
            self.logger.train(step, scalars)
        return "bad_steps" if self.bad_in_a_row >= self.cfg.train.max_bad_steps else None

    def _save(self, force: bool = False) -> bool:
        if not (force or self.ckpt.is_due(self.step)):
            return False
        jax.block_until_ready(self.state)  # time the save, not the step before it
        t = time.perf_counter()
        started = self.ckpt.save(self.step, self.state, data_state=self.data_state,
                                 config=self.run_config, force=force,
                                 meta=dict(self.meta, tokens_seen=self.step * self.tokens_per_step))
        self.throughput.pause(time.perf_counter() - t)
        return started

    def _emergency_save(self):
        """A crash between steps (data error, I/O, a second Ctrl-C) must not lose the work since
        the last checkpoint: the state is intact unless the step itself failed (buffers donated)."""
        try:
            if any(x.is_deleted() for x in jax.tree.leaves(self.state)
                   if isinstance(x, jax.Array)):
                return
            if self._save(force=True):
                self.ckpt.wait()
                self.logger.message(f"error: checkpoint of step {self.step} saved before stopping")
        except Exception as e:  # noqa: BLE001 - the original error is the one to report
            log.warning("could not save a checkpoint after the error: %s", e)

    def _finish(self, stop: str | None) -> int:
        self._save(force=True)
        self.ckpt.wait()
        where = self.ckpt.directory / str(self.step)
        if stop == "bad_steps":
            self.logger.message(
                f"stopped at step {self.step}: the last {self.bad_in_a_row} steps had a non-finite"
                f" loss or gradient (train.max_bad_steps={self.cfg.train.max_bad_steps}); they"
                f" were skipped, so the weights are those of the last good step. Checkpoint"
                f" {where} holds that state. Lower optimizer.peak_lr, enable clipping, or check"
                " the data.")
            return EXIT_BAD_STEPS
        if stop == "signal":
            self.logger.message(f"{self.guard.signal_name}: checkpoint of step {self.step} saved"
                                f" in {self.ckpt.directory}; run the same command again to resume")
            return EXIT_SIGNAL.get(self.guard.signal_name, 143)
        if stop == "data":
            self.logger.message(f"the data ran out at step {self.step} (data.num_epochs="
                                f"{self.cfg.data.num_epochs}); finishing early")
        if self.step > self.start or not (self.out_dir / "final").exists():
            export_final(self.out_dir, self.model_cfg, self.state, self.tokenizer_dir, self.logger)
        return 0

    def close(self):
        counts = self.pipeline.stats.summary()
        if counts:
            self.logger.message(f"data: {counts}")
        self.profiler.close()
        self.logger.close()
        self.ckpt.close()
