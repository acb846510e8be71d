"""Attention backends, forward and forward+backward, per pattern and length.

    python benchmarks/attention.py                       # on a TPU or GPU host
    python benchmarks/attention.py --lengths 1024 8192 --backends pallas_tpu splash xla

Defaults: L in {1024, 2048, 4096, 8192}, 32 heads (MHA; --kv-heads for GQA), head_dim 128, bf16,
``--tokens 16384`` tokens per batch (B = tokens // L), patterns full, causal, annealed at r=0.5.

FLOP count (stated, because conventions differ): full bidirectional attention for every pattern,
forward ``4*B*H*L^2*D`` (QK^T and PV), backward twice that (dQ, dK, dV, dP), so fwd+bwd
``12*B*H*L^2*D``; the recomputed QK^T of flash backward is not counted (model-FLOPs convention,
as in MFU). FlashAttention's papers count the backward as 2.5x (fwd+bwd 3.5x): multiply by 7/6 to
compare. Causal/annealed runs are still charged full FLOPs, so block skipping shows up as a higher
"achieved" rate.

Columns: ``fwd ms`` and ``f+b ms`` (median of --iters timed runs after a warm-up), ``TFLOP/s``
of fwd+bwd, ``/full`` (this pattern's f+b time over full attention's, same backend),
``/xla`` (over the dense-masked XLA reference, same pattern), ``peak MB`` (the compiled f+b
program's temporaries + arguments + outputs from ``memory_analysis()``, where the backend reports
it). XLA at large L needs ``B*H*L^2`` score tensors and may run out of memory: reported as OOM.

On CPU there is no kernel to time: the script runs the XLA reference at small sizes and the Pallas
kernels in interpret mode (a code-path check; those timings mean nothing), and says so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from diffujax.attention import AttentionConfig, attention
from diffujax.attention.pattern import annealed, causal, full


def _pattern(kind: str, ratio: float):
    if kind == "full":
        return full()
    if kind == "causal":
        return causal()
    return annealed(1234, 77, ratio)


def _time(fn, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_mb(fn, args) -> float | None:
    try:
        m = fn.lower(*args).compile().memory_analysis()
        total = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
                 - m.alias_size_in_bytes)
        return total / 2**20
    except Exception:  # backend without memory analysis
        return None


def _supported(backend: str, kind: str, length: int) -> bool:
    if backend == "cudnn":
        return kind != "annealed"
    if backend == "splash":
        return length % 128 == 0  # annealed goes in as a dense [1, L, L] mask
    return True


def run(args) -> list[dict]:
    dtype = jnp.dtype(args.dtype)
    rows = []
    for length in args.lengths:
        batch = max(1, args.tokens // length)
        kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
        q = jax.random.normal(kq, (batch, length, args.heads, args.head_dim), dtype)
        k = jax.random.normal(kk, (batch, length, args.kv_heads, args.head_dim), dtype)
        v = jax.random.normal(kv, (batch, length, args.kv_heads, args.head_dim), dtype)
        flops_fwd = 4 * batch * args.heads * length * length * args.head_dim
        for kind in args.kinds:
            pattern = _pattern(kind, args.ratio)
            for backend in args.backends:
                if not _supported(backend, kind, length):
                    continue
                config = AttentionConfig(backend=backend, interpret=args.interpret)
                fwd = jax.jit(lambda q, k, v, p, c=config: attention(q, k, v, p, c))
                loss = lambda q, k, v, p, c=config: attention(  # noqa: E731
                    q, k, v, p, c).astype(jnp.float32).sum()
                fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
                row = dict(backend=backend, kind=kind, L=length, B=batch)
                try:
                    row["fwd"] = _time(fwd, (q, k, v, pattern), args.iters)
                    row["fb"] = _time(fb, (q, k, v, pattern), args.iters)
                    row["tflops"] = 3 * flops_fwd / row["fb"] / 1e12
                    row["peak"] = _peak_mb(fb, (q, k, v, pattern))
                except Exception as e:  # OOM, or a shape a backend refuses
                    msg = str(e).lower()
                    row["error"] = ("OOM" if "memory" in msg or "resource" in msg
                                    else type(e).__name__)
                rows.append(row)
                _print_row(row, rows)
                sys.stdout.flush()
    return rows


def _ratio(rows, row, **match) -> str:
    for r in rows:
        if all(r[key] == val for key, val in match.items()) and "fb" in r and "fb" in row:
            return f"{row['fb'] / r['fb']:.2f}"
    return "-"


_HEADER = (f"{'backend':<11}{'pattern':<10}{'L':>6}{'B':>4}{'fwd ms':>9}{'f+b ms':>9}"
           f"{'TFLOP/s':>9}{'/full':>7}{'/xla':>7}{'peak MB':>9}")


def _print_row(row, rows):
    if len(rows) == 1:
        print(_HEADER)
    if "error" in row:
        print(f"{row['backend']:<11}{row['kind']:<10}{row['L']:>6}{row['B']:>4}  {row['error']}")
        return
    vs_full = _ratio(rows, row, backend=row["backend"], kind="full", L=row["L"])
    vs_xla = _ratio(rows, row, backend="xla", kind=row["kind"], L=row["L"])
    peak = "-" if row["peak"] is None else f"{row['peak']:.0f}"
    print(f"{row['backend']:<11}{row['kind']:<10}{row['L']:>6}{row['B']:>4}"
          f"{row['fwd'] * 1e3:>9.2f}{row['fb'] * 1e3:>9.2f}{row['tflops']:>9.1f}"
          f"{vs_full:>7}{vs_xla:>7}{peak:>9}")


def main(argv=None):
    platform = jax.default_backend()
    kernels = {"tpu": ["pallas_tpu", "splash"], "gpu": ["cudnn", "pallas_gpu"]}.get(
        platform, ["pallas_tpu", "pallas_gpu"])
    cpu = platform not in ("tpu", "gpu")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+",
                   default=[128, 256] if cpu else [1024, 2048, 4096, 8192])
    p.add_argument("--tokens", type=int, default=256 if cpu else 16384)
    p.add_argument("--heads", type=int, default=2 if cpu else 32)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=64 if cpu else 128)
    p.add_argument("--dtype", default="float32" if cpu else "bfloat16")
    p.add_argument("--kinds", nargs="+", default=["full", "causal", "annealed"])
    p.add_argument("--ratio", type=float, default=0.5, help="annealing ratio r")
    p.add_argument("--backends", nargs="+", default=kernels + ["xla"])
    p.add_argument("--iters", type=int, default=2 if cpu else 10)
    args = p.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    args.interpret = cpu  # Pallas kernels only run in interpret mode on CPU
    # The /full and /xla ratios need those rows first.
    args.kinds = sorted(args.kinds, key=lambda k: k != "full")
    args.backends = sorted(args.backends, key=lambda b: b != "xla")
    print(f"platform {platform}, device {jax.devices()[0].device_kind}, dtype {args.dtype}, "
          f"heads {args.heads}/{args.kv_heads}, head_dim {args.head_dim}, "
          f"annealed r={args.ratio}; FLOPs: fwd+bwd = 12*B*H*L^2*D (full, all patterns)")
    if cpu:
        print("CPU: no attention kernel to time here. The XLA reference runs at small sizes and "
              "the Pallas kernels run in interpret mode only to exercise the code path: these "
              "timings say nothing about TPU/GPU performance.")
    return run(args)


if __name__ == "__main__":
    main()
