"""Compile a run's programs for a slice and read what the compiler says about them.

    target = make_target(cfg, "v5p-128")              # the trainer's mesh on compile-only devices
    report = plan(cfg, "v5p-128", what="train")       # a JSON-able dict (see ``compile_program``)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp

from diffujax.attention import resolve_backend
from diffujax.attention.pattern import AttentionPattern
from diffujax.models import lora, param_specs
from diffujax.parallel.mesh import Layout, make_layout
from diffujax.parallel.topology import GIB, SliceSpec, parse_slice, slice_devices
from diffujax.plan import comms, hlo
from diffujax.plan.estimate import (estimate_decode, estimate_decode_step, estimate_step,
                                    kernel_summary)
from diffujax.plan.programs import bytes_per_device, plan_model_config, programs_for
from diffujax.runs.flops import peak_flops_per_device
from diffujax.train.state import model_flops_per_token
from diffujax.train.step import training_dropout


@dataclasses.dataclass
class Target:
    """Where a plan compiles for: the slice(s) and the layout (their mesh, the logical rules)."""

    slice: SliceSpec
    num_slices: int
    layout: Layout

    def __post_init__(self):
        self.mesh: jax.sharding.Mesh = self.layout.mesh
        self.num_devices: int = self.mesh.devices.size
        self.device_kind: str = self.mesh.devices.flat[0].device_kind


def make_target(cfg, topology: str, num_slices: int | None = None) -> Target:
    """The trainer's mesh (``mesh.shape``; with ``mesh.num_slices`` or ``num_slices`` > 1 the
    hybrid DCN mesh, ``data`` across slices) over compile-only devices of ``topology``."""
    spec = parse_slice(topology)
    slices = cfg.mesh.num_slices if num_slices is None else num_slices
    mesh_cfg = dataclasses.replace(cfg.mesh, num_slices=slices)
    return Target(spec, slices, make_layout(mesh_cfg, slice_devices(spec, slices)))


# ------------------------------------------------------------------------------ one program


def compile_program(program, target: Target, model_cfg) -> dict:
    """Compile one program; report its memory, collectives and the compiler's cycle estimates.
    A program the TPU compiler refuses for lack of HBM is reported as not fitting, with the
    compiler's own numbers (it stops at the first buffer set that does not fit)."""
    groups = {name: bytes_per_device(tree) for name, tree in program.inputs.items()
              if tree is not None}
    hbm = target.slice.hbm_bytes
    out = dict(name=program.name, description=program.description, rows=program.rows,
               attention=attention_backend(model_cfg, program, target))
    out.update({name: dict(plan) for name, plan in (("decode", program.decode),
                                                     ("decode_step", program.decode_step)) if plan})
    if program.matmul_flops:
        out["matmul_flops"] = program.matmul_flops()
    t0 = time.perf_counter()
    try:
        with _no_persistent_cache():
            compiled = program.lower().compile()
    except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory verdict is handled
        needed = out_of_memory(e)
        if needed is None:
            raise
        out["compile_seconds"] = round(time.perf_counter() - t0, 2)
        temps, usable = needed
        out["memory"] = dict(groups, temporaries=temps, total=sum(groups.values()) + temps,
                             hbm=hbm, hbm_usable=usable, fits=False,
                             compiler=str(e).strip().splitlines()[0][:400])
        return out
    out["compile_seconds"] = round(time.perf_counter() - t0, 2)
    mem = compiled.memory_analysis()
    args, temps = mem.argument_size_in_bytes, mem.temp_size_in_bytes
    outputs = mem.output_size_in_bytes - mem.alias_size_in_bytes  # donated state is reused
    code = mem.generated_code_size_in_bytes
    total = args + outputs + temps + code
    # XLA's argument size minus the logical bytes above: tile padding of small arrays, counters.
    padding = max(0, args - sum(groups.values()))
    out["memory"] = dict(groups, input_padding=padding, outputs=outputs, temporaries=temps,
                         code=code, total=total, hbm=hbm, fits=total <= hbm)
    text = compiled.as_text()
    # The cached decoder's loop stops on data: count the passes its deterministic plan makes.
    trips = program.decode["loop_passes"] if program.decode else None
    items = hlo.collectives(text, trips)
    specs = param_specs(model_cfg)
    shapes = {path: spec.shape for path, spec in specs.items()}
    # Weights the mesh shards (a replicated one, such as a bias, is rightly all-reduced), per layer.
    sharded = {jax.tree_util.keystr(path, simple=True, separator="/")
               for group in ("params", "frozen")
               for path, leaf in jax.tree_util.tree_flatten_with_path(program.inputs.get(group))[0]
               if leaf.sharding is not None and leaf.sharding.shard_shape(leaf.shape) != leaf.shape}
    layer_shapes = {path: spec.shape[1:] if spec.axes[:1] == ("layers",) else spec.shape
                    for path, spec in specs.items() if path in sharded}
    counts = hlo.estimated_cycles(text, trips, model_cfg.vocab_size or None)
    out.update(collectives=hlo.summarize(items), gathered_whole=hlo.gathered_whole(items, shapes),
               all_reduced_whole=hlo.all_reduced_whole(items, layer_shapes),
               communication=comms.charge(items, list(target.mesh.devices.flat), target.slice),
               kernel_calls=len(counts.kernels),
               compiler_cycles=dict(cycles=counts.cycles, instructions=counts.instructions,
                                    kernels=[kernel_summary(k) for k in counts.kernels],
                                    by_category=counts.by_category))
    return out


