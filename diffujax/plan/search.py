"""``diffujax plan --fit``: the fastest micro-batch / remat / loss-chunk setting that fits the
slice.

The global batch stays what the config says (it is a hyperparameter of the run); the search moves
``optimizer.grad_accum_steps`` (so the micro-batch is ``global_batch / grad_accum_steps``, a
multiple of the mesh's batch shards), ``model.remat`` (``models.layers.REMAT_POLICIES``: none,
dots_with_attention, dots, full; ever more recompute, ever less memory) and ``model.loss_chunk``
(``LOSS_CHUNKS`` and the config's own: the whole micro-batch's float32 logits at once, or a chunk
of positions at a time, recomputed in the backward pass). For each policy and chunk a bisection
finds the fewest accumulation steps that fit (HBM only falls as the micro-batch shrinks); every
compiled setting that fits is ranked by its estimated step time (``estimate.py``: from the same
compile, no extra work).
"""

from __future__ import annotations

import dataclasses

from diffujax.models.layers import REMAT_POLICIES
from diffujax.plan.analysis import compile_program, make_target
from diffujax.plan.estimate import estimate_step
from diffujax.plan.programs import plan_model_config, train_programs
from diffujax.runs.flops import peak_flops_per_device
from diffujax.train.state import model_flops_per_token

REMATS = tuple(REMAT_POLICIES)  # in order of recompute
# Loss chunks searched besides the config's own: the unchunked logits (0, fastest where they
# fit) and a chunk small enough that the logits stop mattering for HBM.
LOSS_CHUNKS = (0, 256)


def loss_chunk_choices(configured: int, seq_len: int) -> list[int]:
    """``LOSS_CHUNKS`` and the config's ``model.loss_chunk``; a chunk as long as the sequence
    (or longer) is the unchunked loss, so it is not searched twice."""
    return sorted({0 if c >= seq_len else c for c in (*LOSS_CHUNKS, configured)})


def accumulation_choices(global_batch: int, batch_shards: int) -> list[int]:
    """Accumulation steps whose micro-batch splits evenly over the batch shards."""
    return [a for a in range(1, global_batch + 1)
            if global_batch % a == 0 and (global_batch // a) % batch_shards == 0]


def fit(cfg, topology: str, *, num_slices: int | None = None, remats=REMATS,
        loss_chunks=None, log=None) -> dict:
    """The search (see the module's docstring); ``loss_chunks``: the chunks to try (default
    ``loss_chunk_choices``)."""
    log = log or (lambda msg: None)
    model_cfg, _ = plan_model_config(cfg)
    target = make_target(cfg, topology, num_slices)
    peak = peak_flops_per_device(target.device_kind)
    tokens = cfg.data.global_batch * cfg.data.seq_len
    model_flops = model_flops_per_token(cfg, model_cfg) * tokens
    choices = accumulation_choices(cfg.data.global_batch, target.layout.batch_shards)
    if loss_chunks is None:
        loss_chunks = loss_chunk_choices(cfg.model.loss_chunk, cfg.data.seq_len)
    memo: dict[tuple[str, int, int], dict] = {}  # every compiled setting, in order

    def check(remat: str, chunk: int, accum: int) -> dict:
        if (remat, chunk, accum) not in memo:
            run_cfg = dataclasses.replace(
                cfg, optimizer=dataclasses.replace(cfg.optimizer, grad_accum_steps=accum),
                model=dataclasses.replace(cfg.model, remat=remat, loss_chunk=chunk))
            mc = model_cfg.replace(remat=remat)
            log(f"  remat={remat} loss_chunk={chunk} grad_accum_steps={accum} ...")
            result = dict(remat=remat, loss_chunk=chunk, grad_accum_steps=accum, total=0,
                          fits=True)
            # The full-attention step first (the run's steady state, estimated), then the
            # annealing one, which must fit too.
            for program in reversed(train_programs(run_cfg, mc, target.layout)):
                compiled = compile_program(program, target, mc)
                mem = compiled["memory"]
                result["total"] = max(result["total"], mem["total"])
                if "step_seconds" not in result:
                    est = estimate_step(compiled, target, peak, model_flops, tokens)
                    result.update(step_seconds=est["step_seconds"], mfu=est.get("mfu"))
                if not mem["fits"]:
                    result["fits"] = False
                    break
            memo[remat, chunk, accum] = result
        return memo[remat, chunk, accum]

    for remat in remats:
        for chunk in loss_chunks:
            if not check(remat, chunk, choices[-1])["fits"]:
                continue
            lo, hi = 0, len(choices) - 1  # choices[hi] fits
            while lo < hi:
                mid = (lo + hi) // 2
                if check(remat, chunk, choices[mid])["fits"]:
                    hi = mid
                else:
                    lo = mid + 1
    tried = list(memo.values())
    top = min((t for t in tried if t["fits"] and t.get("step_seconds")),
              key=lambda t: t["step_seconds"], default=None)  # the fastest that fits
    best = top and dict(top, overrides=[f"optimizer.grad_accum_steps={top['grad_accum_steps']}",
                                        f"model.remat={top['remat']}",
                                        f"model.loss_chunk={top['loss_chunk']}"])
    return dict(topology=target.slice.name, global_batch=cfg.data.global_batch, tried=tried,
                best=best)
