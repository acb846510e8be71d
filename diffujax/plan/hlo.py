"""Reading an optimized TPU HLO module's text: collectives, and the compiler's cycle estimates.

XLA's text names every instruction's result shape (``bf16[1,64,2,16]{...}``), so the bytes a
collective produces per device can be read off it, and the TPU backend writes its own cost model's
``estimated_cycles`` into the backend config of each fusion and op. What runs inside a ``while``
body (the layer scan, gradient accumulation, XLA's own windowed-einsum loops) runs once per trip:
the trip count is the constant the loop condition compares the counter with, and nested loops
multiply. (``compiled.cost_analysis()`` counts each loop body once, which is why it is not used.)
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
          "f8e4m3": 1, "f8e4m3b11fnuz": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_BYTES, key=len, reverse=True)) + r")\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%?([^\s(]+) \(.*\{\s*$")
_INSTR = re.compile(r"^\s+(?:ROOT )?%?([^\s=]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_CALLEES = re.compile(r"\b(condition|body|calls|to_apply|true_computation|false_computation)"
                      r"=%?([^\s,}]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_CONSTANT = re.compile(r"^\s+%?([^\s=]+) = s32\[\][^ ]* constant\((\d+)\)")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_KERNEL_COST = re.compile(r'"cost_estimate":\{([^}]*)\}')


def shape_dims(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """The arrays of a result-shape string (a tuple gives several): ``[(dtype, dims), ...]``."""
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(text)]


def dtype_bytes(dtype: str) -> float:
    return _BYTES[dtype]


def shape_bytes(text: str) -> int:
    return int(sum(_BYTES[t] * math.prod(d) for t, d in shape_dims(text)))


# ------------------------------------------------------------------------------ control flow


@dataclasses.dataclass
class _Computation:
    name: str
    lines: list = dataclasses.field(default_factory=list)


def _computations(text: str) -> tuple[dict[str, _Computation], str | None]:
    """Computations by name, one joined line per instruction (a kernel's metadata can span
    several text lines; only a lone ``}`` closes a computation)."""
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = comps.setdefault(m.group(1), _Computation(m.group(1)))
                if line.startswith("ENTRY"):
                    entry = m.group(1)
            continue
        if line.strip() == "}":
            current = None
        elif line.startswith((" ", "\t")) or not current.lines:
            current.lines.append(line)
        else:  # the continuation of the instruction above
            current.lines[-1] += " " + line
    return comps, entry


def _trip_count(condition: _Computation | None) -> int:
    """A scan's condition is ``counter < constant(N)``; unknown forms count once."""
    if condition is None:
        return 1
    constants = {}
    for line in condition.lines:
        m = _CONSTANT.match(line)
        if m:
            constants[m.group(1)] = int(m.group(2))
    for line in condition.lines:
        if " compare(" in line and "direction=LT" in line:
            for name, value in constants.items():
                if re.search(rf"%{re.escape(name)}\b", line):
                    return value
    return 1


def _walk(text: str):
    """``(computation, instruction match, line, runs)`` for every instruction of the computations
    that run as control flow (the entry, ``while`` bodies and conditions, ``call`` and
    ``conditional`` targets), with how many times it runs per execution of the program. Fused
    computations are not visited: a fusion instruction stands for its whole body."""
    comps, entry = _computations(text)

    def visit(name, runs, depth):
        if depth > 64 or name not in comps:
            return
        for line in comps[name].lines:
            m = _INSTR.match(line)
            if not m:
                continue
            yield name, m, line, runs
            opcode = m.group(3)
            callees = dict(_CALLEES.findall(line))
            if opcode == "while":
                trips = _trip_count(comps.get(callees.get("condition", "")))
                yield from visit(callees.get("condition"), runs * (trips + 1), depth + 1)
                yield from visit(callees.get("body"), runs * trips, depth + 1)
            elif opcode in ("call", "conditional"):
                targets = [v for k, v in callees.items()
                           if k in ("calls", "true_computation", "false_computation")]
                for group in _BRANCHES.findall(line):
                    targets += [c.strip().lstrip("%") for c in group.split(",")]
                for target in targets:
                    yield from visit(target, runs, depth + 1)

    if entry is not None:
        yield from visit(entry, 1, 0)


# ------------------------------------------------------------------------------ collectives


@dataclasses.dataclass
class Collective:
    kind: str  # one of COLLECTIVES
    name: str
    computation: str
    result: str  # result shape text
    bytes: int  # result bytes per device (the data each device ends up with)
    runs: int  # executions per program run (loop trip counts multiplied)


