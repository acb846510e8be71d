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
import math
import os
import time
import warnings

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from diffujax import paths
from diffujax.checkpoint import store
from diffujax.checkpoint.smollm2 import default_model
from diffujax.config import load_config, to_dict, to_yaml
from diffujax.data.pipeline import PipelineOptions, build_pipeline
from diffujax.data.sources import make_source
from diffujax.data.tokenizer import load_tokenizer
from diffujax.diffusion.sampling import sample_ancestral
from diffujax.models import abstract_model, functional
from diffujax.parallel.mesh import (data_shard, make_global_batch, make_mesh,
                                    maybe_initialize_distributed, param_shardings, to_host)
from diffujax.train import checkpointing as C
from diffujax.train import metrics as M
from diffujax.train.checkpointing import PreemptionGuard, save_model
from diffujax.train.run_dir import resolve_output_dir
from diffujax.train.state import (abstract_train_state, create_train_state, params_of,
                                  train_state_shardings)
from diffujax.train.step import after_annealing, heldout_nll, make_eval_step, make_train_step

log = logging.getLogger(__name__)

EXIT_BAD_STEPS = 3
EXIT_SIGNAL = {"SIGTERM": 143, "SIGINT": 130}
NUM_SAMPLES, SAMPLE_LEN, SAMPLE_STEPS = 4, 256, 64  # training-time samples: a quick look only


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
    # Before any JAX call: multi-host jobs must join the distributed runtime first.
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


def model_checkpoint(cfg) -> str | None:
    """``model.checkpoint`` as a path; ``default`` is the embedded SmolLM2-135M-Instruct
    (materialised and converted on first use, see ``diffujax default-model``)."""
    path = cfg.model.checkpoint
    if path == "default":
        return str(default_model())
    return None if path is None else os.fspath(paths.resolve(path))


# ------------------------------------------------------------------------------------ data


def _make_source(spec: dict, what: str, sft_fields: tuple[str, str] | None = None):
    spec = dict(spec)
    if "path" not in spec:
        raise ValueError(f"{what}: each source needs a 'path' (got keys {sorted(spec)})")
    known = {"path", "format", "field", "mode", "errors", "split", "data_dir", "weight"}
    unknown = set(spec) - known
    if unknown:
        raise ValueError(f"{what}: unknown source keys {sorted(unknown)}; expected {sorted(known)}")
    # SFT sources carry (prompt, answer) fields unless the source names its own.
    default_field = sft_fields or "text"
    source = make_source(spec.get("format", "auto"), spec["path"],
                         field=spec.get("field", default_field),
                         mode=spec.get("mode", "file"), errors=spec.get("errors", "strict"),
                         split=spec.get("split", "train"), data_dir=spec.get("data_dir"))
    return source, float(spec.get("weight", 1.0))


def build_data(cfg, tokenizer, model_cfg, *, eval_split: bool = False, shard=None):
    """``(pipeline, sources)``: the process-local pipeline of ``data.sources`` (or, with
    ``eval_split``, of ``data.eval_sources``: one pass, in order; ``(None, [])`` if none).
    ``shard``: this process's ``(index, count)`` block of the global batch (``data_shard``)."""

    d = cfg.data
    specs = d.eval_sources if eval_split else d.sources
    what = "data.eval_sources" if eval_split else "data.sources"
    if not specs:
        if eval_split:
            return None, []
        raise ValueError("data.sources is empty: name at least one training source")
    sft_fields = None
    if cfg.diffusion.sft:
        sft_fields = (d.options.get("prompt_field", "prompt"), d.options.get("answer_field", "answer"))
    pairs = [_make_source(s, what, sft_fields) for s in specs]
    # Evaluation is forward-only on one training micro-batch at a time (a size known to fit).
    batch = d.global_batch // cfg.optimizer.grad_accum_steps if eval_split else d.global_batch
    options = dict(seq_len=d.seq_len, global_batch=batch, seed=d.seed,
                   shuffle=d.shuffle and not eval_split,
                   num_epochs=1 if eval_split else d.num_epochs,
                   mode="sft" if cfg.diffusion.sft else "pretrain",
                   segment_ids=cfg.diffusion.segment_ids,
                   worker_count=0 if eval_split else d.worker_count)
    known = {f.name for f in dataclasses.fields(PipelineOptions)}
    unknown = sorted(set(d.options) - known)
    if unknown:
        raise ValueError(f"unknown config key data.options.{unknown[0]}; known: {sorted(known)}")
    options.update(d.options)
    if not eval_split and options["num_epochs"] is not None and jax.process_count() > 1:
        # Hosts would run out of data at different steps and wait for each other forever.
        raise ValueError("data.num_epochs must be unset (endless data, stop by train.steps) when"
                         " training on more than one process")
    shard_options = None if shard is None else grain.sharding.ShardOptions(*shard)
    pipeline = build_pipeline(pairs if len(pairs) > 1 else pairs[0][0], tokenizer,
                              PipelineOptions(**options), shard=shard_options,
                              model_vocab_size=model_cfg.vocab_size)
    return pipeline, [s for s, _ in pairs]