@contextlib.contextmanager
def _no_persistent_cache():
    """Compile-only TPU executables cannot be read back from JAX's persistent compilation cache
    (there is no TPU client to load them): do not write them there."""
    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    try:
        yield
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def out_of_memory(error) -> tuple[int, int] | None:
    """``(required temporaries, available HBM)`` in bytes from the TPU compiler's
    RESOURCE_EXHAUSTED message (``(0, 0)`` if it gives no sizes), or None for any other error."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text or "memory" not in text.lower():
        return None
    sizes = [float(v) * _UNITS[u] for v, u in re.findall(r"\((\d+(?:\.\d+)?)([KMGT]?)i?B?\)",
                                                          text)]
    return (int(sizes[0]), int(sizes[1])) if len(sizes) >= 2 else (0, 0)


def attention_backend(model_cfg, program, target: Target) -> dict:
    """``{pattern kind: backend}`` of the program's attention layers, as ``attention()`` resolves
    it for these shapes under the target's mesh. The cached decoder's attention against its KV
    cache is plain XLA (``attention.reference.masked_attention``, from ``models/cache.py``)."""
    if program.pattern == "cached":
        return {"cached": "xla"}
    dtype = jnp.dtype(model_cfg.dtype)
    length = next(iter(program.inputs["batch"].values())).shape[1]
    q = jax.ShapeDtypeStruct((1, length, model_cfg.num_heads, model_cfg.head_dim), dtype)
    k = jax.ShapeDtypeStruct((1, length, model_cfg.num_kv_heads, model_cfg.head_dim), dtype)
    with jax.set_mesh(target.mesh):
        chosen = resolve_backend(q, k, AttentionPattern(program.pattern), model_cfg.attention)
    return {program.pattern: chosen}


# ------------------------------------------------------------------------------ the plan


def plan(cfg, topology: str, *, num_slices: int | None = None, what: str = "train",
         model_cfg=None, log=None, batch: int | None = None, context: int | None = None
         ) -> dict:
    """Compile ``what`` (train | eval | generate | decode) for the slice and return the report;
    ``batch`` and ``context``: the rows and KV-cache positions of ``decode``'s pass
    (``programs.programs_for``)."""
    log = log or (lambda msg: None)
    source = "given"
    if model_cfg is None:
        model_cfg, source = plan_model_config(cfg)
    target = make_target(cfg, topology, num_slices)
    peak = peak_flops_per_device(target.device_kind)
    accum = cfg.optimizer.grad_accum_steps
    report = dict(
        config=dict(seq_len=cfg.data.seq_len, global_batch=cfg.data.global_batch,
                    grad_accum_steps=accum, micro_batch=cfg.data.global_batch // accum,
                    remat=model_cfg.remat, scan_layers=model_cfg.scan_layers,
                    loss_chunk=cfg.model.loss_chunk,
                    dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype,
                    dropout=training_dropout(cfg, model_cfg) if what == "train" else False),
        model=dict(family=model_cfg.family, source=source, layers=model_cfg.num_layers,
                   hidden=model_cfg.hidden_size, heads=model_cfg.num_heads,
                   kv_heads=model_cfg.num_kv_heads, vocab=model_cfg.vocab_size,
                   params=int(sum(math.prod(s.shape) for s in param_specs(model_cfg).values()))),
        target=dict(topology=target.slice.name, libtpu_topology=target.slice.topology,
                    num_slices=target.num_slices, devices=target.num_devices,
                    device_kind=target.device_kind,
                    hbm_per_chip_gib=round(target.slice.hbm_bytes / GIB, 2),
                    peak_flops_per_chip=peak,
                    mesh=dict(zip(target.mesh.axis_names, map(int, target.mesh.axis_sizes)))),
        programs=[])
    spec = cfg.lora_spec(model_cfg)
    if spec is not None and what != "decode":  # a LoRA run trains (and its optimizer holds)
        adapters = lora.adapter_shapes(model_cfg, spec)  # only these; the base is "frozen"
        report["lora"] = dict(rank=spec.rank, alpha=spec.alpha, targets=list(spec.targets),
                              adapter_params=int(sum(math.prod(shape)
                                                     for shape, _ in adapters.values())))
    for program in programs_for(what, cfg, model_cfg, target.layout, batch=batch,
                                context=context):
        log(f"compiling {program.name} ({program.description}) for {target.slice.name} ...")
        report["programs"].append(compile_program(program, target, model_cfg))
    report["fits"] = all(p["memory"]["fits"] for p in report["programs"])
    if what == "train":
        tokens = cfg.data.global_batch * cfg.data.seq_len
        flops = model_flops_per_token(cfg, model_cfg) * tokens
        report["model_flops_per_step"] = flops
        # The steady state: the full-attention step (the last train program).
        report["estimate"] = estimate_step(report["programs"][-1], target, peak, flops, tokens)
    elif what == "decode":
        report["estimate"] = estimate_decode_step(report["programs"][0], target, peak)
    elif what == "generate" and report["programs"][0].get("decode"):
        # Each decoder's own estimate; the headline is the block decoder's (the first).
        for program in report["programs"]:
            program["estimate"] = estimate_decode(program, target, peak)
        report["estimate"] = report["programs"][0]["estimate"]
    return report

