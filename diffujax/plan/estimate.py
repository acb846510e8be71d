"""An estimated step time and MFU from the TPU compiler's own cost model (not a measurement).

The TPU backend annotates every fusion and op of the optimized program with its
``estimated_cycles``; ``hlo.estimated_cycles`` sums them over one step, each times the trip
counts of the loops around it (layer scan, gradient accumulation, XLA's windowed-einsum loops).
A Pallas kernel carries no cycle estimate: it contributes its roofline time (the
``pl.CostEstimate`` it declares, or for splash, which declares none, the dense attention FLOPs of
its pass). The sum, at the chip's clock, is the compute time; the communication the compiled
schedule does not overlap (``comms.py``: each collective as a ring over its replica group on the
slice's ICI torus; async pairs and collective fusions overlap the compute scheduled beside them)
is added to it. MFU is the model's FLOPs (6N + full bidirectional attention,
``train/metrics.py``) over the chips' peak during that time. ``compiled.cost_analysis()`` is not
used: it counts each loop body once.
"""

from __future__ import annotations

import math

from diffujax.plan import hlo


# FLOPs per (query, key, head_dim) triple of the attention kernels' passes: forward q.k and p.v;
# dq recomputes q.k and adds dp and dq; dkv recomputes q.k and adds dv, dp and dk.
_PASS_FLOPS = (("dkv", 8), ("dq", 6), ("bwd", 10), ("fwd", 4))


def kernel_cost(call) -> tuple[float, float]:
    """``(flops, bytes)`` of one Pallas kernel call: its declared ``pl.CostEstimate``, else (splash
    declares none) dense attention FLOPs from its q and k operands ``[batch, heads, length,
    head_dim]`` and the pass its name says, with its operands and results read once."""
    moved = sum(math.prod(dims) * hlo.dtype_bytes(t) for t, dims in call.operands + call.results)
    if call.declared:
        return call.declared.get("flops", 0.0), call.declared.get("bytes_accessed", moved)
    tensors = [dims for _, dims in call.operands if len(dims) == 4]
    if len(tensors) < 2:
        return 0.0, moved
    (b, h, lq, d), lk = tensors[0], tensors[1][2]
    factor = next((f for key, f in _PASS_FLOPS if key in call.name), 4)
    return float(factor * b * h * lq * lk * d), moved


def kernel_summary(call) -> dict:
    flops, moved = kernel_cost(call)
    return dict(name=call.name, runs=call.runs, flops=flops, bytes=moved,
                declared=call.declared is not None)


def kernel_seconds(kernels: list[dict], generation, peak_flops: float) -> float:
    """The Pallas kernels at their roofline (the slower of compute at peak and HBM traffic)."""
    return sum(k["runs"] * max(k["flops"] / peak_flops, k["bytes"] / generation.hbm_bandwidth)
               for k in kernels)


def estimate_step(program: dict, target, peak_flops: float | None, model_flops_per_step: float,
                  tokens_per_step: int) -> dict:
    """The estimate for a compiled train-step report (``compile_program``'s dict): XLA's ops at the
    compiler's cycle estimates, the Pallas kernels at their roofline, and the communication the
    schedule does not overlap (``comms.charge``), one after the other."""
    generation = target.slice.generation
    counts = program.get("compiler_cycles")
    if counts is None:
        return dict(step_seconds=None, source="none: the step did not compile for this slice")
    if not generation.clock_hz or not peak_flops:
        return dict(step_seconds=None, source=f"none: no clock rate / peak FLOP/s on record for"
                                              f" {target.slice.name}")
    kernels = kernel_seconds(counts["kernels"], generation, peak_flops)
    xla = counts["cycles"] / generation.clock_hz
    comm = program.get("communication") or dict(seconds=0.0, exposed_seconds=0.0,
                                                overlapped_seconds=0.0)
    seconds = xla + kernels + comm["exposed_seconds"]
    out = dict(step_seconds=seconds, compute_seconds=xla + kernels, xla_seconds=xla,
               kernel_seconds=kernels, communication_seconds=comm["seconds"],
               exposed_communication_seconds=comm["exposed_seconds"],
               overlapped_communication_seconds=comm["overlapped_seconds"],
               source="TPU compiler per-op cycle estimates, kernel rooflines, ICI ring model")
    out["mfu"] = model_flops_per_step / (target.num_devices * peak_flops * seconds)
    out["tokens_per_second"] = tokens_per_step / seconds
    return out


__all__ = ["estimate_step", "kernel_cost", "kernel_seconds", "kernel_summary"]