def _source_reports(sources) -> list[str]:
    return [s.report.summary() for s in sources if getattr(s, "report", None) is not None]


# ------------------------------------------------------------------------------------ model


def _tokenizer_dir(cfg) -> str:
    path = cfg.data.tokenizer or model_checkpoint(cfg)
    if path is None:
        raise ValueError("data.tokenizer is required when the model is initialised from model.init")
    return os.fspath(paths.resolve(path))


def _initial_state(cfg, mesh, rules, ckpt, logger_messages):
    """``(model_cfg, state, restored)``: restored from the newest usable checkpoint of this run,
    or freshly built (from ``model.checkpoint`` or ``model.init``), sharded either way."""
    saved = C.saved_model_config(ckpt.directory)
    if saved is not None:
        # The run's own record of the model config: resuming never needs the base checkpoint.
        model_cfg = cfg.resolve_model_config(saved)
        target = C.abstract_like(abstract_train_state(cfg, model_cfg),
                                 train_state_shardings(cfg, model_cfg, mesh, rules))
        restored = ckpt.restore_latest(target)
        if restored is not None:
            logger_messages.append(f"resumed from {ckpt.directory / str(restored.step)}")
            return model_cfg, restored.state, restored
    base = model_checkpoint(cfg)
    if base:
        loaded_cfg, _ = store.read_meta(base)
        model_cfg = cfg.resolve_model_config(loaded_cfg)
        shardings = param_shardings(functional(abstract_model(model_cfg))[1], mesh, rules)
        _, params = store.load(base, dtype=model_cfg.param_dtype, shardings=shardings)
        state = create_train_state(cfg, model_cfg, mesh, rules, params=params)
        logger_messages.append(f"initialised from {base}")
    else:
        model_cfg = cfg.resolve_model_config()
        state = create_train_state(cfg, model_cfg, mesh, rules)
        logger_messages.append(f"random initialisation (seed {cfg.model.init_seed})")
    return model_cfg, state, None


def _config_changes(old: dict | None, new: dict) -> list[str]:
    """Dotted keys whose values differ between the checkpoint's run config and this one."""
    if not old:
        return []
    flat = lambda d, p="": ({k2: v2 for k, v in d.items()
                             for k2, v2 in flat(v, f"{p}{k}.").items()} if isinstance(d, dict)
                            else {p[:-1]: d})
    a, b = flat(old), flat(new)
    norm = lambda v: list(v) if isinstance(v, tuple) else v
    return sorted(k for k in set(a) | set(b) if norm(a.get(k)) != norm(b.get(k)))


# ------------------------------------------------------------------------------------ eval, samples


def _min_over_processes(n: int) -> int:
    if jax.process_count() == 1:
        return n
    return int(np.min(multihost_utils.process_allgather(np.int32(n))))


