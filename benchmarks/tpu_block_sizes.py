"""Which Pallas TPU block sizes fit VMEM, per chip: the search behind ``tpu.default_block_sizes``.

    python benchmarks/tpu_block_sizes.py                      # every chip libtpu describes
    python benchmarks/tpu_block_sizes.py --chips v5e --dims 128 --json out.json

Runs on any host with libtpu (``pip install "jax[tpu]"``), no TPU needed: each kernel (forward,
dq, dk/dv) is compiled alone by the real TPU compiler for one chip of a topology description
(``jax.experimental.topologies``), bf16, 8 query heads on 2 K/V heads, for the most
VMEM-hungry variant (annealed pattern with segment ids: hash temporaries plus the segment
blocks), so what fits here fits every pattern. Mosaic's verdict is the measurement: a block pair
fits when the kernel compiles within the default scoped-VMEM limit; otherwise the compiler says
how much it needed (``CompileTimeScopedVmemOom``), reported as ``needs X of Y MiB``.

Candidates are tried largest first (area, then block_q) and the search of a kernel stops at the
first that compiles (VMEM use grows with the blocks, so the smaller ones fit too), first at
L = 2048, then at L = 8192 from that pick down (VMEM use also grows a little with L: Mosaic's
register allocation, e.g. v5p's forward at head_dim 128 fits 2048x1024 at L = 2048 but not at
8192). The pick per chip is the largest forward pair and the largest backward pair (dq and dk/dv
share their blocks) that fit for every head_dim and L searched (64 and 128 ship: GPT-2, LLaMA).

"Largest that compiles" is the criterion here, not speed: time them on a chip with
``benchmarks/attention.py`` before trusting them for speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from diffujax.attention import tpu  # noqa: E402

# chip -> (topology name, chip config); v6e only where this libtpu describes it.
CHIPS = {"v4": ("v4:2x2x1", "megacore"), "v5e": ("v5e:2x2", "default"),
         "v5p": ("v5p:2x2x1", "megacore"), "v6e": ("v6e:2x2", "default")}
DEVICE_KINDS = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}
CANDIDATES = [(2048, 2048), (2048, 1024), (1024, 2048), (1024, 1024), (1024, 512), (512, 1024),
              (512, 512), (512, 256), (256, 512), (256, 256), (128, 128)]
KERNELS = ("fwd", "dq", "dkv")
HEADS, KV_HEADS, BATCH = 8, 2, 1
LENGTHS = (2048, 8192)
# The two ways Mosaic / XLA:TPU word a VMEM overflow.
_OOM = re.compile(r"size ([\d.]+)([KMG]) and limit ([\d.]+)([KMG])|"
                  r"Used ([\d.]+)([KMG]) of ([\d.]+)([KMG]) vmem")


def _device(chip: str):
    name, config = CHIPS[chip]
    topo = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                        chip_config_name=config, chips_per_host_bounds=(2, 2, 1))
    return topo.devices[0]


def _compile(device, kernel: str, length: int, dim: int, blocks: tuple[int, int]):
    """Compile one kernel; returns ``(ok, info)``."""
    bq, bkv = blocks
    sizes = (tpu.BlockSizes(bq, bkv) if kernel == "fwd" else
             tpu.BlockSizes(512, 512, block_q_bwd=bq, block_kv_bwd=bkv))
    cfg = tpu.kernel_config("annealed", True, length, dim, HEADS // KV_HEADS, sizes)
    mesh = Mesh(np.array([device]), ("x",))
    sds = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=NamedSharding(mesh, P()))
    q, kv = sds((BATCH, HEADS, length, dim)), sds((BATCH, KV_HEADS, length, dim))
    row = sds((BATCH, HEADS, 1, length), jnp.float32)
    scalars, seg = sds((3,), jnp.int32), sds((BATCH, length), jnp.int32)
    if kernel == "fwd":
        fn, args = (lambda *a: tpu._forward(cfg, *a)), (scalars, q, kv, kv, seg)
    else:
        step = tpu._dq if kernel == "dq" else tpu._dkv
        fn, args = (lambda *a: step(cfg, *a)), (scalars, q, kv, kv, q, row, row, seg)
    start = time.perf_counter()
    try:
        compiled = jax.jit(fn).lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - the compiler's verdict is the result
        text = str(e)
        if os.environ.get("BLOCKS_DEBUG"):
            print(text[:3000])
        m = _OOM.search(text)
        if "Vmem" not in text and "vmem" not in text:
            return False, dict(error=text.splitlines()[0][:120], seconds=time.perf_counter() - start)
        unit = {"K": 2**-10, "M": 1.0, "G": 2**10}
        g = [x for x in m.groups() if x is not None] if m else None
        need = float(g[0]) * unit[g[1]] if g else None
        limit = float(g[2]) * unit[g[3]] if g else None
        return False, dict(vmem_need_mib=need, vmem_limit_mib=limit,
                           seconds=time.perf_counter() - start)
    mem = compiled.memory_analysis()
    return True, dict(code_kib=mem.generated_code_size_in_bytes / 2**10,
                      seconds=time.perf_counter() - start)


def search(chip: str, dims, candidates=CANDIDATES, lengths=LENGTHS, log=print) -> dict:
    """Per kernel and head_dim: the largest candidate that compiles at the first length, then
    at each longer length the largest from there down (a longer grid never needs less VMEM)."""
    device = _device(chip)
    rows, best = [], {}
    for dim in dims:
        for kernel in KERNELS:
            start = 0
            for length in lengths:
                for index in range(start, len(candidates)):
                    blocks = candidates[index]
                    ok, info = _compile(device, kernel, length, dim, blocks)
                    rows.append(dict(chip=chip, kernel=kernel, head_dim=dim, L=length,
                                     block_q=blocks[0], block_kv=blocks[1], fits=ok, **info))
                    log(_row_text(rows[-1]))
                    if ok:
                        best[(kernel, dim, length)] = blocks
                        start = index
                        break
    pick = lambda kernels: _common([best.get((k, d, n)) for k in kernels for d in dims  # noqa
                                    for n in lengths])
    return dict(chip=chip, device_kind=DEVICE_KINDS[chip], forward=pick(("fwd",)),
                backward=pick(("dq", "dkv")), rows=rows)


def _common(picks):
    """The largest candidate no larger (in the candidate order) than every per-case pick."""
    if any(p is None for p in picks):
        return CANDIDATES[-1]
    return CANDIDATES[max(CANDIDATES.index(p) for p in picks)]


def _row_text(r) -> str:
    verdict = ("fits" if r["fits"] else
               f"needs {r['vmem_need_mib']:.1f} of {r['vmem_limit_mib']:.1f} MiB"
               if r.get("vmem_need_mib") else f"fails: {r.get('error', 'vmem')}")
    extra = f"code {r['code_kib']:.0f} KiB" if r["fits"] else ""
    return (f"{r['chip']:<5}{r['kernel']:<5}{r['head_dim']:>4}{r['L']:>6}"
            f"{r['block_q']:>6}x{r['block_kv']:<6}{verdict:<26}{extra:<16}{r['seconds']:>6.1f}s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chips", nargs="+", default=list(CHIPS), choices=list(CHIPS))
    p.add_argument("--dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS),
                   help="sequence lengths, shortest first")
    p.add_argument("--candidates", help="comma-separated QxKV pairs, largest first (default: "
                   + ",".join(f"{q}x{k}" for q, k in CANDIDATES) + ")")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    candidates = CANDIDATES
    if args.candidates:
        candidates = [tuple(int(x) for x in pair.split("x")) for pair in args.candidates.split(",")]
        unknown = [c for c in candidates if c not in CANDIDATES]
        if unknown:
            p.error(f"--candidates {unknown} are not among {CANDIDATES}")
    print(f"jax {jax.__version__}; bf16, {HEADS} heads / {KV_HEADS} K/V heads, annealed + "
          f"segment ids; L = {', '.join(map(str, args.lengths))}")
    print(f"{'chip':<5}{'kern':<5}{'D':>4}{'L':>6}{'blocks':>13} {'VMEM verdict':<26}"
          f"{'compiled':<16}{'time':>7}")
    results = []
    for chip in args.chips:
        try:
            results.append(search(chip, args.dims, candidates, args.lengths,
                                  log=lambda s: print(s, flush=True)))
        except Exception as e:  # noqa: BLE001 - a chip this libtpu does not describe
            print(f"{chip}: not available here ({type(e).__name__}: {str(e)[:100]})")
    print("\npick (largest that compiles for every head_dim and L; forward / backward blocks):")
    for r in results:
        print(f"  {r['chip']:<4} ({r['device_kind']}): forward {r['forward'][0]}x{r['forward'][1]},"
              f" backward {r['backward'][0]}x{r['backward'][1]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
