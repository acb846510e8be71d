"""Training-time evaluation: held-out ELBO perplexity on a fixed set of batches and a few
unconditional samples, every ``logging.eval_every`` / ``sample_every`` steps and at the last."""

from __future__ import annotations

import itertools
import math
import warnings

import jax
import numpy as np
from jax.experimental import multihost_utils

from diffujax.diffusion.sampling import infill_canvas, sample_ancestral
from diffujax.parallel.mesh import to_host
from diffujax.train.data import build_data, source_reports
from diffujax.train.step import heldout_nll, make_eval_step

NUM_SAMPLES, SAMPLE_LEN, SAMPLE_STEPS = 4, 256, 64  # training-time samples: a quick look only


class Evaluator:
    """Held-out ELBO perplexity on a fixed set of batches, and a few unconditional samples."""

    def __init__(self, cfg, model_cfg, apply_fn, layout, tokenizer):
        self.cfg, self.model_cfg, self.apply_fn = cfg, model_cfg, apply_fn
        self.tokenizer = tokenizer
        self.batches, self.reports = [], []
        if cfg.logging.eval_every and cfg.data.eval_sources:
            pipeline, sources = build_data(cfg, tokenizer, model_cfg, eval_split=True,
                                           shard=layout.data_shard())
            self.reports = source_reports(sources)
            local = list(itertools.islice(pipeline.iterator(), cfg.logging.eval_batches))
            # Every process must run the same number of eval steps (they are collectives).
            count = len(local) if jax.process_count() == 1 else int(
                np.min(multihost_utils.process_allgather(np.int32(len(local)))))
            self.batches = [layout.make_global_batch(b) for b in local[:count]]
            if not self.batches:
                warnings.warn("data.eval_sources yield no full batch: periodic evaluation is off")
            self.step = make_eval_step(cfg, model_cfg, apply_fn, layout, kind="elbo")
        self.key = jax.random.key(cfg.train.seed + 1)

    def elbo(self, params) -> dict | None:
        if not self.batches:
            return None
        # The same key every time: the same noise, comparable numbers from one eval to the next.
        est = heldout_nll(self.step, params, self.batches, self.key)
        out = {"nelbo": est.mean_nll, "ppl_bound": est.perplexity,
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
        row, fixed = infill_canvas([first], length - 1, mc.mask_token_id)
        canvas, src = np.tile(row, (NUM_SAMPLES, 1)), np.tile(fixed, (NUM_SAMPLES, 1))
        out = sample_ancestral(self.apply_fn, params, canvas, src,
                               jax.random.fold_in(self.key, 1_000_000 + step),
                               mask_token_id=mc.mask_token_id, steps=min(length, SAMPLE_STEPS))
        return [tok.decode_generated(row[1:]) for row in to_host(out.tokens)]


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
