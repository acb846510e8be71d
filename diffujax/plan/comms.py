"""The time a compiled program's collectives take on a slice's interconnect (an estimate).

Each collective (``hlo.collectives``) is charged as a ring over the chips of its replica group,
the algorithm TPU runtimes use on the ICI torus (Google's "How to Scale Your Model", part 3):

- all-gather of a full buffer of ``S`` bytes over ``n`` chips: each chip sends ``S (n-1)/n``;
  reduce-scatter likewise (``S`` is the buffer before the reduction); all-to-all likewise;
- all-reduce: a reduce-scatter then an all-gather, ``2 S (n-1)/n``;
- collective-permute: each chip sends its ``S`` bytes to one neighbour, over one link.

The bandwidth a ring gets is that of the physical dimensions its group spans (read off the
devices' torus coordinates): a dimension the group covers end to end in a torus gives a
bidirectional ring, two links one way each (``2 w``); otherwise (no wraparound, or part of a
dimension) a bidirectional line, which moves half as much (``w``); the spanned dimensions run at
once and add up. A group across slices is reduced hierarchically: within each slice over ICI,
then its ``1/k`` share across the ``m`` slices over the data-center network at the chip's DCN
bandwidth (the TPU compiler writes that second step as megascale send/recv transfers, charged the
same way). Per-hop latency is not charged (it matters only for tiny messages).

A collective is *exposed* (the step waits for it) unless the compiled schedule overlaps it: an
async start/done pair or a collective fusion chain overlaps the compiler-estimated compute cycles
scheduled alongside it, and only the part of its time beyond them is exposed.
"""

from __future__ import annotations

import collections

from diffujax.plan import hlo

# bytes each chip sends, per byte of the full buffer, for a ring of n: (n-1)/n times this
_RING_FACTOR = {"all-gather": 1, "reduce-scatter": 1, "all-to-all": 1, "all-reduce": 2}


def ring_bandwidth(devices, spec) -> float:
    """bytes/s one chip sends around a ring over ``devices`` (one slice) on the slice ``spec``."""
    w = spec.generation.ici_link_bandwidth
    total = 0.0
    for dim, extent in enumerate(spec.layout):
        spanned = len({d.coords[dim] for d in devices})
        if spanned > 1:
            total += 2 * w if spec.torus and spanned == extent and spanned > 2 else w
    return total


def group_seconds(kind: str, full_bytes: float, devices, spec) -> float:
    """Seconds for one collective over ``devices`` (one replica group)."""
    generation = spec.generation
    by_slice = collections.defaultdict(list)
    for d in devices:
        by_slice[getattr(d, "slice_index", 0)].append(d)
    m = len(by_slice)
    if kind == "collective-permute":
        return full_bytes / (generation.dcn_bandwidth if m > 1 else generation.ici_link_bandwidth)
    factor, local = _RING_FACTOR[kind], max(by_slice.values(), key=len)
    k = len(local)
    within = factor * full_bytes * (k - 1) / k / ring_bandwidth(local, spec) if k > 1 else 0.0
    across = factor * (full_bytes / k) * (m - 1) / m / generation.dcn_bandwidth if m > 1 else 0.0
    return within + across  # within each slice over ICI, then its share across the slices


def collective_seconds(item: hlo.Collective, devices, spec) -> float:
    """Seconds for one execution of ``item``: its slowest replica group (``devices`` in the
    program's device order: the mesh's devices, flattened)."""
    if item.network == "dcn":  # the device's share, across the slices of the program
        slices = len({getattr(d, "slice_index", 0) for d in devices})
        rate = spec.generation.dcn_bandwidth
        if item.kind not in _RING_FACTOR or slices < 2:
            return item.full_bytes / rate
        return _RING_FACTOR[item.kind] * item.full_bytes * (slices - 1) / slices / rate
    groups = item.groups or [list(range(len(devices)))]
    unique = {tuple(sorted(group)) for group in groups if len(group) >= 2}
    return max((group_seconds(item.kind, item.full_bytes, [devices[i] for i in members], spec)
                for members in unique), default=0.0)


def charge(items: list[hlo.Collective], devices, spec) -> dict:
    """The program's communication per run: total, exposed and overlapped seconds, by kind and
    by form (sync, async, fusion). Without a clock rate overlap cannot be measured in seconds,
    so everything is counted as exposed."""
    clock = spec.generation.clock_hz
    total = collections.Counter(seconds=0.0, exposed_seconds=0.0)
    by_kind, by_form = collections.defaultdict(collections.Counter), {}
    for item in items:
        once = collective_seconds(item, devices, spec)
        hidden = min(once, item.overlap_cycles / clock) if clock and item.form != "sync" else 0.0
        seconds, exposed = once * item.runs, (once - hidden) * item.runs
        by_kind[item.kind].update(ops=1, executions=item.runs,
                                  bytes_per_step=item.full_bytes * item.runs, seconds=seconds,
                                  exposed_seconds=exposed)
        by_form.setdefault(item.form, collections.Counter()).update(ops=1, seconds=seconds,
                                                                   exposed_seconds=exposed)
        total.update(seconds=seconds, exposed_seconds=exposed)
    return dict(total, overlapped_seconds=total["seconds"] - total["exposed_seconds"],
                by_kind={k: dict(v) for k, v in sorted(by_kind.items())},
                by_form={k: dict(v) for k, v in by_form.items()})
