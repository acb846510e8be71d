"""An estimated step time and MFU from the TPU compiler's own cost model (not a measurement).

The TPU backend annotates every fusion and op of the optimized program with its
``estimated_cycles``; ``hlo.estimated_cycles`` sums them over one step, each times the trip
counts of the loops around it (layer scan, gradient accumulation, XLA's windowed-einsum loops).
A Pallas kernel carries no cycle estimate: it contributes its roofline time from its block sizes
(which splash and the diffujax kernels write into their metadata): per grid step one score tile's
FLOPs at peak or the blocks it moves at the HBM bandwidth, whichever is slower; the streamed side
is re-read once per outer block, so small blocks cost traffic. Kernels without block sizes fall
back to their declared ``pl.CostEstimate``. Neither the kernels' softmax (VPU/EUP) work nor the
per-grid-step overhead is charged. The cycles at the chip's clock plus the kernels are the
compute time; the communication the compiled schedule does not overlap (``comms.py``: each
collective as a ring over its replica group on the slice's ICI torus; async pairs and collective
fusions overlap the compute scheduled beside them) is added to it. MFU is the model's FLOPs (6N +
full bidirectional attention, ``runs/flops.py``) over the chips' peak during that time.
``compiled.cost_analysis()`` is not used: it counts each loop body once.

The cached block decoder (``generate`` on a block model) is one ``while`` that stops on data; its
body (one forward pass of a block against the KV cache, then the sampler's denoise or commit
branch) is counted for the passes of a deterministic plan (``programs.decode_plan``: the
``confidence`` rule, a fixed number of passes per block), and both branches of that choice are
charged on every pass: an upper bound on the sampler's share (both branches together: 8.6% of
the XLA cycles for GPT-2 small on v5litepod-8, about a fifth on the tests' 0.1M-parameter
model).

One pass of that decoder (``--what decode``, ``programs.decode_step_program``) has no loop on data:
its time is ``step_time``'s; the tokens it yields depend on the sampler (``tokens_per_pass``).
"""

from __future__ import annotations

from diffujax.plan import hlo


# FLOPs per (query, key, head_dim) triple of the attention kernels' passes: forward q.k and p.v;
# dq recomputes q.k and adds dp and dq; dkv recomputes q.k and adds dv, dp and dk.
_PASS_FLOPS = {"fwd": 4, "dq": 6, "dkv": 8}
# The block-size keys of each pass in a kernel's metadata (splash's names; the diffujax kernels
# write the same): (query block, key/value block).
_PASS_BLOCKS = {"fwd": ("block_q", "block_kv"), "dq": ("block_q_dq", "block_kv_dq"),
                "dkv": ("block_q_dkv", "block_kv_dkv")}


def attention_blocks(call) -> dict | None:
    """``{name, q, k, v, rest, outputs, bq, bkv}`` for an attention kernel call whose metadata
    names its block sizes (splash, the diffujax kernels), else None. q/k/v: its first three
    floating-point operands of q's rank, as ``[batch, heads, length, head_dim]`` (splash on one
    example has no batch axis); ``rest``: its other operands of that rank (do, row statistics);
    ``outputs``: its results of that rank (the others are the kernel's VMEM scratch)."""
    name = next((p for p in ("dkv", "dq", "fwd") if p in call.name), None)
    floats = [(t, dims) for t, dims in call.operands if t[0] in "bf"]  # not masks, scalars
    rank = next((len(dims) for _, dims in floats if len(dims) >= 3), 0)
    tensors = [(t, dims) for t, dims in floats if len(dims) == rank]
    if name is None or rank not in (3, 4) or len(tensors) < 3 or not call.metadata:
        return None
    bq, bkv = (call.metadata.get(key) for key in _PASS_BLOCKS[name])
    if not bq or not bkv:
        return None
    as4 = lambda t: (t[0], (1,) * (4 - rank) + tuple(t[1]))  # noqa: E731
    return dict(name=name, q=as4(tensors[0]), k=as4(tensors[1]), v=as4(tensors[2]),
                rest=tensors[3:], outputs=[r for r in call.results if len(r[1]) == rank],
                bq=int(bq), bkv=int(bkv))


