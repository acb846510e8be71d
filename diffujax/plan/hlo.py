"""Reading an optimized TPU HLO module's text: collectives, and the compiler's cycle estimates.

XLA's text names every instruction's result shape (``bf16[1,64,2,16]{...}``), so the bytes a
collective produces per device can be read off it, and the TPU backend writes its own cost model's
``estimated_cycles`` into the backend config of each fusion and op. What runs inside a ``while``
body (the layer scan, gradient accumulation, XLA's own windowed-einsum loops) runs once per trip:
the trip count is the constant the loop condition compares the counter with, and nested loops
multiply. A loop whose condition is anything else stops on data (the cached decoder's loop over
denoising and commit passes): the caller says how many trips to count for it (``open_trips``).
(``compiled.cost_analysis()`` counts each loop body once, which is why it is not used.)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re

import numpy as np

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
_XPROF = re.compile(r'"xprof_metadata":"((?:[^"\\]|\\.)*)"')
_KERNEL_COST = re.compile(r'"cost_estimate":\{([^}]*)\}')


def shape_dims(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """The arrays of a result-shape string (a tuple gives several): ``[(dtype, dims), ...]``."""
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(text)]


def array_bytes(array: tuple[str, tuple[int, ...]]) -> float:
    """The bytes of one ``(dtype, dims)`` array (``shape_dims``)."""
    dtype, dims = array
    return _BYTES[dtype] * math.prod(dims)


def shape_bytes(text: str) -> int:
    return int(sum(map(array_bytes, shape_dims(text))))


# ------------------------------------------------------------------------------ control flow


def _computations(text: str) -> tuple[dict[str, list[str]], str | None]:
    """Computations by name, each a list of its instructions, one joined line per instruction (a
    kernel's metadata can span several text lines; only a lone ``}`` closes a computation)."""
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = comps.setdefault(m.group(1), [])
                if line.startswith("ENTRY"):
                    entry = m.group(1)
            continue
        if line.strip() == "}":
            current = None
        elif line.startswith((" ", "\t")) or not current:
            current.append(line)
        else:  # the continuation of the instruction above
            current[-1] += " " + line
    return comps, entry


def _trip_count(condition: list[str] | None, open_trips: int | None = None) -> int:
    """A scan's condition is ``counter < constant(N)``; unknown forms count once, or
    ``open_trips`` times when given and the condition is not that one comparison (a loop that
    stops on data, whose trip count the program text cannot say)."""
    if condition is None:
        return 1
    root = next((line for line in condition if line.lstrip().startswith("ROOT ")), "")
    if open_trips is not None and not (" compare(" in root and "direction=LT" in root):
        return open_trips
    constants = dict(m.groups() for m in map(_CONSTANT.match, condition) if m)
    for line in condition:
        if " compare(" in line and "direction=LT" in line:
            for name, value in constants.items():
                if re.search(rf"%{re.escape(name)}\b", line):
                    return int(value)
    return 1


def _walk(text: str, open_trips: int | None = None):
    """``(computation, instruction match, line, runs)`` for every instruction of the computations
    that run as control flow (the entry, ``while`` bodies and conditions, ``call`` and
    ``conditional`` targets), with how many times it runs per execution of the program (a loop
    that stops on data: ``open_trips`` times, else once). Fused computations are not visited: a
    fusion instruction stands for its whole body."""
    comps, entry = _computations(text)

    def visit(name, runs, depth):
        if depth > 64 or name not in comps:
            return
        for line in comps[name]:
            m = _INSTR.match(line)
            if not m:
                continue
            yield name, m, line, runs
            opcode = m.group(3)
            callees = dict(_CALLEES.findall(line))
            if opcode == "while":
                trips = _trip_count(comps.get(callees.get("condition", "")), open_trips)
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
    groups: list = dataclasses.field(default_factory=list)  # device ids (program order) per group
    full_bytes: int = 0  # the buffer a ring moves (n-1)/n of: gathered / pre-reduction size
    form: str = "sync"  # "sync", "async" (start/done pair) or "fusion" (a collective fusion)
    overlap_cycles: int = 0  # compiler-estimated compute cycles it can overlap with, per run
    network: str = "ici"  # "dcn": a transfer between slices by the megascale runtime

    @property
    def group_size(self) -> int:
        return max((len(g) for g in self.groups), default=1)


_GROUPS = re.compile(r"replica_groups=(\{\{[0-9,{} ]*\}\}|\{\}|\[[0-9,]+\]<=\[[0-9,]+\]"
                     r"(?:T\([0-9,]+\))?|mesh\[[^\]]*\] \{[^}]*\})")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_CHANNEL = re.compile(r"channel_id=(\d+)")
_MESH_AXIS = re.compile(r"'([^']+)'=(\d+)")


def replica_groups(line: str) -> list[list[int]]:
    """The device groups of a collective instruction, in the program's device order (its device
    assignment: the mesh's devices, flattened). Three spellings: explicit ``{{0,1},{2,3}}``, iota
    ``[2,4]<=[4,2]T(1,0)`` (iota over the second shape, transposed, reshaped to the first: one
    group per row), and ``mesh['a'=4,'b'=2] {'a'}`` (devices in a row-major mesh, one group per
    position along the axes not named). ``collective-permute`` gives its source-target pairs.
    An empty or absent list means one group of every device: ``[]`` is returned."""
    pairs = _PAIRS.search(line)
    if pairs:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", pairs.group(1))]
    m = _GROUPS.search(line)
    if not m or m.group(1) == "{}":
        return []
    text = m.group(1)
    if text.startswith("{{"):
        return [[int(x) for x in g.split(",") if x.strip()]
                for g in re.findall(r"\{([0-9, ]*)\}", text[1:-1])]
    if text.startswith("["):
        shape, source, perm = ([int(d) for d in g.split(",")] if g else None for g in re.fullmatch(
            r"\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", text).groups())
        ids = np.arange(math.prod(source)).reshape(source).transpose(perm or range(len(source)))
        return ids.reshape(shape).tolist()
    names, sizes = zip(*((a, int(n)) for a, n in _MESH_AXIS.findall(text.split("]")[0])))
    inner = [names.index(a) for a in re.findall(r"'([^']+)'", text.split("]", 1)[1])]
    outer = [i for i in range(len(names)) if i not in inner]
    ids = np.arange(math.prod(sizes)).reshape(sizes).transpose(outer + inner)
    return ids.reshape(-1, math.prod(sizes[i] for i in inner)).tolist()


def _collective(kind, name, comp, result, line, runs, form, overlap=0) -> Collective:
    groups = replica_groups(line)
    item = Collective(kind, name, comp, result, shape_bytes(result), runs, groups, form=form,
                      overlap_cycles=overlap)
    n = item.group_size
    item.full_bytes = item.bytes * n if kind == "reduce-scatter" else item.bytes
    return item


def _calls(line: str) -> str | None:
    """The computation a ``fusion`` / ``call`` / ``async-start`` instruction calls."""
    return dict(_CALLEES.findall(line)).get("calls")


def _fused(comps, name, depth=0):
    """``(instruction match, line)`` of every instruction of a fused computation, the nested
    fusions' included."""
    if name not in comps or depth > 8:
        return
    for line in comps[name]:
        m = _INSTR.match(line)
        if m:
            yield m, line
            if m.group(3) == "fusion":
                yield from _fused(comps, _calls(line), depth + 1)


def _fused_collectives(comps, name) -> list[tuple[str, str, str, str]]:
    """``[(kind, name, result, line), ...]``: the collectives inside a fused computation."""
    return [(m.group(3), m.group(1), m.group(2), line) for m, line in _fused(comps, name)
            if m.group(3) in COLLECTIVES]


def collectives(text: str, open_trips: int | None = None) -> list[Collective]:
    """Every collective of an optimized HLO module, with its replica groups and whether the
    compiled schedule lets it overlap compute:

    - a plain collective instruction runs synchronously (``form="sync"``);
    - an asynchronous ``-start`` / ``-done`` pair is counted once, at its ``-done`` (whose result
      is the collective's output), with the compiler-estimated cycles of the instructions
      scheduled between the two (``form="async"``; a scheduled module's text is in schedule
      order);
    - collectives inside fusions (XLA's TPU collective fusions) are counted once per channel: an
      async collective fusion splits one gather into a start fusion, continuation fusions that
      also compute (the next layer's weights arrive while a matmul runs) and a done fusion, all
      with the same ``channel_id``. The chain overlaps the cycles of everything scheduled from its
      first piece to its last (``form="fusion"``); a lone fusion that only communicates is
      synchronous. A fused all-reduce whose fusion returns a slice of it (``all-reduce-scatter``)
      is a reduce-scatter;
    - across slices, a megascale ``send`` (``_xla_megascale_transfer_type``) is the device's
      share of a collective over the data-center network (``network="dcn"``, synchronous).

    ``open_trips``: the trips to count for a loop that stops on data (``_walk``).
    """
    comps, _ = _computations(text)
    out, pending = [], {}  # pending: start name -> [computation, cycles since the start, ...]
    cum = collections.Counter()  # computation -> estimated cycles scheduled so far
    chains = {}  # (computation, channel) -> [Collective, cycles before its first piece]
    for comp, m, line, runs in _walk(text, open_trips):
        name, result, opcode = m.group(1), m.group(2), m.group(3)
        found = _CYCLES.search(line)
        cycles = int(found.group(1)) if found else 0
        for entry in pending.values():
            if entry[0] == comp:
                entry[1] += cycles
        before = cum[comp]
        cum[comp] += cycles
        if opcode.endswith("-start"):
            pending[name] = [comp, 0, line]
            continue
        if opcode.endswith("-done"):
            operand = re.search(r"%([^\s,()]+)", m.group(4))  # the -start it waits for
            start = pending.pop(operand.group(1), None) if operand else None
            kind, start_line = opcode[:-5], (start[2] if start else line)
            if kind == "async" and start:  # a generic async wrapper: look at what it calls
                inner = _fused_collectives(comps, _calls(start_line))
                if inner:
                    kind, _, _, start_line = inner[0]
            if kind in COLLECTIVES:
                out.append(_collective(kind, name, comp, result, start_line, runs, "async",
                                       start[1] - cycles if start else 0))
            continue
        if opcode in COLLECTIVES:
            out.append(_collective(opcode, name, comp, result, line, runs, "sync"))
        elif opcode == "send" and _MEGASCALE.search(line):
            # Across slices XLA sends each device's share to the megascale runtime, which
            # reduces / gathers it over the data-center network (the peers are the other slices).
            kind = _MEGASCALE.search(line).group(1).lower().replace("_", "-")
            kind = kind if kind in COLLECTIVES else "collective-permute"
            size = int(sum(map(array_bytes, shape_dims(result)[:1])))
            out.append(Collective(kind, name, comp, result, size, runs, [], size,
                                  network="dcn"))
        elif opcode == "fusion":
            inner = _fused_collectives(comps, _calls(line))
            for kind, inner_name, inner_result, inner_line in inner:
                channel = _CHANNEL.search(inner_line)
                key = (comp, channel.group(1) if channel else f"{name}/{inner_name}")
                if key in chains:  # a later piece of a chain: it overlaps all in between
                    item, first = chains[key]
                    item.overlap_cycles = cum[comp] - first
                    item.form = "fusion" if item.overlap_cycles else "sync"
                    continue
                item = _collective(kind, name, comp, inner_result, inner_line, runs,
                                   "fusion" if cycles else "sync", cycles)
                if kind == "all-reduce" and shape_bytes(result) < item.bytes:
                    # all-reduce + slice in one fusion: XLA's TPU reduce-scatter
                    item.kind, item.bytes = "reduce-scatter", item.bytes // item.group_size
                chains[key] = [item, before]
                out.append(item)
    return out


def summarize(items: list[Collective]) -> dict[str, dict[str, int]]:
    """``{kind: {"ops", "bytes", "executions", "bytes_per_step"}}``, bytes per device: ``bytes``
    counts each op once, ``bytes_per_step`` every execution (one run of the program)."""
    out = collections.defaultdict(collections.Counter)
    for c in items:
        out[c.kind].update(ops=1, bytes=c.bytes, executions=c.runs, bytes_per_step=c.bytes * c.runs)
    return {kind: dict(s) for kind, s in sorted(out.items())}


def _named_by_shape(items, kind: str, shapes: dict, key=tuple) -> list[str]:
    """Names in ``shapes`` whose ``key(shape)`` is that of a result of some ``kind`` collective."""
    by_shape = collections.defaultdict(list)
    for name, shape in shapes.items():
        by_shape[key(shape)].append(name)
    hits = []
    for c in items:
        for _, dims in shape_dims(c.result) if c.kind == kind else ():
            hits += [name for name in by_shape.get(key(dims), ()) if name not in hits]
    return hits


def gathered_whole(items: list[Collective], full_shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Names of parameters some all-gather materialises whole on every device (its result has the
    parameter's full shape): large ones cost their full size in HBM and ICI bandwidth."""
    return _named_by_shape(items, "all-gather", full_shapes)


def all_reduced_whole(items: list[Collective], layer_shapes: dict[str, tuple[int, ...]]
                      ) -> list[str]:
    """Names of weight matrices some all-reduce sums whole (its result, size-1 axes aside, is one
    layer's full matrix): a gradient reduced everywhere instead of reduce-scattered, or a weight
    gathered as a zero-filled buffer summed across devices; either moves about twice the bytes
    FSDP needs. ``layer_shapes``: each weight's shape without its stacked ``layers`` axis."""
    squeeze = lambda dims: tuple(d for d in dims if d != 1)  # noqa: E731
    matrices = {name: shape for name, shape in layer_shapes.items() if len(squeeze(shape)) >= 2}
    return _named_by_shape(items, "all-reduce", matrices, squeeze)


# ------------------------------------------------------------------------------ cycles


@dataclasses.dataclass
class KernelCall:
    """One Mosaic custom call (a Pallas kernel) and what the HLO says about its cost."""

    name: str  # instruction name, e.g. "splash_mha_fwd_residuals.1"
    runs: int
    declared: dict | None  # its ``pl.CostEstimate`` (flops, bytes_accessed, ...) if it has one
    operands: list  # (dtype, dims) of each operand, from operand_layout_constraints
    results: list  # (dtype, dims) of each result
    metadata: dict | None = None  # the kernel's own ``kernel_metadata`` (splash: its block sizes)


@dataclasses.dataclass
class CycleCount:
    """The TPU compiler's per-instruction estimates, summed over one run of the program."""

    cycles: int  # sum of ``estimated_cycles`` x runs
    instructions: int  # instructions that carry an estimate
    kernels: list  # KernelCall of every Pallas kernel (they carry no cycle estimate)
    by_category: dict  # the cycles split by ``category``, largest first


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


def estimated_cycles(text: str, open_trips: int | None = None, vocab: int | None = None
                     ) -> CycleCount:
    """Sum of the ``estimated_cycles`` XLA's TPU backend writes into each fusion's and op's
    backend config, times how often it runs, and split by ``category`` (``vocab``: the model's
    vocabulary size, for ``vocabulary``). Pallas kernels (Mosaic custom calls) carry no cycle
    estimate; they are returned with their declared ``pl.CostEstimate`` (if any) and operand
    shapes for the caller to cost. ``open_trips``: the trips of a loop that stops on data."""
    comps, _ = _computations(text)
    cycles = count = 0
    kernels, by_category = [], collections.Counter()
    for _, m, line, runs in _walk(text, open_trips):
        found = _CYCLES.search(line)
        if found:
            cycles += int(found.group(1)) * runs
            count += 1
            body = list(_fused(comps, _calls(line))) if m.group(3) == "fusion" else [(m, line)]
            shapes = [array for i, _ in body for array in shape_dims(i.group(2))]
            by_category[category({i.group(3) for i, _ in body}, shapes, vocab)] += (
                int(found.group(1)) * runs)
        elif m.group(3) == "custom-call" and "tpu_custom_call" in line:
            cost = _KERNEL_COST.search(line)  # its pl.CostEstimate, if it declares one
            declared = cost and {k: float(v) for k, v in re.findall(
                r'"(\w+)":"?([0-9.e+]+)"?', cost.group(1))}
            operands = shape_dims(_braced(line, "operand_layout_constraints="))
            metadata = _XPROF.search(line)  # the JSON the kernel writes into kernel_metadata
            try:
                metadata = metadata and json.loads(json.loads(f'"{metadata.group(1)}"'))
            except ValueError:
                metadata = None
            kernels.append(KernelCall(m.group(1), runs, declared, operands,
                                      shape_dims(m.group(2)), metadata))
    return CycleCount(cycles, count, kernels, dict(by_category.most_common()))


# ------------------------------------------------------------------------------ categories

# What the compiler's cycles are spent on, by the ops an instruction (a fusion: its whole body)
# runs (``category``), checked in this order, the first that applies naming it: matmul,
# collective, vocabulary, reduction, data movement, elementwise.
_MOVES = frozenset({"copy", "transpose", "bitcast", "reshape", "slice", "dynamic-slice",
                    "dynamic-update-slice", "concatenate", "pad", "broadcast", "gather",
                    "scatter", "reverse", "copy-start", "copy-done", "parameter", "constant",
                    "tuple", "get-tuple-element", "iota", "bitcast-convert"})


def category(opcodes: set[str], shapes: list, vocab: int | None = None) -> str:
    """The category of an instruction that runs ``opcodes`` and makes arrays of
    ``shapes`` (``shape_dims``; a fusion: its body's, parameters included).
    ``vocabulary``: any non-matmul work on an array with a ``vocab``-long axis (the softmax and
    loss over the logits, their padding to the tile, the embedding table's gradient and update).
    ``data movement``: copies, transposes, pads, slices, broadcasts, and fusions that write into
    a stacked buffer (``dynamic-update-slice``) whatever else they compute on the way."""
    if opcodes & {"convolution", "dot"}:
        # also a collective fusion that multiplies: its transfer is charged by the
        # communication model (``comms.charge``), its cycles are the matmul's
        return "matmul"
    if any(op.removesuffix("-start").removesuffix("-done") in COLLECTIVES for op in opcodes):
        return "collective"
    if vocab and any(vocab in dims for _, dims in shapes):
        return "vocabulary"
    if opcodes & {"reduce", "reduce-window", "sort"}:
        return "reduction"
    if opcodes <= _MOVES or "dynamic-update-slice" in opcodes:
        # the second: a fusion that writes into a stacked buffer (a layer's activations saved
        # for the backward pass, the scan's outputs): it costs the bytes it writes
        return "data movement"
    return "elementwise"
