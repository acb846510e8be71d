"""``diffujax generate``: sample a continuation or an infill with one of the docs/algorithms.md §6
samplers; on a block diffusion model (``block_size > 0``, §9) the samplers run inside the cached
block decoder, and ``--sampler ar`` decodes autoregressively with a KV cache. The arguments'
checks, the choice of sampler and decoder, and the printing; the sampling itself is
``inference/generation.py``."""

from __future__ import annotations

import json
import jax
import numpy as np

from diffujax.data.tokenizer import load_tokenizer
from diffujax.diffusion.decoding import canvas_length
from diffujax.inference.generation import (DEFAULT_BLOCK_LENGTH, build_canvas, decode,
                                           prompt_ids, sample)
from diffujax.runtime import (ArgumentError, LoadedModel, checkpoint_config, load_from_args,
                              require, require_at_least)

DECODERS = {"canvas": "whole canvas per pass", "blocks": "cached blocks",
            "ar": "AR with KV cache"}


def sampler_of(args, config) -> str:
    """The sampler ``args`` ask for (``--ar`` is ``--sampler ar``), with the model's default:
    threshold decoding for a block model, confidence otherwise."""
    if args.ar:
        require(args.sampler in (None, "ar"), "--sampler", args.sampler,
                "left out or ar with --ar")
        return "ar"
    if args.sampler is not None:
        return args.sampler
    return "threshold" if config.block_size > 0 else "confidence"


def decoder_of(args, config) -> str:
    """``ar`` (KV-cache AR decoder), ``blocks`` (cached block decoder) or ``canvas`` (today's
    samplers, which recompute the whole canvas at every pass)."""
    if sampler_of(args, config) == "ar":
        return "ar"
    return "blocks" if config.block_size > 0 else "canvas"


def check_generate_args(args, config) -> None:
    """Every argument in its valid range, before the weights are loaded (``config``: the
    checkpoint's model config)."""
    decoder = decoder_of(args, config)
    if args.suffix is not None and decoder != "canvas":
        what = ("a block diffusion model (block size"
                f" {config.block_size}) decodes left to right against a cache of the blocks"
                " before, so there is no suffix to condition on") if decoder == "blocks" else (
                "AR decoding has no suffix to condition on")
        raise ArgumentError(f"--suffix: infilling is not defined here: {what}")
    if decoder == "blocks" and args.block_length not in (None, config.block_size):
        raise ArgumentError(f"--block-length {args.block_length}: a block diffusion model"
                            f" decodes in its own blocks of {config.block_size}")
    require_at_least(args, steps=1, length=1, infill_length=1, num_samples=1, block_length=1,
                     seed=0)
    require(args.infill_length is None or args.suffix is not None, "--infill-length",
            args.infill_length, "given with --suffix (it is the length of the span before the"
            " suffix)")
    if args.temperature is not None:
        require(args.temperature >= 0 and np.isfinite(args.temperature), "--temperature",
                args.temperature, ">= 0 (0: greedy)")
    if args.top_p is not None:
        require(0 < args.top_p <= 1, "--top-p", args.top_p, "in (0, 1]")
    if args.top_k is not None:
        require(1 <= args.top_k <= config.vocab_size, "--top-k", args.top_k,
                f"in 1..{config.vocab_size} (the vocabulary)")
    require(0 < args.threshold <= 1, "--threshold", args.threshold, "in (0, 1]")


def span_length(args) -> int:
    return args.infill_length if args.suffix and args.infill_length else args.length


def check_fits(args, config, tokenizer) -> None:
    """The canvas (BOS, prompt, span, suffix) must fit the model's positions; a cached decoder's
    canvas (its KV cache) is counted in whole blocks."""
    limit = config.max_positions
    length = span_length(args)
    lead = int(tokenizer.start_id(config.bos_token_id) is not None)  # as prompt_ids counts
    size = (lead + (len(tokenizer.encode(args.prompt)) if args.prompt else 0) + length
            + (len(tokenizer.encode(args.suffix)) if args.suffix else 0))
    blocks = ""
    if decoder_of(args, config) == "blocks" and config.block_size > 1:
        size = canvas_length(size, 0, config.block_size)
        blocks = f" in whole blocks of {config.block_size}"
    if size > limit:
        what = "--infill-length" if length != args.length else "--length"
        raise ArgumentError(f"{what} {length}: the canvas (prompt, {length} generated tokens"
                            f"{', suffix' if args.suffix else ''}{blocks}) is {size} tokens, more"
                            f" than the model's {limit} positions")


def run_generate(args) -> int:
    config = checkpoint_config(args)
    check_generate_args(args, config)
    check_fits(args, config, load_tokenizer(args.checkpoint))
    return print_generation(args, generate_texts(args, load_from_args(args)))


def generate_texts(args, model: LoadedModel) -> dict:
    """The work of ``diffujax generate`` on a loaded model, its arguments already checked
    (``check_generate_args``, ``check_fits``): ``texts`` (one per sample: the prompt, the
    generated span, the suffix) and the other fields ``--json`` prints."""
    sampler, decoder = sampler_of(args, model.config), decoder_of(args, model.config)
    stop_at_eos = not args.keep_after_eos
    options = dict(sampler=sampler, steps=args.steps, seed=args.seed, threshold=args.threshold,
                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if decoder == "canvas":
        ids, src, span = build_canvas(model, args.prompt, span_length(args), args.suffix)
        rows = (args.num_samples, 1)
        out, seconds = sample(model, np.tile(ids, rows), np.tile(src, rows),
                              block_length=args.block_length or DEFAULT_BLOCK_LENGTH, **options)
        generated = np.asarray(out.tokens)[:, span]
    else:
        prompt, _ = prompt_ids(model, args.prompt)
        out, seconds = decode(model, [prompt] * args.num_samples, new_tokens=args.length,
                              stop_at_eos=stop_at_eos, **options)
        generated = np.asarray(out.tokens)
    texts = [args.prompt + model.tokenizer.decode_generated(row, stop_at_eos=stop_at_eos)
             + (args.suffix or "") for row in generated]
    rate = args.num_samples * span_length(args) / seconds if seconds > 0 else float("inf")
    return {"texts": texts, "forward_passes": int(out.forwards), "tokens_per_second": rate,
            "sampler": sampler, "decoder": decoder}


def print_generation(args, result: dict) -> int:
    if jax.process_index() != 0:  # every process holds the same samples; one prints them
        return 0
    texts = result.pop("texts")
    if args.json:
        print(json.dumps({"text": texts[0] if len(texts) == 1 else texts, **result}))
    else:
        print(*texts, sep="\n")
        print(f"[{result['sampler']}, {DECODERS[result['decoder']]}:"
              f" {result['forward_passes']} forward passes,"
              f" {result['tokens_per_second']:.1f} tokens/s]")
    return 0
