"""Training step time: the full-sequence objective against block diffusion (docs/algorithms.md §9).

    python benchmarks/block_train_step.py                                  # CPU defaults
    python benchmarks/block_train_step.py --block-sizes 0,16,64 --complementary --steps 5
    python benchmarks/block_train_step.py --layers 30 --hidden 576 --heads 9 --kv-heads 3 \\
        --intermediate 1536 --vocab 49152                                  # SmolLM2-135M shape

Each variant runs diffujax's real ``make_train_step`` (what ``diffujax train`` runs) on one
device, random weights, a random batch of ``--batch x --seq-len`` tokens: block size 0 is today's
full-sequence recipe, ``N > 0`` the two-stream ``[x_t ; x_0]`` block objective (``2L``
positions per row), ``--complementary`` adds the complementary view (``2B`` rows). Times exclude
compilation and one warm-up step; the variants take turns step by step (a busy machine slows
them alike); reported: the median step time of ``--steps``, tokens per second (``B * L`` training tokens per step) and the time relative to the full-sequence step.
With ``--json`` the last line carries the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from diffujax.attention.pattern import is_annealing
from diffujax.config import from_dict
from diffujax.models import apply_fn_for
from diffujax.parallel.mesh import make_layout
from diffujax.train.state import create_train_state
from diffujax.train.step import make_train_step


def run_config(args, block_size: int, complementary: bool):
    return from_dict({
        "output_dir": "unused",
        "model": {"init": {"family": "llama", "vocab_size": args.vocab,
                           "hidden_size": args.hidden, "num_layers": args.layers,
                           "num_heads": args.heads, "num_kv_heads": args.kv_heads,
                           "intermediate_size": args.intermediate,
                           "max_positions": args.seq_len, "mask_token_id": args.vocab - 1},
                  "dtype": args.dtype, "param_dtype": "float32"},
        "diffusion": {"anneal_steps": 0, "normalization": "tokens", "block_size": block_size,
                      "complementary_mask": complementary},
        "data": {"seq_len": args.seq_len, "global_batch": args.batch},
        "optimizer": {"peak_lr": 1e-4, "schedule": "constant", "clip_norm": 1.0},
        "mesh": {"shape": {"data": 1, "fsdp": 1, "tensor": 1}},
        "train": {"steps": 1000},
    })


def prepare(args, block_size: int, complementary: bool):
    """A compiled and warmed-up train step of one variant: ``() -> seconds of one step``."""
    cfg = run_config(args, block_size, complementary)
    layout = make_layout(cfg.mesh, jax.devices()[:1])
    model_cfg = cfg.resolve_model_config()
    box = {"state": create_train_state(cfg, model_cfg, layout)}
    step = make_train_step(cfg, model_cfg, apply_fn_for(model_cfg), layout)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab - 1, (args.batch, args.seq_len)).astype(np.int32)
    batch = layout.make_global_batch({"tokens": tokens})
    annealing = is_annealing(0, cfg.diffusion.anneal_steps)  # the run's program (no annealing)

    def run() -> float:
        start = time.perf_counter()
        box["state"], metrics = step(box["state"], batch, annealing)
        jax.block_until_ready(metrics)
        return time.perf_counter() - start

    run()  # compile + warm-up
    return run


def time_variants(args, variants) -> list[float]:
    """Median seconds per step of each variant; the variants take turns step by step, so a
    machine whose load changes over the run slows them alike."""
    runs = [prepare(args, block, complementary) for block, complementary in variants]
    times = [[] for _ in runs]
    for _ in range(args.steps):
        for run, seen in zip(runs, times):
            seen.append(run())
    return [statistics.median(t) for t in times]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--block-sizes", default="0,32",
                   help="comma-separated; 0: the full-sequence objective")
    p.add_argument("--complementary", action="store_true",
                   help="also time each block size with complementary masking")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (median)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    variants = [(int(n), False) for n in args.block_sizes.split(",")]
    if args.complementary:
        variants += [(n, True) for n, _ in variants]
    rows = [dict(block_size=block, complementary=complementary, seconds=seconds,
                 tokens_per_s=args.batch * args.seq_len / seconds)
            for (block, complementary), seconds in zip(variants, time_variants(args, variants))]
    base = next((r["seconds"] for r in rows if r["block_size"] == 0 and not r["complementary"]),
                None)
    print(f"{jax.devices()[0].device_kind}: llama {args.layers} x {args.hidden}, vocab"
          f" {args.vocab}, B {args.batch} x L {args.seq_len}, {args.dtype}; median of"
          f" {args.steps} steps")
    print(f"{'objective':<44} {'step s':>8} {'tokens/s':>10} {'x full':>7}")
    for r in rows:
        name = (f"blocks of {r['block_size']} (two-stream)" if r["block_size"] else
                "full sequence")
        name += " + complementary" if r["complementary"] else ""
        ratio = f"{r['seconds'] / base:.2f}" if base else "-"
        r["relative"] = r["seconds"] / base if base else None
        print(f"{name:<44} {r['seconds']:>8.3f} {r['tokens_per_s']:>10.0f} {ratio:>7}")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
