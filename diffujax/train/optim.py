"""The optimizer: AdamW with decoupled weight decay, a learning-rate schedule, global-norm clipping.

Parameters and optimizer state are float32 master copies (``model.param_dtype``); the model casts
weights to its compute dtype (``model.dtype``, bf16) inside the forward pass, so gradients arrive
in float32 and nothing here deals with mixed precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from diffujax.models import param_specs
from diffujax.models.params import map_specs


def make_schedule(opt, total_steps: int) -> optax.Schedule:
    """Learning rate per applied update. ``opt`` is an ``OptimizerSection``: linear warmup from 0
    over ``warmup_steps``, then constant, cosine or linear decay to ``min_lr_ratio * peak_lr`` at
    ``decay_steps`` (default ``total_steps``, counted from step 0, warmup included)."""
    peak, warmup = opt.peak_lr, opt.warmup_steps
    end = peak * opt.min_lr_ratio
    decay_steps = opt.decay_steps or total_steps
    if opt.schedule == "cosine":
        if decay_steps <= warmup:
            raise ValueError(f"optimizer: decay_steps ({decay_steps}) must exceed warmup_steps"
                             f" ({warmup})")
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, decay_steps, end)
    if opt.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif opt.schedule == "linear":
        after = optax.linear_schedule(peak, end, max(decay_steps - warmup, 1))
    else:
        raise ValueError(f"optimizer.schedule {opt.schedule!r} is not constant, cosine or linear")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def describe_schedule(opt, total_steps: int) -> str:
    """``make_schedule``'s schedule in words, e.g. "warmup to 0.003 over 20 steps, then cosine
    decay to 0.0003 at step 200"."""
    warm = (f"warmup to {opt.peak_lr:g} over {opt.warmup_steps} steps, then "
            if opt.warmup_steps else "")
    if opt.schedule == "constant":
        return f"{warm}constant {opt.peak_lr:g}"
    return (f"{warm}{opt.schedule} decay to {opt.peak_lr * opt.min_lr_ratio:g} at step"
            f" {opt.decay_steps or total_steps}")


def weight_decay_mask(model_cfg, scope: str = "matrices"):
    """True for the weights that decay. ``matrices``: matrices and embeddings, not norm scales
    and biases; ``all``: every parameter (the reference, docs/algorithms.md §2).

    Decided from the family's ``ParamSpec`` table (the same tree as the parameters): a weight
    initialised to a constant (``ones``: norm scales, ``zeros``: biases) is exempt.
    """
    if scope not in ("matrices", "all"):
        raise ValueError(f"optimizer.weight_decay_scope {scope!r} is not matrices or all")
    return map_specs(lambda _, spec: scope == "all" or spec.init == "normal",
                     param_specs(model_cfg))


def make_optimizer(opt, total_steps: int, model_cfg, mask=None) -> optax.GradientTransformation:
    """Global-norm clipping (``clip_norm``; off when unset or 0), then AdamW under the schedule.
    ``mask``: which trained leaves decay (default ``weight_decay_mask`` of the model's weights).

    optax's AdamW scales the decay by the learning rate (as PyTorch's AdamW does), so the decay
    follows warmup and decay of the schedule.
    """
    adamw = optax.adamw(make_schedule(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                        weight_decay=opt.weight_decay,
                        mask=(weight_decay_mask(model_cfg, opt.weight_decay_scope)
                              if mask is None else mask))
    if not opt.clip_norm:
        return adamw
    return optax.chain(optax.clip_by_global_norm(opt.clip_norm), adamw)


def ema_update(ema, params, decay: float):
    """``ema <- decay * ema + (1 - decay) * params`` in float32."""
    def one(e, p):
        return (decay * e + (1.0 - decay) * p.astype(jnp.float32)).astype(e.dtype)

    return jax.tree.map(one, ema, params)
