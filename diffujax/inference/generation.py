"""Text from a loaded model with one of the docs/algorithms.md §6 samplers: ``sample`` runs a
sampler over whole canvases (a continuation or an infill), ``decode`` the cached decoders (a block
diffusion model's block decoder, §9, or AR decoding with a KV cache). ``diffujax generate``
(``commands/generate.py``), the task harness and the demo call them."""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from diffujax.diffusion import (sample_ancestral, sample_confidence, sample_semi_ar,
                                sample_threshold)
from diffujax.diffusion.decoding import canvas_length, decode_blocks
from diffujax.diffusion.sampling import infill_canvas
from diffujax.models import init_cache
from diffujax.runtime import LoadedModel, pad_rows

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
    (``prompt_ids``). Returns (tokens [L], src [L], span slice)."""
    head, _ = prompt_ids(model, prompt)
    suffix_ids = model.tokenizer.encode(suffix) if suffix else []
    tokens, src = infill_canvas(head, length, model.mask_token_id(), suffix_ids)
    return tokens, src, slice(len(head), len(head) + length)


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
    return _on_host(model, out, rows), seconds


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
    return _on_host(model, dataclasses.replace(out, cache=None), len(prompts)), seconds


def _on_host(model: LoadedModel, out, rows: int):
    """``out``'s arrays (a sampler's or decoder's output) on the host, the padding rows dropped
    (every array is batch-first but the scalar pass count)."""
    def fetch(x):
        host = model.fetch(x)
        return host[:rows] if host.ndim else host
    return jax.tree.map(fetch, out)