class _Evaluator:
    """Held-out ELBO perplexity on a fixed set of batches, and a few unconditional samples."""

    def __init__(self, cfg, model_cfg, apply_fn, mesh, rules, tokenizer):
        self.cfg, self.model_cfg, self.apply_fn = cfg, model_cfg, apply_fn
        self.tokenizer = tokenizer
        self.batches, self.reports = [], []
        if cfg.logging.eval_every and cfg.data.eval_sources:
            pipeline, sources = build_data(cfg, tokenizer, model_cfg, eval_split=True,
                                           shard=data_shard(mesh, rules))
            self.reports = _source_reports(sources)
            it = pipeline.iterator()
            local = []
            for _ in range(cfg.logging.eval_batches):
                try:
                    local.append(next(it))
                except StopIteration:
                    break
            # Every process must run the same number of eval steps (they are collectives).
            count = _min_over_processes(len(local))
            self.batches = [make_global_batch(b, mesh, rules) for b in local[:count]]
            if not self.batches:
                warnings.warn("data.eval_sources yield no full batch: periodic evaluation is off")
            self.step = make_eval_step(cfg, model_cfg, apply_fn, mesh, rules, kind="elbo")
        self.key = jax.random.key(cfg.train.seed + 1)

    def elbo(self, params) -> dict | None:
        if not self.batches:
            return None
        # The same key every time: the same noise, comparable numbers from one eval to the next.
        est = heldout_nll(self.step, params, self.batches, self.key)
        out = {"nelbo": est.mean_nll, "ppl_bound": math.exp(min(est.mean_nll, 700.0)),
               "tokens": float(est.num_tokens), "draws": est.num_draws}
        if math.isfinite(est.std_error):  # over sequences, as `diffujax eval` reports it
            out["nelbo_se"] = est.std_error
        return out

    def samples(self, params, step: int) -> list[str]:
        mc, tok = self.model_cfg, self.tokenizer
        first = tok.start_id(mc.bos_token_id)
        if first is None:
            raise ValueError(f"tokenizer {tok.path} has no BOS or EOS token to start samples with")
        length = min(self.cfg.data.seq_len, SAMPLE_LEN)
        canvas = np.full((NUM_SAMPLES, length), mc.mask_token_id, np.int32)
        canvas[:, 0] = first
        src = np.zeros(canvas.shape, bool)
        src[:, 0] = True
        out = sample_ancestral(self.apply_fn, params, canvas, src,
                               jax.random.fold_in(self.key, 1_000_000 + step),
                               mask_token_id=mc.mask_token_id, steps=min(length, SAMPLE_STEPS))
        return [tok.decode_generated(row[1:]) for row in to_host(out.tokens)]


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
    resolve_output_dir(cfg.output_dir)  # refused before anything is written, if it cannot work
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
        self.out_dir = out_dir = paths.resolve(cfg.output_dir)  # a local path or a bucket URL
        if jax.process_index() == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(to_yaml(cfg))
        c, lg = cfg.checkpoint, cfg.logging
        self.mesh, self.rules = make_mesh(cfg.mesh), cfg.mesh.rule_table()
        self.ckpt = C.TrainCheckpointer(out_dir / "checkpoints", save_every=c.every_steps,
                                        keep_last=c.keep_last, keep_every=c.keep_every,
                                        async_save=c.async_save)
        notes: list[str] = []
        self.model_cfg, self.state, restored = _initial_state(cfg, self.mesh, self.rules,
                                                              self.ckpt, notes)
        self.start = self.step = int(restored.step) if restored else 0
        apply_fn = functional(abstract_model(self.model_cfg))[0]
        tokenizer = load_tokenizer(_tokenizer_dir(cfg), model_vocab_size=self.model_cfg.vocab_size)
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
        self.evaluator = _Evaluator(cfg, self.model_cfg, apply_fn, self.mesh, self.rules, tokenizer)
        self.train_step = make_train_step(cfg, self.model_cfg, apply_fn, self.mesh, self.rules)
        self._full_attention_step = None
        self._apply_fn = apply_fn

        self.logger = M.RunLogger(out_dir, total_steps=cfg.train.steps, start_step=self.start,
                                  tensorboard=lg.tensorboard, wandb=lg.wandb,
                                  run_config=to_dict(cfg))
        for line in notes + _source_reports(sources) + self.evaluator.reports:
            self.logger.message(line)
        self.run_config = to_dict(cfg)
        if restored is not None:
            changed = _config_changes(restored.config, self.run_config)
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
        self.meta = {"model_config": C.model_config_to_dict(self.model_cfg),
                     "tokenizer_dir": _tokenizer_dir(cfg), "seq_len": seq_len}
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
            cfg = after_annealing(self.cfg)
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
                if _eval_due(cfg, self.step):
                    jax.block_until_ready(metrics)  # time the evaluation, not the step before it
                    t = time.perf_counter()
                    _periodic_eval(cfg, self.evaluator, self.logger,
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
        self.logger.flush()  # a bucket's metrics.jsonl is uploaded by this, at least per checkpoint
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
            _export_final(self.out_dir, self.model_cfg, self.state, self.cfg, self.logger)
        return 0

    def close(self):
        counts = self.pipeline.stats.summary()
        if counts:
            self.logger.message(f"data: {counts}")
        self.profiler.close()
        self.logger.close()
        self.ckpt.close()


def _due(every: int, step: int, last: int) -> bool:
    return bool(every) and (step % every == 0 or step == last)


def _eval_due(cfg, step) -> bool:
    lg, last = cfg.logging, cfg.train.steps
    return _due(lg.eval_every, step, last) or _due(lg.sample_every, step, last)


def _periodic_eval(cfg, evaluator, logger, params, step):
    """Held-out ELBO and samples when due (every n steps, and at the last step)."""
    lg, last = cfg.logging, cfg.train.steps
    if _due(lg.eval_every, step, last):
        result = evaluator.elbo(params)
        if result is not None:
            logger.eval(step, result)
    if _due(lg.sample_every, step, last):
        texts = evaluator.samples(params, step)
        logger.text(step, "samples", texts)
        logger.message(f"sample @ step {step}: {texts[0][:200]!r}")


# ------------------------------------------------------------------------------------ export


def _export_final(out_dir, model_cfg, state, cfg, logger):
    """``output_dir/final`` (and ``final_ema`` when an EMA is kept): diffujax model checkpoints."""
    targets = [("final", state.params)]
    if state.ema is not None:
        targets.append(("final_ema", state.ema))
    for name, params in targets:
        save_model(out_dir / name, model_cfg, params, tokenizer_from=_tokenizer_dir(cfg))
        logger.message(f"model saved to {out_dir / name} (diffujax eval/generate --checkpoint"
                       f" {out_dir / name}; diffujax export {out_dir / name} HF_DIR)")
