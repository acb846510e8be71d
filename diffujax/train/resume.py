"""What a resumed run compares: the run config recorded by the checkpoint against this one."""

from __future__ import annotations

import dataclasses

from diffujax.config import OptimizerSection, may_change_on_resume
from diffujax.train.optim import describe_schedule, make_schedule


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k2: v2 for k, v in node.items() for k2, v2 in _flat(v, f"{prefix}{k}.").items()}
    return {prefix[:-1]: list(node) if isinstance(node, tuple) else node}


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume(old: dict | None, new: dict, step: int, where: str) -> list[str]:
    """Refuse (``ValueError``, one line) a resume whose config changes what the checkpoint of
    ``step`` cannot honour, listing every such key; return one line per change that it can
    honour (applied from here on)."""
    # Both configs carry every key: a checkpoint of the current format recorded the whole one.
    a, b = _flat(old or {}), _flat(new)
    changes = {} if not old else {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
                                  if a.get(k) != b.get(k)}
    refused = {k: v for k, v in changes.items() if not may_change_on_resume(k)}
    if refused:
        listing = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in refused.items())
        raise ValueError(
            f"cannot resume {where} (step {step}) with this config: it changes what the"
            f" checkpoint was trained with ({listing}). Put those values back to continue the"
            " run, or start a new run in another output_dir (model.checkpoint=RUN/final, or a"
            " step exported with `diffujax export`, starts it from this run's weights)")
    steps = new.get("train", {}).get("steps")
    if steps is not None and steps < step:
        raise ValueError(f"train.steps={steps} is below the checkpoint's step {step} in {where}:"
                         f" set train.steps >= {step} to continue this run")
    applied = [f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items()]
    redrawn = schedule_change(old, new, step) if set(changes) & SCHEDULE_INPUTS else None
    return applied + ([redrawn] if redrawn else [])


# What the learning-rate schedule is drawn from: train.steps ends the decay unless decay_steps does.
SCHEDULE_INPUTS = {"train.steps", "optimizer.peak_lr", "optimizer.schedule",
                   "optimizer.warmup_steps", "optimizer.decay_steps", "optimizer.min_lr_ratio"}


def _schedule_of(raw: dict):
    given = raw.get("optimizer") or {}
    opt = OptimizerSection(**{f.name: given[f.name] for f in dataclasses.fields(OptimizerSection)
                              if f.name in given})
    total = raw["train"]["steps"]
    return describe_schedule(opt, total), make_schedule(opt, total)


def schedule_change(old: dict, new: dict, step: int) -> str | None:
    """The learning-rate schedule as a resume's changes redraw it (a longer ``train.steps``
    stretches a decay that ends at ``train.steps``), with the rate of the next step before and
    after; None when the schedule is the same."""
    (was, old_fn), (now, new_fn) = _schedule_of(old), _schedule_of(new)
    if was == now:
        return None
    # The schedule's count is the number of updates already applied: step s+1 trains at fn(s).
    return (f"learning-rate schedule redrawn: {now} (was: {was}); step {step + 1} trains at lr"
            f" {float(new_fn(step)):.3g} (was {float(old_fn(step)):.3g})")
