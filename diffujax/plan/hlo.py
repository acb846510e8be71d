"""Reading an optimized HLO module's text: collectives by kind, with how often each runs.

XLA's text names every instruction's result shape (``bf16[1,64,2,16]{...}``), so the bytes a
collective produces per device can be read off it. Collectives inside a ``while`` body (the layer
scan, gradient accumulation) run once per trip; the trip count of a scan is the constant its loop
condition compares the counter with, and nested loops multiply.
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


def shape_dims(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """The arrays of a result-shape string (a tuple gives several): ``[(dtype, dims), ...]``."""
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(text)]


def shape_bytes(text: str) -> int:
    return int(sum(_BYTES[t] * math.prod(d) for t, d in shape_dims(text)))


@dataclasses.dataclass
class Collective:
    kind: str  # one of COLLECTIVES
    name: str
    computation: str
    result: str  # result shape text
    bytes: int  # result bytes per device (the data each device ends up with)
    runs: int  # executions per program run (loop trip counts multiplied)


@dataclasses.dataclass
class _Computation:
    name: str
    lines: list = dataclasses.field(default_factory=list)


def _computations(text: str) -> tuple[dict[str, _Computation], str | None]:
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = comps.setdefault(m.group(1), _Computation(m.group(1)))
                if line.startswith("ENTRY"):
                    entry = m.group(1)
            continue
        if line.startswith("}"):
            current = None
        else:
            current.lines.append(line)
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


def _multiplicities(comps: dict[str, _Computation], entry: str | None) -> dict[str, int]:
    """How many times each computation runs per execution of the entry computation."""
    calls: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    for comp in comps.values():
        for line in comp.lines:
            callees = dict(_CALLEES.findall(line))
            for key, callee in callees.items():
                trips = 1
                if key == "body":
                    trips = _trip_count(comps.get(callees.get("condition", "")))
                calls[comp.name].append((callee, trips))
            for group in _BRANCHES.findall(line):
                for callee in group.split(","):
                    calls[comp.name].append((callee.strip().lstrip("%"), 1))
    runs: dict[str, int] = collections.Counter()

    def visit(name, count, depth=0):
        if depth > 64 or name not in comps:
            return
        runs[name] += count
        for callee, trips in calls.get(name, ()):
            visit(callee, count * trips, depth + 1)

    if entry is not None:
        visit(entry, 1)
    return runs


def collectives(text: str) -> list[Collective]:
    """Every collective of an optimized HLO module. Asynchronous pairs are counted once, at the
    ``-done`` (whose result is the collective's output)."""
    comps, entry = _computations(text)
    runs = _multiplicities(comps, entry)
    out = []
    for comp in comps.values():
        for line in comp.lines:
            m = _INSTR.match(line)
            if not m:
                continue
            name, result, opcode = m.group(1), m.group(2), m.group(3)
            kind = opcode[:-5] if opcode.endswith("-done") else opcode
            if kind not in COLLECTIVES or opcode.endswith("-start"):
                continue
            out.append(Collective(kind, name, comp.name, result, shape_bytes(result),
                                  max(1, runs.get(comp.name, 1))))
    return out


def summarize(items: list[Collective]) -> dict[str, dict[str, int]]:
    """``{kind: {"ops", "bytes_per_run", "runs", "bytes_per_step"}}`` (bytes per device)."""
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


__all__ = ["COLLECTIVES", "Collective", "collectives", "gathered_whole", "shape_bytes",
           "summarize"]