def blocked_attention_cost(call, blocks: dict) -> tuple[float, float, int]:
    """``(flops, bytes, grid steps)`` of an attention pass from its block sizes. The kernel walks
    an outer axis of blocks (query blocks for fwd and dq, key/value blocks for dkv) and streams
    the other side's blocks under each: per grid step one ``bq x bkv`` score tile
    (``_PASS_FLOPS`` x bq x bkv x head_dim FLOPs) and one streamed block. Bytes: the outer side's
    operands and the outputs move once, the streamed side once per outer block (and, for fwd
    and dq, once per query head of a shared K/V head). Every block is computed: the dense
    patterns planned here (full, annealed) skip none."""
    (_, (b, h, lq, d)), (_, (_, kvh, lk, _)) = blocks["q"], blocks["k"]
    bq, bkv = min(blocks["bq"], lq), min(blocks["bkv"], lk)
    steps = b * h * -(-lq // bq) * -(-lk // bkv)
    flops = _PASS_FLOPS[blocks["name"]] * steps * bq * bkv * d
    outputs = sum(hlo.array_bytes(r) for r in blocks["outputs"])
    kv = hlo.array_bytes(blocks["k"]) + hlo.array_bytes(blocks["v"])
    q_side = hlo.array_bytes(blocks["q"]) + sum(hlo.array_bytes(r) for r in blocks["rest"])
    if blocks["name"] == "dkv":
        moved = outputs + kv + q_side * -(-lk // bkv)
    else:
        moved = outputs + q_side + kv * (h // kvh) * -(-lq // bq)
    return float(flops), float(moved), steps


def kernel_summary(call) -> dict:
    """The cost of one Pallas kernel call: ``flops`` and ``bytes`` from its block sizes for an
    attention pass that names them (``blocked_attention_cost``, with its grid ``steps`` and
    ``blocks``); else its declared ``pl.CostEstimate``, or no FLOPs, with its operands and
    results read once."""
    out = dict(name=call.name, runs=call.runs, flops=0.0, bytes=0.0,
               declared=call.declared is not None, steps=None, blocks=None)
    blocks = attention_blocks(call)
    if blocks:
        out["flops"], out["bytes"], out["steps"] = blocked_attention_cost(call, blocks)
        out["blocks"] = [blocks["bq"], blocks["bkv"]]
        return out
    out["bytes"] = sum(hlo.array_bytes(shape) for shape in call.operands + call.results)
    if call.declared:
        out["flops"] = call.declared.get("flops", 0.0)
        out["bytes"] = call.declared.get("bytes_accessed", out["bytes"])
    return out


def kernel_seconds(kernels: list[dict], generation, peak_flops: float) -> float:
    """The Pallas kernels at their roofline: per grid step the slower of its FLOPs at peak and
    its HBM traffic, times the steps (with the steps' work even, the same as the totals'
    roofline); a kernel without block sizes counts as one step."""
    return sum(k["runs"] * max(k["flops"] / peak_flops, k["bytes"] / generation.hbm_bandwidth)
               for k in kernels)


def step_time(program: dict, target, peak_flops: float | None) -> dict:
    """The time of one call of a compiled program (``compile_program``'s dict): XLA's ops at the
    compiler's cycle estimates, the Pallas kernels at their roofline, and the communication the
    schedule does not overlap (``comms.charge``), one after the other. ``bound_by``: the step's
    seconds by category (``hlo.estimated_cycles``, then the kernels and the exposed
    communication), largest first. ``step_seconds`` is None (with the reason in ``source``) when
    there is nothing to estimate from."""
    generation = target.slice.generation
    counts = program.get("compiler_cycles")
    if counts is None:
        return dict(step_seconds=None, source="none: the step did not compile for this slice")
    if not generation.clock_hz or not peak_flops:
        return dict(step_seconds=None, source=f"none: no clock rate / peak FLOP/s on record for"
                                              f" {target.slice.name}")
    kernels = kernel_seconds(counts["kernels"], generation, peak_flops)
    xla = counts["cycles"] / generation.clock_hz
    comm = program["communication"]  # compiled with compiler_cycles
    seconds = xla + kernels + comm["exposed_seconds"]
    parts = {name: cycles / generation.clock_hz
             for name, cycles in (counts.get("by_category") or {}).items()}
    parts.update({"Pallas kernels": kernels, "exposed communication": comm["exposed_seconds"]})
    bound_by = [dict(category=name, seconds=s, share=s / seconds if seconds else 0.0)
                for name, s in sorted(parts.items(), key=lambda kv: -kv[1]) if s > 0]
    return dict(step_seconds=seconds, compute_seconds=xla + kernels, xla_seconds=xla,
                kernel_seconds=kernels, communication_seconds=comm["seconds"],
                exposed_communication_seconds=comm["exposed_seconds"],
                overlapped_communication_seconds=comm["overlapped_seconds"], bound_by=bound_by,
                source="TPU compiler per-op cycle estimates, kernel rooflines, ICI ring model")


def estimate_step(program: dict, target, peak_flops: float | None, model_flops_per_step: float,
                  tokens_per_step: int) -> dict:
    """A train step's estimated time (``step_time``), MFU and tokens/s."""
    out = step_time(program, target, peak_flops)
    if out["step_seconds"]:
        seconds = out["step_seconds"]
        out["mfu"] = model_flops_per_step / (target.num_devices * peak_flops * seconds)
        out["tokens_per_second"] = tokens_per_step / seconds
    return out


def estimate_decode(program: dict, target, peak_flops: float | None) -> dict:
    """The cached decoder's estimated time for one call (``step_time``: its loop counted for the
    passes of its deterministic plan, ``programs.decode_plan``) and what it yields: ``rows x
    new_tokens`` tokens per call, per second and per second per chip, and the forward passes
    per generated token (the passes of one call serve every row at once)."""
    out = step_time(program, target, peak_flops)
    plan = program["decode"]
    out.update(forward_passes=plan["forward_passes"],
               forward_passes_per_token=plan["forward_passes"] / plan["new_tokens"],
               tokens_per_call=program["rows"] * plan["new_tokens"])
    if out["step_seconds"]:
        out["tokens_per_second"] = out["tokens_per_call"] / out["step_seconds"]
        out["tokens_per_second_per_chip"] = out["tokens_per_second"] / target.num_devices
    return out


def tokens_per_pass(block_size: int) -> dict[str, float]:
    """Tokens one row commits per pass of the cached decoder, in its two extremes: a block of
    ``n`` takes its denoising passes and then a commit pass (``decoding.py``), so one token per
    denoising pass commits ``n`` tokens in ``n + 1`` passes and the whole block in one
    denoising pass ``n`` in 2 (the most a pass can yield); with blocks of one token (AR) every
    pass is a commit pass and yields one token."""
    n = block_size
    if n == 1:
        return dict(one_token_per_denoising_pass=1.0, whole_block_per_denoising_pass=1.0)
    return dict(one_token_per_denoising_pass=n / (n + 1), whole_block_per_denoising_pass=n / 2)


def estimate_decode_step(program: dict, target, peak_flops: float | None) -> dict:
    """One pass of the cached decoder (``programs.decode_step_program``): its estimated time
    (``step_time``), its matmul FLOPs and their share of the chips' peak in that time, and the
    tokens/s per chip at ``tokens_per_pass`` x rows tokens per pass."""
    out = step_time(program, target, peak_flops)
    rows, chips = program["rows"], target.num_devices
    out.update(pass_seconds=out["step_seconds"], tokens_per_pass_per_row=tokens_per_pass(
        program["decode_step"]["block_size"]), matmul_flops_per_pass=program.get("matmul_flops"))
    if out["step_seconds"]:
        seconds = out["step_seconds"]
        if out["matmul_flops_per_pass"]:
            out["mfu"] = out["matmul_flops_per_pass"] / (chips * peak_flops * seconds)
        out["tokens_per_second_per_chip"] = {
            k: rows * v / seconds / chips for k, v in out["tokens_per_pass_per_row"].items()}
    return out

