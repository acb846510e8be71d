"""The compiled training and evaluation steps.

    step = make_train_step(run_cfg, model_cfg, apply_fn, layout)
    # batch: layout.make_global_batch(local_numpy); the phase: pattern.is_annealing
    state, metrics = step(state, batch, is_annealing(step_index, anneal_steps))

One ``jax.jit`` per step function, with explicit in/out shardings and the state donated. Inside:

- the step's noise key is ``fold_in(rng, step)`` and the attention pattern is
  ``for_training(step, anneal_steps, anneal_seed, annealing=...)``: both follow from the state
  and the phase, itself a function of the step (``pattern.is_annealing``), so a run is
  reproducible and resumes exactly; the phase is a static argument, one program each;
- the objective is the full-sequence one (docs/algorithms.md §2) or, with
  ``diffusion.block_size``, the block NELBO (§9); the block size is static, so a run with a
  ``diffusion.block_schedule`` compiles one step per block size (``step_config`` says which);
- gradient accumulation scans over ``grad_accum_steps`` micro-batches of consecutive rows; the
  objective draws each row's noise from its *global* row index and returns numerator and
  denominator sums, which are added over micro-batches and divided once (docs/algorithms.md §2.6),
  so any number of micro-batches computes the same update;
- a step whose loss or gradients are not finite changes neither params nor optimizer state; it is
  counted (``bad_steps`` consecutive, ``total_bad_steps`` overall); after ``train.max_bad_steps``
  in a row every further step is a no-op (``halted``) and the loop stops.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffujax.attention.pattern import anneal_ratio, causal, for_training, full
from diffujax.config import checked_mask_token
from diffujax.diffusion.blocks import block_diffusion_loss_sums, effective_block_size
from diffujax.diffusion.likelihood import ar_nll_terms, elbo_terms, summarize_nll
from diffujax.diffusion.objective import SplitHead, diffusion_loss_sums
from diffujax.models import lora
from diffujax.parallel.logical import constrain
from diffujax.parallel.mesh import Layout, to_host
from diffujax.train.optim import ema_update, make_schedule
from diffujax.train.state import (TrainState, model_params, optimizer_for,
                                  train_state_shardings)


class CompiledStep:
    """A jitted step run under a ``Layout`` (activation constraints inside the model read its mesh
    and rules while tracing). ``lower(*args)`` gives the AOT form (memory and cost
    analysis; a later call reuses what ``lower(...).compile()`` compiled)."""

    def __init__(self, fn, layout: Layout, **jit_kwargs):
        self.jitted = jax.jit(fn, **jit_kwargs)
        self.layout = layout

    def __call__(self, *args):
        with self.layout.active():
            return self.jitted(*args)

    def lower(self, *args):
        with self.layout.active():
            return self.jitted.lower(*args)


log = logging.getLogger(__name__)

_DROPOUT_STREAM = 0x64726F70  # folded into the step's key: dropout draws apart from the noise


def _split_head(apply_fn, chunk: int):
    """``apply_fn`` returning a ``SplitHead`` (hidden states and output head) in place of the
    logits, so that the objective computes the cross-entropy ``chunk`` positions at a time and
    no pass holds float32 logits for the whole micro-batch (``model.loss_chunk``,
    ``objective.chunked_cross_entropy``)."""
    def split(*args, **kwargs):
        return SplitHead(*apply_fn(*args, split_head=True, **kwargs), chunk=chunk)
    return split


def _bound(apply_fn, batch=None, dropout_key=None):
    """``apply_fn`` as the objective calls it, ``(params, tokens, pattern)``, with the batch's
    per-document positions of packed documents (``batch`` None: the block objective's
    ``(params, tokens, pattern, positions)``, which builds the positions of its two streams
    itself), dropping out when training does."""
    if dropout_key is not None:
        apply_fn = functools.partial(apply_fn, dropout_key=dropout_key)
    if batch is None or "positions" not in batch:
        return apply_fn
    return lambda params, tokens, pattern: apply_fn(params, tokens, pattern, batch["positions"])


def training_dropout(run_cfg, model_cfg) -> bool:
    """Whether the train step drops out: LoRA adapters with ``model.lora.dropout``, or
    ``model.dropout`` and a model config with non-zero ``embd_pdrop`` / ``resid_pdrop``
    (GPT-2). Says so in the log, and that ``attn_pdrop`` is not applied, so no rate of the
    checkpoint's config is ignored silently."""
    spec = run_cfg.lora_spec(model_cfg)
    adapters = spec is not None and spec.dropout > 0
    if adapters:
        log.info("LoRA dropout %g on the adapters' input (training only)", spec.dropout)
    rates = {k: getattr(model_cfg, k, 0.0) for k in ("embd_pdrop", "resid_pdrop", "attn_pdrop")}
    if not any(rates.values()):
        return adapters
    if not run_cfg.model.dropout:
        log.info("dropout off (model.dropout: false); the checkpoint's config has %s", rates)
        return adapters
    log.info("training dropout: embd_pdrop %g, resid_pdrop %g (from the model config; none in"
             " evaluation or sampling)", rates["embd_pdrop"], rates["resid_pdrop"])
    if rates["attn_pdrop"]:
        log.warning("attn_pdrop %g is not applied: the attention kernels have no dropout on the"
                    " attention probabilities", rates["attn_pdrop"])
    return bool(rates["embd_pdrop"] or rates["resid_pdrop"]) or adapters


