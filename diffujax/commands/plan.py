"""``diffujax plan``: the config and the slice read, libtpu's flags set, then the plan or the
``--fit`` search of ``diffujax/plan/`` printed (its docstring says what the report holds)."""

from __future__ import annotations

import json
import os
import sys

from diffujax.config import load_config
from diffujax.parallel.topology import parse_slice
from diffujax.parallel.tpu_env import set_collective_flags
from diffujax.plan import fit, plan
from diffujax.plan.report import format_fit, format_report


def run_plan(args) -> int:
    if (args.batch is not None or args.context is not None) and args.what != "decode":
        raise ValueError("--batch and --context belong to --what decode")
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
    report = plan(cfg, topology, num_slices=args.num_slices, what=args.what, log=log,
                  batch=args.batch, context=args.context)
    report["config"]["path"] = os.fspath(args.config)
    report["target"]["libtpu_flags"] = flags
    print(json.dumps(report) if args.json else format_report(report))
    return 0 if report["fits"] else 1
