"""Training-time evaluation: held-out ELBO perplexity on a fixed set of batches and a few
unconditional samples, every ``logging.eval_every`` / ``sample_every`` steps and at the last."""

from __future__ import annotations

import math
import warnings

import jax
import numpy as np
from jax.experimental import multihost_utils

from diffujax.diffusion.sampling import sample_ancestral, truncate_after_eos
from diffujax.parallel.mesh import data_shard, make_global_batch, to_host
from diffujax.train.data import build_data, source_reports
from diffujax.train.step import make_eval_step

NUM_SAMPLES, SAMPLE_LEN, SAMPLE_STEPS = 4, 256, 64  # training-time samples: a quick look only


def _min_over_processes(n: int) -> int:
    if jax.process_count() == 1:
        return n
    return int(np.min(multihost_utils.process_allgather(np.int32(n))))


class Evaluator:
    """Held-out ELBO perplexity on a fixed set of batches, and a few unconditional samples."""

    def __init__(self, cfg, model_cfg, apply_fn, mesh, rules, tokenizer):
        self.cfg, self.model_cfg, self.apply_fn = cfg, model_cfg, apply_fn
        self.tokenizer = tokenizer
        self.batches, self.reports = [], []
        if cfg.logging.eval_every and cfg.data.eval_sources:
            pipeline, sources = build_data(cfg, tokenizer, model_cfg, eval_split=True,
                                           shard=data_shard(mesh, rules))
            self.reports = source_reports(sources)
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
        losses, total = [], None
        for i, batch in enumerate(self.batches):  # the same noise every time: comparable numbers
            sums = self.step(params, batch, jax.random.fold_in(self.key, i))
            losses.append(sums)
            total = sums if total is None else total + sums
        per_batch = [float(s.loss) for s in losses]
        nelbo = float(total.loss)
        out = {"nelbo": nelbo, "ppl_bound": math.exp(min(nelbo, 700.0)),
               "tokens": float(total.targets), "draws": 1}
        if len(per_batch) > 1:  # batch-means standard error of the per-token NELBO
            out["nelbo_se"] = float(np.std(per_batch, ddof=1) / math.sqrt(len(per_batch)))
        return out

    def samples(self, params, step: int) -> list[str]:
        mc, tok = self.model_cfg, self.tokenizer
        bos = mc.bos_token_id if mc.bos_token_id is not None else tok.bos_id
        bos = bos if bos is not None else tok.eos_id
        length = min(self.cfg.data.seq_len, SAMPLE_LEN)
        canvas = np.full((NUM_SAMPLES, length), mc.mask_token_id, np.int32)
        canvas[:, 0] = bos
        src = np.zeros(canvas.shape, bool)
        src[:, 0] = True
        out = sample_ancestral(self.apply_fn, params, canvas, src,
                               jax.random.fold_in(self.key, 1_000_000 + step),
                               mask_token_id=mc.mask_token_id, steps=min(length, SAMPLE_STEPS))
        tokens = out.tokens
        if tok.eos_id is not None:
            pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
            tokens = truncate_after_eos(tokens, src, tok.eos_id, pad)
        rows = to_host(tokens)
        special = {i for i in (tok.eos_id, tok.pad_id) if i is not None}
        return [tok.decode([int(t) for t in row[1:] if int(t) not in special]) for row in rows]


def _due(every: int, step: int, last: int) -> bool:
    return bool(every) and (step % every == 0 or step == last)


def eval_due(cfg, step) -> bool:
    return elbo_due(cfg, step) or samples_due(cfg, step)


def elbo_due(cfg, step) -> bool:
    return bool(cfg.data.eval_sources) and _due(cfg.logging.eval_every, step, cfg.train.steps)


def samples_due(cfg, step) -> bool:
    return _due(cfg.logging.sample_every, step, cfg.train.steps)


def periodic_eval(cfg, evaluator, logger, params, step, *, elbo: bool = True,
                  samples: bool = True):
    """Held-out ELBO and samples when due (every n steps, and at the last step); ``elbo`` /
    ``samples`` False skip one (already recorded for this step)."""
    if elbo and elbo_due(cfg, step):
        result = evaluator.elbo(params)
        if result is not None:
            logger.eval(step, result)
    if samples and samples_due(cfg, step):
        texts = evaluator.samples(params, step)
        logger.text(step, "samples", texts)
        logger.message(f"sample @ step {step}: {texts[0][:200]!r}")
