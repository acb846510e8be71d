"""An estimated step time and MFU from the TPU compiler's own cost model (not a measurement).

The TPU backend annotates every fusion and op of the optimized program with its
``estimated_cycles``; ``hlo.estimated_cycles`` sums them over one step, each times the trip
counts of the loops around it (layer scan, gradient accumulation, XLA's windowed-einsum loops).
A Pallas kernel contributes the roofline time of the ``pl.CostEstimate`` it declares. The sum,
at the chip's clock, is the estimated step time if every collective overlaps with compute (XLA
runs them asynchronously); the time the collectives would need at the full ICI bandwidth is
reported beside it as a lower bound, and the estimate is never below it. MFU is the model's
FLOPs (6N + full bidirectional attention, ``train/metrics.py``) over the chips' peak during that
time. ``compiled.cost_analysis()`` is not used: it counts each loop body once.
"""

from __future__ import annotations


def kernel_cycles(kernels, generation, peak_flops: float) -> float:
    """Cycles of the Pallas kernels from their declared costs: the slower of compute and HBM."""
    total = 0.0
    for runs, cost in kernels:
        seconds = max(cost.get("flops", 0.0) / peak_flops,
                      cost.get("bytes_accessed", 0.0) / generation.hbm_bandwidth)
        total += runs * seconds * generation.clock_hz
    return total


def estimate_step(program: dict, target, peak_flops: float | None, model_flops_per_step: float,
                  tokens_per_step: int) -> dict:
    """The estimate for a compiled train-step report (``compile_program``'s dict)."""
    generation = target.slice.generation
    counts = program.get("compiler_cycles")
    if counts is None:
        return dict(step_seconds=None, source="none: the step did not compile for this slice")
    if not generation.clock_hz or not peak_flops:
        return dict(step_seconds=None, source=f"none: no clock rate / peak FLOP/s on record for"
                                              f" {target.slice.name}")
    kernels = kernel_cycles(counts["kernels"], generation, peak_flops)
    compute = (counts["cycles"] + kernels) / generation.clock_hz
    ici = sum(c["bytes_per_step"] for c in program["collectives"].values()) / generation.ici_bandwidth
    seconds = max(compute, ici)
    out = dict(step_seconds=seconds, compute_seconds=compute, collective_seconds_bound=ici,
               kernel_seconds=kernels / generation.clock_hz,
               source="TPU compiler per-op cycle estimates")
    out["mfu"] = model_flops_per_step / (target.num_devices * peak_flops * seconds)
    out["tokens_per_second"] = tokens_per_step / seconds
    return out


__all__ = ["estimate_step", "kernel_cycles"]
