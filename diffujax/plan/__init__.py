"""``diffujax plan``: compile a run for a Cloud TPU slice on any machine and report what it needs.

    diffujax plan --config configs/diffullama_7b.yaml --topology v5p-128 [--num-slices N]
                  [--what train|eval|generate] [--fit] [--json] [key=value ...]

The programs are compiled by the real TPU compiler (libtpu) for compile-only devices of the named
slice, from abstract inputs that carry the run's shardings (``programs.py``): no weights, no data,
no TPU. The report gives, per program: the mesh; HBM per chip (parameters, optimizer state, batch,
temporaries, total) against the chip's HBM; compile time; the attention backend; the collectives
of the optimized HLO (``hlo.py``) and any parameter gathered whole; and for the train step the
model FLOPs and, from XLA's own cost model, an *estimated* step time and MFU (``estimate.py``).
``--fit`` searches ``optimizer.grad_accum_steps`` (the micro-batch, with the global batch fixed)
and ``model.remat`` for the fastest setting that fits and prints the overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from diffujax.parallel.topology import GIB, parse_slice

WHAT = ("train", "eval", "generate")


@dataclasses.dataclass
class Target:
    """Where a plan compiles for: the slice(s), their mesh and the logical rules."""

    slice: object  # topology.SliceSpec
    num_slices: int
    mesh: object
    rules: tuple

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def device_kind(self) -> str:
        return self.mesh.devices.flat[0].device_kind


def make_target(cfg, topology: str, num_slices: int | None = None) -> Target:
    """The trainer's mesh (``mesh.shape``, ``mesh.num_slices``: the hybrid DCN mesh for several
    slices) over compile-only devices of ``topology``."""
    from diffujax.parallel.mesh import make_mesh
    from diffujax.parallel.topology import slice_devices

    spec = parse_slice(topology)
    slices = cfg.mesh.num_slices if num_slices is None else num_slices
    mesh_cfg = dataclasses.replace(cfg.mesh, num_slices=slices)
    mesh = make_mesh(mesh_cfg, slice_devices(spec, slices))
    return Target(spec, slices, mesh, cfg.mesh.rule_table())


# ------------------------------------------------------------------------------ one program


def compile_program(program, target: Target, model_cfg) -> dict:
    """Compile one program and read its memory, cost and collectives. A program the TPU compiler
    refuses for lack of HBM is reported as not fitting, with the compiler's own numbers."""
    from diffujax.plan import hlo
    from diffujax.plan.programs import bytes_per_device

    groups = {name: bytes_per_device(tree) for name, tree in program.inputs.items()
              if tree is not None}
    hbm = target.slice.hbm_bytes
    out = dict(name=program.name, description=program.description, rows=program.rows,
               attention=attention_backend(model_cfg, program))
    t0 = time.perf_counter()
    try:
        compiled = program.lower().compile()
    except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory verdict is handled
        needed = _out_of_memory(e)
        if needed is None:
            raise
        out["compile_seconds"] = round(time.perf_counter() - t0, 2)
        temps, usable = needed
        total = sum(groups.values()) + temps
        out["memory"] = dict(groups, temporaries=temps, total=total, hbm=hbm,
                             hbm_usable=usable, fits=False,
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
    items = hlo.collectives(text)
    from diffujax.models import param_specs

    shapes = {path: spec.shape for path, spec in param_specs(model_cfg).items()}
    counts = hlo.estimated_cycles(text)
    out.update(collectives=hlo.summarize(items), gathered_whole=hlo.gathered_whole(items, shapes),
               kernel_calls=counts.kernel_calls,
               compiler_cycles=dict(cycles=counts.cycles, instructions=counts.instructions,
                                    kernels=counts.kernels))
    return out


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _out_of_memory(error) -> tuple[int, int] | None:
    """``(required temporaries, available HBM)`` in bytes from the TPU compiler's
    RESOURCE_EXHAUSTED message, or None for any other error."""
    import re

    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text or "memory" not in text.lower():
        return None
    sizes = [float(v) * _UNITS[u] for v, u in re.findall(r"\((\d+(?:\.\d+)?)([KMGT]?)i?B?\)",
                                                          text)]
    if len(sizes) < 2:
        return (0, 0)
    return int(sizes[0]), int(sizes[1])


def attention_backend(model_cfg, program) -> dict:
    """``{pattern kind: backend}`` of the program's attention layers, as ``attention()`` would
    resolve it for these shapes on the target."""
    import jax
    import jax.numpy as jnp

    from diffujax.attention import resolve_backend
    from diffujax.attention.pattern import AttentionPattern

    dtype = jnp.dtype(model_cfg.dtype)
    seq = program.inputs["batch"]
    length = next(iter(seq.values())).shape[1]
    q = jax.ShapeDtypeStruct((1, length, model_cfg.num_heads, model_cfg.head_dim), dtype)
    k = jax.ShapeDtypeStruct((1, length, model_cfg.num_kv_heads, model_cfg.head_dim), dtype)
    pattern = AttentionPattern(program.pattern)
    return {program.pattern: resolve_backend(q, k, pattern, model_cfg.attention_backend)}


# ------------------------------------------------------------------------------ the plan


def plan(cfg, topology: str, *, num_slices: int | None = None, what: str = "train",
         model_cfg=None, log=None) -> dict:
    """Compile ``what`` for the slice and return the report (a JSON-able dict)."""
    from diffujax.plan import estimate as E
    from diffujax.plan.programs import plan_model_config, programs_for
    from diffujax.train import metrics as M

    log = log or (lambda msg: None)
    source = "given"
    if model_cfg is None:
        model_cfg, source = plan_model_config(cfg)
    target = make_target(cfg, topology, num_slices)
    peak = M.peak_flops_per_device(target.device_kind)
    report = dict(
        config=dict(seq_len=cfg.data.seq_len, global_batch=cfg.data.global_batch,
                    grad_accum_steps=cfg.optimizer.grad_accum_steps,
                    micro_batch=cfg.data.global_batch // cfg.optimizer.grad_accum_steps,
                    remat=model_cfg.remat, dtype=model_cfg.dtype,
                    param_dtype=model_cfg.param_dtype),
        model=dict(family=model_cfg.family, source=source, layers=model_cfg.num_layers,
                   hidden=model_cfg.hidden_size, heads=model_cfg.num_heads,
                   kv_heads=model_cfg.num_kv_heads, vocab=model_cfg.vocab_size,
                   params=_param_count(model_cfg)),
        target=dict(topology=target.slice.name, libtpu_topology=target.slice.topology,
                    num_slices=target.num_slices, devices=target.num_devices,
                    device_kind=target.device_kind,
                    hbm_per_chip_gib=round(target.slice.hbm_bytes / GIB, 2),
                    peak_flops_per_chip=peak,
                    mesh=dict(zip(target.mesh.axis_names, map(int, target.mesh.axis_sizes)))),
        programs=[])
    for program in programs_for(what, cfg, model_cfg, target.mesh, target.rules):
        log(f"compiling {program.name} ({program.description}) for {target.slice.name} ...")
        report["programs"].append(compile_program(program, target, model_cfg))
    report["fits"] = all(p["memory"]["fits"] for p in report["programs"])
    if what == "train":
        flops = M.train_flops_per_token(model_cfg, cfg.data.seq_len)
        tokens = cfg.data.global_batch * cfg.data.seq_len
        report["model_flops_per_step"] = flops * tokens
        # The steady state: the full-attention step (the last train program).
        report["estimate"] = E.estimate_step(report["programs"][-1], target, peak,
                                             flops * tokens, tokens)
    return report


def _param_count(model_cfg) -> int:
    import math

    from diffujax.models import param_specs

    return int(sum(math.prod(s.shape) for s in param_specs(model_cfg).values()))


# ------------------------------------------------------------------------------ the CLI


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("example: diffujax plan --config configs/diffugpt_s.yaml --topology v5litepod-8\n"
                "Compiles with the real TPU compiler on this machine (no TPU, no weights, no"
                " data).\nExit status: 0 fits, 1 does not fit, 2 bad input.")
    p.add_argument("--config", metavar="PATH", required=True, help="run config (YAML)")
    p.add_argument("--topology", metavar="SLICE", default=None,
                   help="Cloud TPU slice, e.g. v4-8, v5litepod-16, v5p-128, v6e-8 (default: the"
                        " config's plan.topology)")
    p.add_argument("--num-slices", type=int, default=None,
                   help="slices over DCN (default: mesh.num_slices)")
    p.add_argument("--what", choices=WHAT, default="train",
                   help="the train step (default), the eval step or the sampler")
    p.add_argument("--fit", action="store_true",
                   help="search grad_accum_steps and remat for the fastest setting that fits")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")


def run_plan(args) -> int:
    from diffujax.config import load_config
    from diffujax.plan import report as R

    cfg = load_config(args.config, args.overrides)
    topology = args.topology or cfg.plan.topology
    if not topology:
        raise ValueError("no slice to plan for: pass --topology (e.g. v5p-128) or set"
                         " plan.topology in the config")
    parse_slice(topology)  # a bad name fails before anything is compiled
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.json else None
    if args.fit:
        from diffujax.plan.fit import fit

        result = fit(cfg, topology, num_slices=args.num_slices, log=log)
        print(json.dumps(result) if args.json else R.format_fit(result))
        return 0 if result.get("best") else 1
    report = plan(cfg, topology, num_slices=args.num_slices, what=args.what, log=log)
    report["config"]["path"] = os.fspath(args.config)
    print(json.dumps(report) if args.json else R.format_report(report))
    return 0 if report["fits"] else 1


__all__ = ["Target", "add_plan_args", "compile_program", "make_target", "plan", "run_plan"]