def step_config(run_cfg, step: int):
    """The run config of the step function that runs (0-based) training step ``step``: the block
    size the schedule has in force then (``diffusion.block_schedule`` resolved: the block size is
    static, one step function per distinct size, docs/algorithms.md §9). The annealing phase is
    not in the config: it is the step function's static argument (``pattern.is_annealing``)."""
    d = run_cfg.diffusion
    return dataclasses.replace(run_cfg, diffusion=dataclasses.replace(
        d, block_size=run_cfg.block_size_at(step), block_schedule=()))


def make_train_step(run_cfg, model_cfg, apply_fn, layout: Layout) -> CompiledStep:
    """``step(state, batch, annealing) -> (state, metrics)``, compiled once for the batch's
    shapes and each phase.

    ``batch`` holds global ``[B, L]`` arrays: ``tokens`` and optionally ``src`` (SFT prompt, never
    noised), ``loss_mask``, ``segment_ids`` (used when ``diffusion.segment_ids``) and
    ``positions``. ``metrics`` are replicated float32/int32 scalars. ``annealing`` (static): the
    phase, ``pattern.is_annealing(step, diffusion.anneal_steps)``, required so that no caller
    compiles the annealed-mask program past the ramp by default (``False`` lets the attention
    take its full-attention paths, ``pattern.for_training``).

    Non-finite steps are skipped here, not with ``optax.apply_if_finite``: that wrapper looks
    at the updates only (not the loss), keeps its counters inside the optimizer state (the loop
    and the logs read them from the ``TrainState``), leaves the EMA to be guarded separately,
    and applies a non-finite update once ``max_consecutive_errors`` is reached, where a run
    must instead stop with its last good state.

    The objective is the block NELBO when ``diffusion.block_size`` is in force (blocks shorter
    than the sequence) or ``diffusion.complementary_mask`` is set; a config with a
    ``diffusion.block_schedule`` must be resolved to one step first (``step_config``).
    """
    if run_cfg.diffusion.block_schedule:
        raise ValueError("make_train_step compiles one block size: pass step_config(run_cfg,"
                         " step), which resolves diffusion.block_schedule for that step")
    d, opt = run_cfg.diffusion, run_cfg.optimizer
    accum = opt.grad_accum_steps
    mask_id = checked_mask_token(model_cfg)
    optimizer = optimizer_for(run_cfg, model_cfg)
    schedule = make_schedule(opt, run_cfg.train.steps)
    max_bad_steps = run_cfg.train.max_bad_steps
    state_sh = train_state_shardings(run_cfg, model_cfg, layout)
    batch_sh = layout.batch_sharding
    shards = layout.batch_shards
    dropout = training_dropout(run_cfg, model_cfg)
    if run_cfg.model.loss_chunk:
        apply_fn = _split_head(apply_fn, run_cfg.model.loss_chunk)

    def micro_loss(params, frozen, mb, key, step, row_offset, global_batch, *, annealing):
        """The micro-batch's loss sums; gradients are taken for ``params`` (the trained tree)
        only: ``frozen`` is LoRA's base (None when every weight trains)."""
        params = params if frozen is None else lora.join(frozen, params)
        pattern = for_training(step, d.anneal_steps, d.anneal_seed,
                               mb.get("segment_ids") if d.segment_ids else None,
                               annealing=annealing)
        # dropout from the step's key and the micro-batch: resuming redraws the same masks
        dropout_key = (jax.random.fold_in(jax.random.fold_in(key, _DROPOUT_STREAM), row_offset)
                       if dropout else None)
        block = effective_block_size(d.block_size, mb["tokens"].shape[1])
        if block or d.complementary_mask:
            sums = block_diffusion_loss_sums(
                _bound(apply_fn, dropout_key=dropout_key), params, mb["tokens"], key,
                block_size=block, mask_token_id=mask_id, pattern=pattern, src=mb.get("src"),
                loss_mask=mb.get("loss_mask"), positions=mb.get("positions"),
                normalization=d.normalization, stratified=d.stratified_t,
                complementary=d.complementary_mask, eps=d.eps, row_offset=row_offset,
                global_batch=global_batch)
            return sums.weighted, sums
        sums = diffusion_loss_sums(
            _bound(apply_fn, mb, dropout_key), params, mb["tokens"], key,
            mask_token_id=mask_id,
            pattern=pattern, src=mb.get("src"), loss_mask=mb.get("loss_mask"),
            normalization=d.normalization, stratified=d.stratified_t, eps=d.eps,
            row_offset=row_offset, global_batch=global_batch)
        return sums.weighted, sums

    def accumulate(grad_fn, params, frozen, batch, key, step):
        """Sum of numerator gradients (for ``params``) and of loss sums over the
        micro-batches."""
        rows = batch["tokens"].shape[0]
        if rows % (accum * shards):
            raise ValueError(f"global batch {rows} must be a multiple of grad_accum_steps"
                             f" ({accum}) x the batch shards of the mesh ({shards})")
        if accum == 1:
            return grad_fn(params, frozen, batch, key, step, 0, rows)
        micro = rows // accum
        # Micro-batch i is rows [i * micro, (i + 1) * micro), itself split over the batch shards
        # (XLA moves the int32 tokens once per step to get there; they are tiny next to the
        # gradients).
        micro_batches = jax.tree.map(
            lambda x: constrain(x.reshape(accum, micro, *x.shape[1:]),
                                (None, "activation_batch") + (None,) * (x.ndim - 1)), batch)

        def body(carry, xs):
            i, mb = xs
            grads, sums = grad_fn(params, frozen, mb, key, step, i * micro, rows)
            grads = jax.lax.with_sharding_constraint(grads, state_sh.params)
            return jax.tree.map(jnp.add, carry, (grads, sums)), None

        shapes = jax.eval_shape(grad_fn, params, frozen,
                                jax.tree.map(lambda x: x[0], micro_batches), key, step, 0, rows)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        zeros = (jax.lax.with_sharding_constraint(zeros[0], state_sh.params), zeros[1])
        total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum, dtype=jnp.int32), micro_batches))
        return total

    def step_fn(state: TrainState, batch, annealing: bool):
        key = jax.random.fold_in(state.key(), state.step)
        grad_fn = jax.grad(functools.partial(micro_loss, annealing=annealing), has_aux=True)
        grad_sums, sums = accumulate(grad_fn, state.params, state.frozen, batch, key,
                                     state.step)
        # The denominators (noised or target token counts) do not depend on the params.
        grads = jax.tree.map(lambda g: g / jnp.maximum(sums.denominator, 1e-9), grad_sums)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(sums.loss) & jnp.isfinite(grad_norm)
        # After max_bad_steps non-finite steps in a row the run is over: a step dispatched
        # before the loop has read that (it reads metrics one step behind) changes nothing, so
        # the count is exact and the state stays the one to save.
        halted = state.bad_steps >= max_bad_steps
        apply = finite & ~halted

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)
        ema = state.ema
        if ema is not None:
            ema = keep(ema_update(ema, params, opt.ema_decay), ema)
        counted = (~finite & ~halted).astype(jnp.int32)
        bad = jnp.where(halted, state.bad_steps, jnp.where(finite, 0, state.bad_steps + 1))
        total_bad = state.total_bad_steps + counted
        new_state = TrainState(step=state.step + (~halted).astype(jnp.int32),
                               params=keep(params, state.params),
                               opt_state=keep(opt_state, state.opt_state), rng=state.rng, ema=ema,
                               bad_steps=bad, total_bad_steps=total_bad, frozen=state.frozen)
        tokens = batch["tokens"]
        metrics = dict(sums.metrics(), grad_norm=grad_norm,
                       lr=schedule(state.applied_steps),
                       anneal_ratio=anneal_ratio(state.step, d.anneal_steps),
                       tokens=jnp.float32(tokens.shape[0] * tokens.shape[1]),
                       skipped=(~finite).astype(jnp.int32), bad_steps=bad,
                       total_bad_steps=total_bad, halted=halted.astype(jnp.int32))
        return new_state, metrics

    return CompiledStep(step_fn, layout, static_argnums=(2,),
                        in_shardings=(state_sh, batch_sh),
                        out_shardings=(state_sh, layout.replicated()), donate_argnums=(0,))