def collectives(text: str) -> list[Collective]:
    """Every collective of an optimized HLO module. Asynchronous pairs are counted once, at the
    ``-done`` (whose result is the collective's output)."""
    out = []
    for comp, m, _, runs in _walk(text):
        name, result, opcode = m.group(1), m.group(2), m.group(3)
        kind = opcode[:-5] if opcode.endswith("-done") else opcode
        if kind in COLLECTIVES and not opcode.endswith("-start"):
            out.append(Collective(kind, name, comp, result, shape_bytes(result), runs))
    return out


def summarize(items: list[Collective]) -> dict[str, dict[str, int]]:
    """``{kind: {"ops", "bytes", "executions", "bytes_per_step"}}``, bytes per device: ``bytes``
    counts each op once, ``bytes_per_step`` every execution (one run of the program)."""
    out: dict[str, dict[str, int]] = {}
    for c in items:
        s = out.setdefault(c.kind, dict(ops=0, bytes=0, executions=0, bytes_per_step=0))
        s["ops"] += 1
        s["bytes"] += c.bytes
        s["executions"] += c.runs
        s["bytes_per_step"] += c.bytes * c.runs
    return dict(sorted(out.items()))


def gathered_whole(items: list[Collective], full_shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Names of parameters some all-gather materialises whole on every device (its result has the
    parameter's full shape): large ones cost their full size in HBM and ICI bandwidth."""
    by_shape = collections.defaultdict(list)
    for name, shape in full_shapes.items():
        by_shape[tuple(shape)].append(name)
    hits = []
    for c in items:
        if c.kind != "all-gather":
            continue
        for _, dims in shape_dims(c.result):
            for name in by_shape.get(dims, ()):
                if name not in hits:
                    hits.append(name)
    return hits


# ------------------------------------------------------------------------------ cycles


@dataclasses.dataclass
class KernelCall:
    """One Mosaic custom call (a Pallas kernel) and what the HLO says about its cost."""

    name: str  # instruction name, e.g. "splash_mha_fwd_residuals.1"
    runs: int
    declared: dict | None  # its ``pl.CostEstimate`` (flops, bytes_accessed, ...) if it has one
    operands: list  # (dtype, dims) of each operand, from operand_layout_constraints
    results: list  # (dtype, dims) of each result


@dataclasses.dataclass
class CycleCount:
    """The TPU compiler's per-instruction estimates, summed over one run of the program."""

    cycles: int  # sum of ``estimated_cycles`` x runs
    instructions: int  # instructions that carry an estimate
    kernels: list  # KernelCall of every Pallas kernel (they carry no cycle estimate)


def _braced(line: str, key: str) -> str:
    """The text inside the balanced braces that follow ``key`` ('' if absent)."""
    start = line.find(key + "{")
    if start < 0:
        return ""
    depth, i = 0, start + len(key)
    for j in range(i, len(line)):
        depth += {"{": 1, "}": -1}.get(line[j], 0)
        if depth == 0:
            return line[i + 1:j]
    return ""


def estimated_cycles(text: str) -> CycleCount:
    """Sum of the ``estimated_cycles`` XLA's TPU backend writes into each fusion's and op's
    backend config, times how often it runs. Pallas kernels (Mosaic custom calls) carry no cycle
    estimate; they are returned with their declared ``pl.CostEstimate`` (if any) and operand
    shapes for the caller to cost."""
    cycles = count = 0
    kernels = []
    for _, m, line, runs in _walk(text):
        found = _CYCLES.search(line)
        if found:
            cycles += int(found.group(1)) * runs
            count += 1
        elif m.group(3) == "custom-call" and "tpu_custom_call" in line:
            cost = _KERNEL_COST.search(line)
            declared = None
            if cost:
                fields = re.findall(r'"(\w+)":"?([0-9.e+]+)"?', cost.group(1))
                declared = {k: float(v) for k, v in fields}
            operands = shape_dims(_braced(line, "operand_layout_constraints="))
            kernels.append(KernelCall(m.group(1), runs, declared, operands,
                                      shape_dims(m.group(2))))
    return CycleCount(cycles, count, kernels)


__all__ = ["COLLECTIVES", "Collective", "CycleCount", "KernelCall", "collectives",
           "dtype_bytes", "estimated_cycles", "gathered_whole", "shape_bytes", "summarize"]
