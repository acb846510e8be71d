"""``diffujax plan``: compile a run for a Cloud TPU slice on any machine and report what it needs.

    diffujax plan --config configs/diffullama_7b.yaml --topology v5p-128 [--num-slices N]
                  [--what train|eval|generate] [--fit] [--json] [key=value ...]

The programs are compiled by the real TPU compiler (libtpu) for compile-only devices of the named
slice, from abstract inputs that carry the run's shardings (``programs.py``): no weights, no data,
no TPU. The report gives, per program: the mesh; HBM per chip (parameters, optimizer state, batch,
temporaries, total) against the chip's HBM; compile time; the attention backend; the collectives
of the optimized HLO (``hlo.py``) and any parameter gathered whole; and for the train step the
model FLOPs and, from XLA's own cost model, an *estimated* step time and MFU (``estimate.py``);
for ``--what generate`` on a block model, the cached block decoder's estimated tokens/s per chip.
``--fit`` searches ``optimizer.grad_accum_steps`` (the micro-batch, with the global batch fixed)
and ``model.remat`` for the fastest setting that fits and prints the overrides.
"""

from __future__ import annotations

import json
import os
import sys

from diffujax.config import load_config
from diffujax.parallel.topology import parse_slice
from diffujax.parallel.tpu_env import set_collective_flags
from diffujax.plan.report import format_fit, format_report
from diffujax.plan.analysis import Target, compile_program, make_target, plan
from diffujax.plan.search import fit

def run_plan(args) -> int:
    cfg = load_config(args.config, args.overrides)
    topology = args.topology or cfg.plan.topology
    if not topology:
        raise ValueError("no slice to plan for: pass --topology (e.g. v5p-128) or set"
                         " plan.topology in the config")
    spec = parse_slice(topology)  # a bad name fails before anything is compiled
    # The run's libtpu flags (as ``diffujax train`` sets them), before libtpu starts here.
    flags = set_collective_flags(spec.generation.libtpu)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.json else None
    if args.fit:
        result = fit(cfg, topology, num_slices=args.num_slices, log=log)
        print(json.dumps(result) if args.json else format_fit(result))
        return 0 if result.get("best") else 1
    report = plan(cfg, topology, num_slices=args.num_slices, what=args.what, log=log)
    report["config"]["path"] = os.fspath(args.config)
    report["target"]["libtpu_flags"] = flags
    print(json.dumps(report) if args.json else format_report(report))
    return 0 if report["fits"] else 1


__all__ = ["Target", "compile_program", "fit", "make_target", "plan",
           "run_plan"]