def make_eval_step(run_cfg, model_cfg, apply_fn, layout: Layout,
                   kind: str = "elbo") -> CompiledStep:
    """``eval_step(params, batch, key, row_offset, rows) -> (nll [B], targets [B])``, the
    per-sequence terms of ``diffujax eval`` (replicated); ``heldout_nll`` runs it over batches.

    ``kind="elbo"``: ``elbo_terms``, the diffusion NELBO (docs/algorithms.md §5: full attention,
    position 0, ``src`` and padding conditioned on, ``t`` stratified over all ``rows`` of the
    evaluation set, this batch being rows ``row_offset..``), the block NELBO of §9 when the model
    config has a ``block_size`` shorter than the rows; ``kind="ar"``: ``ar_nll_terms``,
    next-token NLL with causal attention (the AR baseline; key and rows unused). ``params``:
    ``model_params(state)`` (the EMA's too).
    """
    if kind not in ("elbo", "ar"):
        raise ValueError(f"eval kind {kind!r} is not 'elbo' or 'ar'")
    d = run_cfg.diffusion
    mask_id = checked_mask_token(model_cfg) if kind == "elbo" else None
    if run_cfg.model.loss_chunk:
        apply_fn = _split_head(apply_fn, run_cfg.model.loss_chunk)
    params_sh = model_params(train_state_shardings(run_cfg, model_cfg, layout))

    def eval_fn(params, batch, key, row_offset, rows):
        tokens = batch["tokens"]
        segments = batch.get("segment_ids") if d.segment_ids else None
        fn = _bound(apply_fn, batch)
        if kind == "ar":
            return ar_nll_terms(fn, params, tokens, pattern=causal(segments),
                                loss_mask=batch.get("loss_mask"))
        block = effective_block_size(model_cfg.block_size, tokens.shape[1])
        if block:  # the two streams take the positions themselves
            fn = apply_fn
        return elbo_terms(fn, params, tokens, key, mask_token_id=mask_id, pattern=full(segments),
                          src=batch.get("src"), loss_mask=batch.get("loss_mask"), eps=d.eps,
                          row_offset=row_offset, global_batch=rows, block_size=block,
                          positions=batch.get("positions") if block else None)

    scalar = layout.replicated()
    return CompiledStep(eval_fn, layout,
                        in_shardings=(params_sh, layout.batch_sharding, scalar, scalar, scalar),
                        out_shardings=scalar)


def heldout_nll(eval_step: CompiledStep, params, batches, key, *, kind: str = "elbo"):
    """``summarize_nll`` of ``eval_step`` over ``batches`` (global batches, all of one shape):
    the ``NLLEstimate`` of ``diffujax eval`` on the same rows with one draw each (same ``key``,
    rows numbered across batches), its error bar over sequences."""
    rows = sum(int(b["tokens"].shape[0]) for b in batches)
    nll, targets, offset = [], [], 0
    for batch in batches:
        out = eval_step(params, batch, key, jnp.int32(offset), jnp.int32(rows))
        nll.append(to_host(out[0]))
        targets.append(to_host(out[1]))
        offset += int(batch["tokens"].shape[0])
    return summarize_nll(np.concatenate(nll), np.concatenate(targets),
                         num_draws=0 if kind == "ar" else 1)


__all__ = ["CompiledStep", "heldout_nll", "make_eval_step", "make_train_step", "step_config"]
