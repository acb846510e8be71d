"""``diffujax generate``: sample a continuation or an infill with one of the docs/algorithms.md §6
samplers."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np

from diffujax.diffusion import (sample_ancestral, sample_confidence, sample_semi_ar,
                                sample_threshold)
from diffujax.runtime import LoadedModel, add_mesh_args, load_from_args, pad_rows

SAMPLERS = ("ancestral", "topk", "blocks", "threshold")


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="diffujax checkpoint directory")
    p.add_argument("--prompt", default="", help="fixed text before the generated span")
    p.add_argument("--suffix", default=None, help="fixed text after the span (infilling)")
    p.add_argument("--length", type=int, default=64, help="tokens to generate")
    p.add_argument("--infill-length", type=int, default=None,
                   help="with --suffix: tokens to infill (overrides --length)")
    p.add_argument("--sampler", choices=SAMPLERS, default="topk")
    p.add_argument("--steps", type=int, default=64, help="denoising steps (forward passes)")
    p.add_argument("--block-length", type=int, default=32, help="blocks sampler: block size")
    p.add_argument("--threshold", type=float, default=0.9, help="threshold sampler: confidence")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: 1 for ancestral, 0 otherwise)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-after-eos", action="store_true", help="do not cut text at EOS")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    add_mesh_args(p)


def build_canvas(model: LoadedModel, prompt: str, length: int, suffix: str | None = None):
    """``[first] + prompt + [M] * length + suffix`` with ``src`` over everything but the span.

    Position 0 must be a real token (docs/algorithms.md §1, shift): ``Tokenizer.start_id`` (BOS,
    else EOS) when there is one, otherwise the first prompt token. Returns (tokens [L], src [L],
    span slice, dropped_first)."""
    tok, mask_id = model.tokenizer, model.mask_token_id()
    prompt_ids = tok.encode(prompt) if prompt else []
    suffix_ids = tok.encode(suffix) if suffix else []
    first = tok.start_id(model.config.bos_token_id)
    lead = [] if first is None else [first]
    if not lead and not prompt_ids:
        raise ValueError("the tokenizer has no BOS or EOS token: give a --prompt so position 0"
                         " is real")
    ids = lead + prompt_ids + [mask_id] * length + suffix_ids
    src = np.ones(len(ids), bool)
    start = len(lead) + len(prompt_ids)
    src[start:start + length] = False
    return np.asarray(ids, np.int32), src, slice(start, start + length), len(lead)


def sampler_call(sampler: str, *, steps: int, generated: int, block_length: int = 32,
                 threshold: float = 0.9, ranking: str = "masked",
                 confidence_temperature: float | None = None):
    """``(sampler function, its sampler-specific keyword arguments)`` for a sampler name;
    ``generated``: positions to generate per row (the blocks sampler spends the total budget of
    ``steps`` evenly over its blocks). ``ranking`` / ``confidence_temperature``: the topk
    sampler's reference-parity options (``sample_confidence``)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not one of {SAMPLERS}")
    if sampler != "topk" and (ranking != "masked" or confidence_temperature is not None):
        raise ValueError("the reference ranking / tempered confidence options apply to the"
                         " topk sampler only")
    num_blocks = -(-generated // block_length)
    return {
        "ancestral": (sample_ancestral, dict(steps=steps)),
        "topk": (sample_confidence, dict(steps=steps, ranking=ranking,
                                         confidence_temperature=confidence_temperature)),
        "blocks": (sample_semi_ar, dict(steps=max(1, steps // max(1, num_blocks)),
                                        block_length=block_length)),
        "threshold": (sample_threshold, dict(threshold=threshold)),
    }[sampler]


def sample(model: LoadedModel, canvas, src, *, sampler: str, steps: int, seed: int,
           temperature: float | None = None, top_p=None, top_k=None, block_length: int = 32,
           threshold: float = 0.9):
    """Run a sampler on a batch of canvases; returns (SampleOutput as host arrays, seconds
    excluding compile). On a mesh the canvases are split over the batch shards (padded with copies
    of the first; a row's result does not depend on the rows beside it, so the padding is simply
    dropped)."""
    if temperature is None:
        temperature = 1.0 if sampler == "ancestral" else 0.0
    common = dict(temperature=temperature, top_p=top_p, top_k=top_k)
    mask = dict(mask_token_id=model.mask_token_id())  # traced, so the compiled call takes it too
    fn, extra = sampler_call(sampler, steps=steps, generated=int((~np.asarray(src[0])).sum()),
                             block_length=block_length, threshold=threshold)
    rows, shards = len(canvas), model.batch_shards()
    with model.active():
        args = (model.apply_fn, model.params, model.put_batch(pad_rows(np.asarray(canvas), shards)),
                model.put_batch(pad_rows(np.asarray(src), shards)), jax.random.key(seed))
        compiled = fn.lower(*args, **mask, **common, **extra).compile()
        begin = time.perf_counter()
        out = jax.block_until_ready(compiled(*args[1:], **mask))
        seconds = time.perf_counter() - begin
    out = dataclasses.replace(
        out, tokens=model.fetch(out.tokens)[:rows], forwards=model.fetch(out.forwards),
        row_forwards=model.fetch(out.row_forwards)[:rows],
        commit_step=model.fetch(out.commit_step)[:rows])
    return out, seconds


def run_generate(args) -> int:
    model = load_from_args(args)
    length = args.infill_length if args.suffix and args.infill_length else args.length
    ids, src, span, _ = build_canvas(model, args.prompt, length, args.suffix)
    canvas = np.tile(ids, (args.num_samples, 1))
    srcs = np.tile(src, (args.num_samples, 1))
    out, seconds = sample(model, canvas, srcs, sampler=args.sampler, steps=args.steps,
                          seed=args.seed, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, block_length=args.block_length,
                          threshold=args.threshold)
    tokens = np.asarray(out.tokens)
    texts = [args.prompt + model.tokenizer.decode_generated(row[span],
                                                            stop_at_eos=not args.keep_after_eos)
             + (args.suffix or "") for row in tokens]
    rate = args.num_samples * length / seconds if seconds > 0 else float("inf")
    if jax.process_index() != 0:  # every process holds the same samples; one prints them
        return 0
    if args.json:
        print(json.dumps({"text": texts[0] if len(texts) == 1 else texts,
                          "forward_passes": int(out.forwards), "tokens_per_second": rate}))
    else:
        for text in texts:
            print(text)
        print(f"[{args.sampler}: {int(out.forwards)} forward passes, {rate:.1f} tokens/s]")
    return 0
