"""Regenerate the README's plan table from ``diffujax plan --json``.

    python tools/plan_table.py                    # plan every row (minutes; the 7B one ~10), print
    python tools/plan_table.py --write README.md  # ... and replace the table between the markers
    python tools/plan_table.py --json-dir DIR     # keep each plan's JSON in DIR; reuse it if there

Each row is a shipped config on a slice (its own ``plan.topology`` unless named), planned
exactly as a user would with ``diffujax plan --config CONFIG --topology SLICE --json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
START, END = "<!-- plan-table:start -->", "<!-- plan-table:end -->"

# (config, slice or None for the config's plan.topology, overrides)
ROWS = (
    ("configs/diffugpt_s.yaml", None, ()),
    ("configs/diffugpt_m.yaml", None, ()),
    ("configs/diffullama_7b.yaml", None, ()),
)


def run_plan(config: str, topology: str | None, overrides, json_dir: pathlib.Path | None) -> dict:
    name = f"{pathlib.Path(config).stem}_{topology or 'default'}.json"
    cached = json_dir / name if json_dir else None
    if cached and cached.exists():
        return json.loads(cached.read_text())
    cmd = [sys.executable, "-m", "diffujax.cli", "plan", "--config", config, "--json",
           *overrides]
    if topology:
        cmd += ["--topology", topology]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if out.returncode not in (0, 1):  # 1: planned, does not fit
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    report = json.loads(out.stdout)
    if cached:
        cached.write_text(json.dumps(report))
    return report


def row(config: str, report: dict) -> str:
    gib = 1024 ** 3
    t, c = report["target"], report["config"]
    worst = max(report["programs"], key=lambda p: p["memory"]["total"])["memory"]
    est = report.get("estimate") or {}
    step = f"{est['step_seconds']:.2f} s" if est.get("step_seconds") else "n/a"
    mfu = f"{100 * est['mfu']:.0f}%" if est.get("mfu") else "n/a"
    kernels = f"{est['kernel_seconds']:.2f} s" if est.get("step_seconds") else "n/a"
    comm = (f"{est['exposed_communication_seconds']:.2f} of"
            f" {est['communication_seconds']:.2f} s" if est.get("step_seconds") else "n/a")
    compile_s = sum(p["compile_seconds"] for p in report["programs"])
    setting = (f"{c['grad_accum_steps']} x {c['micro_batch']}, remat {c['remat']}"
               + (", unrolled" if c.get("scan_layers") is False else ""))
    return (f"| `{pathlib.Path(config).name}` | {t['topology']} ({t['devices']} chips) |"
            f" {setting} | {worst['total'] / gib:.1f} of {worst['hbm'] / gib:.0f} GiB |"
            f" {'yes' if report['fits'] else '**no**'} | {step} | {kernels} | {comm} | {mfu} |"
            f" {compile_s:.0f} s |")


def table(rows) -> str:
    head = ("| config | slice | accumulation x micro-batch | HBM per chip | fits |"
            " est. step time | est. Pallas kernels | est. exposed of all communication |"
            " est. MFU | compile time |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + [row(config, report) for config, report in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", metavar="README", help="replace the table between the markers")
    p.add_argument("--json-dir", type=pathlib.Path, help="keep / reuse each plan's JSON here")
    args = p.parse_args(argv)
    if args.json_dir:
        args.json_dir.mkdir(parents=True, exist_ok=True)
    rows = [(config, run_plan(config, topology, overrides, args.json_dir))
            for config, topology, overrides in ROWS]
    text = table(rows)
    print(text)
    if args.write:
        path = pathlib.Path(args.write)
        readme = path.read_text()
        if START not in readme or END not in readme:
            raise SystemExit(f"{path}: no {START} ... {END} markers to replace")
        before, rest = readme.split(START, 1)
        path.write_text(before + START + "\n" + text + "\n" + END + rest.split(END, 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
