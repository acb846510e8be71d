"""``diffujax generate``: sample a continuation or an infill with one of the docs/algorithms.md §6
samplers; on a block diffusion model (``block_size > 0``, §9) the samplers run inside the cached
block decoder, and ``--sampler ar`` decodes autoregressively with a KV cache."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import NamedTuple

import jax
import numpy as np

from diffujax.data.tokenizer import load_tokenizer
from diffujax.diffusion import (sample_ancestral, sample_confidence, sample_semi_ar,
                                sample_threshold)
from diffujax.diffusion.decoding import canvas_length, decode_blocks
from diffujax.diffusion.sampling import infill_canvas
from diffujax.models import init_cache
from diffujax.runtime import (ArgumentError, LoadedModel, checkpoint_config,
                              load_from_args, max_positions, pad_rows, require)

# = arguments' DIFFUSION_SAMPLERS and SAMPLERS; "ar" is generate's alone.
DIFFUSION_SAMPLERS = ("ancestral", "confidence", "semi_ar", "threshold")
SAMPLERS = DIFFUSION_SAMPLERS + ("ar",)
# Former names, refused with the new one (= arguments.RENAMED_SAMPLERS): "topk" read as --top-k.
RENAMED_SAMPLERS = {"topk": "confidence", "blocks": "semi_ar"}
# On a block model every diffusion sampler runs inside the cached block decoder: "semi_ar" (the
# confidence rule block by block) is then the same as "confidence".
BLOCK_SAMPLERS = {"threshold": "threshold", "confidence": "confidence", "semi_ar": "confidence",
                  "ancestral": "ancestral"}
DEFAULT_BLOCK_LENGTH = 32  # the semi_ar sampler of a full-sequence model (= arguments')


DECODERS = {"canvas": "whole canvas per pass", "blocks": "cached blocks",
            "ar": "AR with KV cache"}


def prompt_ids(model: LoadedModel, prompt: str) -> tuple[list[int], int]:
    """``([first] + prompt tokens, 1 if there is a first token else 0)``.

    Position 0 must be a real token (docs/algorithms.md §1, shift): ``Tokenizer.start_id`` (BOS,
    else EOS) when there is one, otherwise the first prompt token."""
    tok = model.tokenizer
    first = tok.start_id(model.config.bos_token_id)
    lead = [] if first is None else [first]
    ids = lead + (tok.encode(prompt) if prompt else [])
    if not ids:
        raise ValueError("the tokenizer has no BOS or EOS token: give a --prompt so position 0"
                         " is real")
    return ids, len(lead)


def build_canvas(model: LoadedModel, prompt: str, length: int, suffix: str | None = None):
    """``[first] + prompt + [M] * length + suffix`` with ``src`` over everything but the span
    (``prompt_ids``). Returns (tokens [L], src [L], span slice, dropped_first)."""
    head, lead = prompt_ids(model, prompt)
    suffix_ids = model.tokenizer.encode(suffix) if suffix else []
    tokens, src = infill_canvas(head, length, model.mask_token_id(), suffix_ids)
    return tokens, src, slice(len(head), len(head) + length), lead


def check_sampler(sampler: str, choices: tuple[str, ...] = SAMPLERS) -> None:
    """``ValueError`` (one line) unless ``sampler`` is one of ``choices``; a former name is
    refused with its new one."""
    if sampler in RENAMED_SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is now called {RENAMED_SAMPLERS[sampler]!r}")
    if sampler not in choices:
        raise ValueError(f"sampler {sampler!r} is not one of {', '.join(choices)}")


def sampler_call(sampler: str, *, steps: int, generated: int,
                 block_length: int = DEFAULT_BLOCK_LENGTH, threshold: float = 0.9,
                 ranking: str = "masked",
                 confidence_temperature: float | None = None):
    """``(sampler function, its sampler-specific keyword arguments)`` for a sampler name;
    ``generated``: positions to generate per row (the semi_ar sampler spends the total budget of
    ``steps`` evenly over its blocks). ``ranking`` / ``confidence_temperature``: the confidence
    sampler's reference-parity options (``sample_confidence``)."""
    check_sampler(sampler)
    if sampler != "confidence" and (ranking != "masked" or confidence_temperature is not None):
        raise ValueError("the reference ranking / tempered confidence options apply to the"
                         " confidence sampler only")
    num_blocks = -(-generated // block_length)
    return {
        "ancestral": (sample_ancestral, dict(steps=steps)),
        "confidence": (sample_confidence, dict(steps=steps, ranking=ranking,
                                               confidence_temperature=confidence_temperature)),
        "semi_ar": (sample_semi_ar, dict(steps=max(1, steps // max(1, num_blocks)),
                                         block_length=block_length)),
        "threshold": (sample_threshold, dict(threshold=threshold)),
    }[sampler]


def sample(model: LoadedModel, canvas, src, *, sampler: str, steps: int, seed: int,
           temperature: float | None = None, top_p=None, top_k=None,
           block_length: int = DEFAULT_BLOCK_LENGTH, threshold: float = 0.9):
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


def decode(model: LoadedModel, prompts, *, new_tokens: int, sampler: str, steps: int,
           seed: int, temperature: float | None = None, top_p=None, top_k=None,
           threshold: float = 0.9, stop_at_eos: bool = True, row_ids=None,
           timed: bool = True, width: int | None = None):
    """Cached decoding of ``new_tokens`` after each prompt (token lists, position 0 a real
    token): ``sampler`` ``"ar"`` is the AR KV-cache decoder, any other runs inside the cached
    block decoder (``diffusion/decoding.py``) with the model's block size, ``steps`` spread
    evenly over the blocks. A row stops at EOS (``stop_at_eos``); ``row_ids`` fix each row's
    draws; ``width``: pad the prompts to at least this many columns. Returns (DecodeOutput as
    host arrays, seconds excluding compile; None unless ``timed``)."""
    config = model.config
    check_sampler(sampler)
    if sampler == "ar":
        n, rule, per_block = 1, "confidence", 1
    else:
        if config.block_size < 1:
            raise ValueError("cached block decoding needs a block diffusion model (config"
                             " block_size > 0); this one is a full-sequence model")
        n, rule = config.block_size, BLOCK_SAMPLERS[sampler]
        per_block = max(1, steps // -(-new_tokens // n))
    if temperature is None:
        temperature = 1.0 if rule == "ancestral" else 0.0
    width = max([len(p) for p in prompts] + [width or 0])
    prompt = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        prompt[i, :len(p)] = p
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    ids = np.arange(len(prompts), dtype=np.int32) if row_ids is None else np.asarray(row_ids)
    shards = model.batch_shards()
    batch = [model.put_batch(pad_rows(a, shards)) for a in (prompt, lengths, ids)]
    eos = model.tokenizer.eos_id if model.tokenizer.eos_id is not None else config.eos_token_id
    static = dict(block_size=n, new_tokens=new_tokens,
                  mask_token_id=None if n == 1 else model.mask_token_id(), sampler=rule,
                  steps=per_block, threshold=threshold, temperature=temperature, top_k=top_k,
                  top_p=top_p, eos_token_id=eos if stop_at_eos else None)
    rows, seconds = len(batch[0]), None
    with model.active():
        cache = lambda: init_cache(config, rows, canvas_length(width, new_tokens, n))  # noqa
        args = (model.cached_fn, model.params, batch[0], batch[1])
        if timed:  # compile first, so the time is the decoding's alone
            compiled = decode_blocks.lower(*args, cache(), jax.random.key(seed),
                                           row_ids=batch[2], **static).compile()
            begin = time.perf_counter()
            out = jax.block_until_ready(compiled(*args[1:], cache(), jax.random.key(seed),
                                                 row_ids=batch[2]))
            seconds = time.perf_counter() - begin
        else:  # the jit cache: batches of one shape compile once
            out = decode_blocks(*args, cache(), jax.random.key(seed), row_ids=batch[2],
                                **static)
    out = dataclasses.replace(
        out, tokens=model.fetch(out.tokens)[:len(prompts)],
        lengths=model.fetch(out.lengths)[:len(prompts)],
        canvas=model.fetch(out.canvas)[:len(prompts)], forwards=model.fetch(out.forwards),
        cache=None)
    return out, seconds


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
    require(args.steps >= 1, "--steps", args.steps, ">= 1")
    require(args.length >= 1, "--length", args.length, ">= 1")
    if args.infill_length is not None:
        require(args.infill_length >= 1, "--infill-length", args.infill_length, ">= 1")
        require(args.suffix is not None, "--infill-length", args.infill_length,
                "given with --suffix (it is the length of the span before the suffix)")
    require(args.num_samples >= 1, "--num-samples", args.num_samples, ">= 1")
    if args.temperature is not None:
        require(args.temperature >= 0 and np.isfinite(args.temperature), "--temperature",
                args.temperature, ">= 0 (0: greedy)")
    if args.top_p is not None:
        require(0 < args.top_p <= 1, "--top-p", args.top_p, "in (0, 1]")
    if args.top_k is not None:
        require(1 <= args.top_k <= config.vocab_size, "--top-k", args.top_k,
                f"in 1..{config.vocab_size} (the vocabulary)")
    if args.block_length is not None:
        require(args.block_length >= 1, "--block-length", args.block_length, ">= 1")
    require(0 < args.threshold <= 1, "--threshold", args.threshold, "in (0, 1]")
    require(args.seed >= 0, "--seed", args.seed, ">= 0")


def span_length(args) -> int:
    return args.infill_length if args.suffix and args.infill_length else args.length


def check_fits(args, config, tokenizer) -> None:
    """The canvas (BOS, prompt, span, suffix) must fit the model's positions; a cached decoder's
    canvas (its KV cache) is counted in whole blocks."""
    limit = max_positions(config)
    if limit is None:
        return
    length = span_length(args)
    lead = int(tokenizer.bos_id is not None or config.bos_token_id is not None)
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


class Generation(NamedTuple):
    """What ``diffujax generate`` reports: one text per sample, and how it was made."""
    texts: list[str]
    forwards: int
    tokens_per_second: float
    sampler: str
    decoder: str


def generate_texts(args, model: LoadedModel) -> Generation:
    """The work of ``diffujax generate`` on a loaded model, its arguments already checked
    (``check_generate_args``, ``check_fits``)."""
    sampler, decoder = sampler_of(args, model.config), decoder_of(args, model.config)
    stop_at_eos = not args.keep_after_eos
    if decoder == "canvas":
        ids, src, span, _ = build_canvas(model, args.prompt, span_length(args), args.suffix)
        canvas = np.tile(ids, (args.num_samples, 1))
        srcs = np.tile(src, (args.num_samples, 1))
        out, seconds = sample(model, canvas, srcs, sampler=sampler, steps=args.steps,
                              seed=args.seed, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k,
                              block_length=args.block_length or DEFAULT_BLOCK_LENGTH,
                              threshold=args.threshold)
        generated = np.asarray(out.tokens)[:, span]
    else:
        prompt, _ = prompt_ids(model, args.prompt)
        out, seconds = decode(model, [prompt] * args.num_samples, new_tokens=args.length,
                              sampler=sampler, steps=args.steps, seed=args.seed,
                              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              threshold=args.threshold, stop_at_eos=stop_at_eos)
        generated = np.asarray(out.tokens)
    texts = [args.prompt + model.tokenizer.decode_generated(row, stop_at_eos=stop_at_eos)
             + (args.suffix or "") for row in generated]
    rate = args.num_samples * span_length(args) / seconds if seconds > 0 else float("inf")
    return Generation(texts, int(out.forwards), rate, sampler, decoder)


def print_generation(args, result: Generation) -> int:
    texts, forwards, rate, sampler, decoder = result
    if jax.process_index() != 0:  # every process holds the same samples; one prints them
        return 0
    if args.json:
        print(json.dumps({"text": texts[0] if len(texts) == 1 else texts,
                          "forward_passes": forwards, "tokens_per_second": rate,
                          "sampler": sampler, "decoder": decoder}))
    else:
        for text in texts:
            print(text)
        print(f"[{sampler}, {DECODERS[decoder]}: {forwards} forward passes,"
              f" {rate:.1f} tokens/s]")
    return 0
