"""An estimated step time and MFU from XLA's own cost model (an estimate, not a measurement).

``compiled.cost_analysis()`` counts the body of a ``while`` loop once, and the train step has
two: the layer scan and the gradient-accumulation scan. So the estimate compiles the same step
twice more with the layers *unrolled* (``scan_layers=False``), with 1 and with 2 layers, one
micro-batch and no accumulation: their difference is the cost of one layer (forward, backward
and any rematerialisation), the rest is the embedding, the head, the loss and the update. Then

    step ~ grad_accum_steps x (rest + num_layers x layer)

which slightly overcounts the optimizer update (it runs once per step, not per micro-batch):
the estimate errs on the slow side. The time is XLA's ``optimal_seconds`` (its roofline of
compute, memory traffic and collectives for the TPU it compiled for; a Pallas kernel contributes
the ``pl.CostEstimate`` it declares) or, where that is missing, a roofline of the FLOPs and bytes.
MFU is the model's FLOPs (6N + full bidirectional attention, ``train/metrics.py``) over the chips'
peak during that time.
"""

from __future__ import annotations

import dataclasses

KEYS = ("flops", "bytes_accessed", "transcendentals", "optimal_seconds")


def _variant_cost(cfg, model_cfg, target, layers: int) -> dict:
    from diffujax.plan import _cost
    from diffujax.plan.programs import micro_batch, train_programs

    one_micro = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, global_batch=micro_batch(cfg)),
        optimizer=dataclasses.replace(cfg.optimizer, grad_accum_steps=1))
    small = model_cfg.replace(num_layers=layers, scan_layers=False)
    program = train_programs(one_micro, small, target.mesh, target.rules)[-1]  # steady state
    return _cost(program.lower().compile())


def estimate_step(cfg, model_cfg, target, peak_flops: float | None,
                  model_flops_per_step: float) -> dict:
    one = _variant_cost(cfg, model_cfg, target, 1)
    two = _variant_cost(cfg, model_cfg, target, 2)
    accum, layers = cfg.optimizer.grad_accum_steps, model_cfg.num_layers
    total = {}
    for key in KEYS:
        if key in one and key in two:
            per_layer = max(0.0, two[key] - one[key])
            rest = max(0.0, one[key] - per_layer)
            total[key] = accum * (rest + layers * per_layer)
    seconds = total.get("optimal_seconds")
    source = "xla optimal_seconds"
    if not seconds:
        bandwidth = target.slice.generation.hbm_bandwidth
        candidates = [total.get("flops", 0.0) / peak_flops if peak_flops else 0.0,
                      total.get("bytes_accessed", 0.0) / bandwidth]
        seconds, source = max(candidates), "roofline of xla flops and bytes"
    out = dict(step_seconds=seconds, source=source,
               compiler_flops_per_device=total.get("flops"),
               bytes_accessed_per_device=total.get("bytes_accessed"))
    if peak_flops and seconds:
        out["mfu"] = model_flops_per_step / (target.num_devices * peak_flops * seconds)
        out["tokens_per_second"] = cfg.data.global_batch * cfg.data.seq_len / seconds
    if total.get("flops"):
        # Hardware FLOPs per model FLOP: rematerialisation and the loss / softmax overheads.
        out["compiler_flops_over_model_flops"] = (total["flops"] * target.num_devices
                                                  / model_flops_per_step)
    return out


__all__ = ["estimate_step"]
