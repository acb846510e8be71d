"""Ancestral sampling speed, diffujax vs a plain PyTorch loop on the same weights
(docs/algorithms.md §6).

    python benchmarks/sampling.py --checkpoint CKPT [--hf-dir HF_DIR]
    python benchmarks/sampling.py --hf-dir HF_DIR          # converts in memory, no mask row added

Both sides run the paper's Algorithm 2 on canvases ``[BOS, M, ..., M]`` of ``--length`` tokens
with ``--steps`` steps: every step is one forward pass with full attention, candidates drawn with
temperature 1 for every masked position (shift: position j reads the logits of j - 1), each still
masked position revealed with probability ``1 / (s + 1)``. The torch side is the straightforward
implementation: ``LlamaForCausalLM`` with an all-zero 4D additive mask (full attention), softmax,
``torch.multinomial``. Times exclude compilation (diffujax) and a one-step warm-up (torch).
Reported: generated tokens per second, ``B * (length - 1) / seconds`` (best of ``--repeats``).

Then confidence-threshold decoding (greedy) on the same canvases: forward passes needed per
threshold, next to the ``length - 1`` a one-token-per-pass decoder needs. On a model that was not
adapted to diffusion the confidences are low and most passes commit one token; the counts are
meaningful on a DiffuLLaMA/DiffuGPT-style checkpoint.

Weights: with ``--checkpoint`` the torch model is built from the diffujax parameters
(``diffujax.checkpoint.to_state_dict``), so both sides hold the same weights even when the
conversion added a mask row; without it the diffujax model is converted from ``--hf-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import numpy as np


def load_models(args):
    """(apply_fn, params, torch_model, mask_token_id, bos_token_id) on the same weights."""
    import torch
    import transformers

    from diffujax.checkpoint import from_state_dict, load, to_state_dict
    from diffujax.models import apply_fn_for

    if args.checkpoint:
        config, params = load(args.checkpoint, dtype="float32")
        hf_config = transformers.AutoConfig.for_model(**config.to_hf())
        torch_model = transformers.AutoModelForCausalLM.from_config(hf_config)
        state = {k: torch.from_numpy(np.array(v, np.float32))
                 for k, v in to_state_dict(config, params).items()}
        missing, unexpected = torch_model.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if m != "lm_head.weight"]:
            raise SystemExit(f"weights do not fit: missing {missing}, unexpected {unexpected}")
        if "lm_head.weight" in missing:
            torch_model.tie_weights()
    else:
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir,
                                                                        dtype=torch.float32)
        hf_json = json.loads((pathlib.Path(args.hf_dir) / "config.json").read_text())
        config, params = from_state_dict(hf_json, torch_model.state_dict(), dtype="float32")
    torch_model.eval()
    apply_fn = apply_fn_for(config)
    mask_id = config.mask_token_id if args.mask_token_id is None else args.mask_token_id
    if mask_id is None:
        mask_id = config.vocab_size - 1
    bos_id = config.bos_token_id if config.bos_token_id is not None else 0
    return apply_fn, params, torch_model, int(mask_id), int(bos_id)


def canvases(batch, length, bos_id):
    import jax.numpy as jnp

    tokens = np.zeros((batch, length), np.int32)
    tokens[:, 0] = bos_id
    src = np.zeros((batch, length), bool)
    src[:, 0] = True
    return jnp.asarray(tokens), jnp.asarray(src)


def torch_ancestral(model, batch, length, steps, mask_id, bos_id, seed):
    """Algorithm 2, written the obvious way in torch."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.full((batch, length), mask_id, dtype=torch.long)
    x[:, 0] = bos_id
    masked = torch.ones(batch, length, dtype=torch.bool)
    masked[:, 0] = False
    full_attention = torch.zeros(batch, 1, length, length)
    with torch.no_grad():
        for s in range(steps - 1, -1, -1):
            logits = model(input_ids=x, attention_mask=full_attention).logits.float()
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # pred for j from j - 1
            probs = torch.softmax(logits, dim=-1).view(-1, logits.shape[-1])
            candidates = torch.multinomial(probs, 1, generator=gen).view(batch, length)
            reveal = masked & (torch.rand(batch, length, generator=gen) < 1.0 / (s + 1))
            x = torch.where(reveal, candidates, x)
            masked &= ~reveal
    assert not masked.any()
    return x


def timed(fn, repeats, warm_up):
    warm_up()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="diffujax checkpoint directory (diffujax convert)")
    parser.add_argument("--hf-dir", help="Hugging Face directory (used when no --checkpoint)")
    parser.add_argument("--mask-token-id", type=int, default=None,
                        help="default: the checkpoint's, else the last vocabulary id")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--single-thread", action="store_true",
                        help="one CPU thread for both sides (XLA's Eigen pool and torch): on a"
                             " shared machine this keeps oversubscription from distorting the"
                             " comparison")
    args = parser.parse_args(argv)
    if not (args.checkpoint or args.hf_dir):
        parser.error("give --checkpoint or --hf-dir")
    if args.single_thread:  # before jax starts its thread pool
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false")

    import jax
    import jax.numpy as jnp
    import torch

    if args.single_thread:
        torch.set_num_threads(1)

    from diffujax.diffusion import sample_ancestral, sample_threshold

    apply_fn, params, torch_model, mask_id, bos_id = load_models(args)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); mask id {mask_id}, BOS {bos_id}; "
          f"length {args.length}, {args.steps} steps")
    print(f"{'batch':>5} {'diffujax tok/s':>15} {'torch tok/s':>12} {'ratio':>7}")
    for batch in args.batch_sizes:
        canvas, src = canvases(batch, args.length, bos_id)
        generated = batch * (args.length - 1)

        def run_jax(fixed=src):
            out = sample_ancestral(apply_fn, params, canvas, fixed, jax.random.key(0),
                                   mask_token_id=mask_id, steps=args.steps)
            return jax.block_until_ready(out.tokens)

        # warm-up: an all-fixed canvas compiles the same program and runs no forward pass
        jax_rate = generated / timed(run_jax, args.repeats,
                                     warm_up=lambda: run_jax(jnp.ones_like(src)))
        if args.skip_torch:
            print(f"{batch:>5} {jax_rate:>15.1f} {'-':>12} {'-':>7}")
            continue
        torch_rate = generated / timed(
            lambda: torch_ancestral(torch_model, batch, args.length, args.steps, mask_id, bos_id,
                                    seed=0),
            args.repeats,
            warm_up=lambda: torch_ancestral(torch_model, batch, args.length, 1, mask_id, bos_id,
                                            seed=0))
        print(f"{batch:>5} {jax_rate:>15.1f} {torch_rate:>12.1f} {jax_rate / torch_rate:>6.2f}x")

    batch = args.batch_sizes[-1]
    canvas, src = canvases(batch, args.length, bos_id)
    print(f"\nthreshold decoding (greedy), batch {batch}: forward passes for {args.length - 1} "
          f"tokens (one-per-pass decoding needs {args.length - 1})")
    for threshold in args.thresholds:
        out = sample_threshold(apply_fn, params, canvas, src, jax.random.key(0),
                               mask_token_id=mask_id, threshold=threshold)
        rows = np.asarray(out.row_forwards)
        print(f"  threshold {threshold:.2f}: {int(out.forwards)} passes "
              f"(per row min {rows.min()}, mean {rows.mean():.1f}, max {rows.max()})")


if __name__ == "__main__":
    main()
