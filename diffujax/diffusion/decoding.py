"""Block decoding against an exact KV cache (docs/algorithms.md §9); with blocks of one token it
is the AR KV-cache decoder.

The canvas of row ``r`` holds its prompt at positions ``0 .. P_r - 1`` (right padding: block
boundaries are the same positions in every row and RoPE positions are the row's own) and then
its generated positions; its length ``T`` (the cache's) is a multiple of the block size ``N``.
The blocks complete in every row's prompt are prefilled in one pass; then, block by block:

- the block's generated positions start as the mask token; each *denoising pass* runs the
  block's ``N`` tokens against the cache (queries: the block; keys: the committed blocks and the
  block itself, bidirectional inside it: ``full().with_blocks(N)`` on the canvas) and the
  sampler commits some masked positions. Shift (§1): the prediction for the block's first
  position is the logit the previous block's commit pass produced at its last position; the
  others read the pass's logits at ``j - 1``;
- once no row has a masked position in the block, a *commit pass* runs the clean block, which
  writes its exact keys and values into the cache and yields the logit that predicts the next
  block's first token. A row whose prompt covers the block only takes part in that pass.

Samplers inside a block (``steps`` is per block): ``threshold`` commits every masked position
whose candidate is more likely than the threshold, at least the most confident one per pass
(Fast-dLLM); ``confidence`` the ``ceil(N / steps)`` most confident per pass; ``ancestral``
reveals each masked position with probability ``1 / (s + 1)`` at level ``s`` of ``steps``.
Candidates come from ``sampling.draw_candidates`` (exact categorical draws, or greedy at
temperature 0).

With ``N = 1`` a block's only prediction is the carried logit, so it needs no denoising pass:
the token is drawn as soon as that logit exists (after the prefill or the previous commit pass)
and every loop iteration is a commit pass, one forward pass per token: AR decoding with a KV
cache, whatever the sampler.

A row is finished once its committed blocks reach ``P_r + new_tokens`` positions or hold an EOS
among its generated tokens; later blocks change nothing for it and its output is padded after
the EOS. The loop stops when every row is finished (the last block needs no commit pass).
Everything is one jitted ``lax.while_loop`` per (batch, prompt width, cache length) shape, the
cache donated and updated in place. Row ``r`` draws from ``fold_in(key, row_ids[r])``, folding
in the block and the pass inside the block, so its tokens do not depend on the rows beside it.

``cached_fn(params, tokens [B, n], pattern, cache, offset) -> (logits [B, n, V], cache)`` is
the only contact with a model (``models.cached_fn_for``); it is a static jit argument, so pass
the same function object each call.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from diffujax.attention.pattern import full
from diffujax.diffusion.sampling import (ancestral_rule, draw_candidates, forbid,
                                         most_confident_rule, threshold_rule)

SAMPLERS = ("threshold", "confidence", "ancestral")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeOutput:
    tokens: jax.Array  # [B, new_tokens] int32: generated tokens, pad after the row's first EOS
    lengths: jax.Array  # [B] int32: generated tokens before the padding (EOS included)
    canvas: jax.Array  # [B, T] int32: prompt, generated tokens, then pad
    forwards: jax.Array  # int32 scalar: forward passes for the batch (prefill, denoise, commit)
    # The cache after the last commit pass: the donated input's buffers, updated in place (an
    # output, so XLA can alias it to the input; the caller may drop it or decode on).
    cache: object = None


def canvas_length(prompt_width: int, new_tokens: int, block_size: int) -> int:
    """The cache length a decoder needs: the longest prompt plus the new tokens, rounded up to
    whole blocks (a row's last block is decoded whole; what lies past its end is dropped)."""
    return -(-(prompt_width + new_tokens) // block_size) * block_size


def block_rule(sampler: str, block_size: int, steps: int | None, threshold: float):
    """The commit rule of ``sampler`` inside one block (``sampling.py``'s rule signature)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not one of {SAMPLERS}")
    if sampler == "threshold":
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold {threshold}: must be in (0, 1]")
        return threshold_rule(threshold, None)
    if steps is None or steps < 1:
        raise ValueError(f"the {sampler} sampler needs steps >= 1 per block (got {steps})")
    if sampler == "confidence":
        return most_confident_rule(math.ceil(block_size / steps))
    return ancestral_rule(steps)


def block_pass(cached_fn: Callable, params, tokens, cache, offset, *, block_size: int):
    """One forward pass of the decoder: ``tokens [B, n]`` at canvas positions ``offset ..
    offset + n - 1`` against ``cache``, under the block-causal pattern of ``block_size``
    (``n``: a whole block, or the prefill's whole blocks). Returns ``(logits [B, n, V],
    cache)``. Every pass of ``decode_blocks`` is this call (and ``diffujax plan --what decode``
    compiles it)."""
    return cached_fn(params, tokens, full().with_blocks(block_size), cache, offset)


_STATIC = ("cached_fn", "block_size", "new_tokens", "mask_token_id", "sampler", "steps",
           "threshold", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id")


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def decode_blocks(cached_fn: Callable, params, prompt, prompt_lengths, cache, key, *,
                  block_size: int, new_tokens: int, mask_token_id: int | None,
                  sampler: str = "threshold", steps: int | None = None,
                  threshold: float = 0.9, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, eos_token_id: int | None = None,
                  pad_token_id: int | None = None, row_ids=None) -> DecodeOutput:
    """Decode ``new_tokens`` after each row's prompt, block by block against ``cache``.

    ``prompt [B, W]``: row ``r``'s prompt in its first ``prompt_lengths[r]`` entries (``>= 1``:
    position 0 must be a real token, §1); ``cache``: an empty cache of length
    ``T >= canvas_length(W, new_tokens, block_size)``, a multiple of ``block_size`` (donated).
    ``mask_token_id`` is never drawn (it may be None only for ``block_size == 1``)."""
    batch, width = prompt.shape
    n, length = block_size, cache.length
    if n < 1 or new_tokens < 1:
        raise ValueError(f"block size {n} and new tokens {new_tokens}: both must be >= 1")
    if length % n or length < canvas_length(width, new_tokens, n):
        raise ValueError(f"KV cache of {length} positions: must be a multiple of the block size"
                         f" {n} and at least {canvas_length(width, new_tokens, n)} (prompt"
                         f" width {width} + {new_tokens} new tokens, in whole blocks)")
    if mask_token_id is None and n > 1:
        raise ValueError("block decoding needs the mask token id")
    # blocks of one token: the carried logit's draw is committed at once, whatever the sampler
    rule = (lambda step, masked, *_: masked) if n == 1 else block_rule(sampler, n, steps,
                                                                        threshold)
    pad = next((t for t in (pad_token_id, eos_token_id, mask_token_id) if t is not None), 0)
    fill = 0 if mask_token_id is None else mask_token_id
    num_blocks = length // n

    lengths = jnp.asarray(prompt_lengths, jnp.int32)
    generate = jnp.arange(length)[None, :] >= lengths[:, None]  # [B, T]
    x = jnp.full((batch, length), fill, jnp.int32).at[:, :width].set(prompt.astype(jnp.int32))
    x = jnp.where(generate, fill, x)
    ends = lengths + new_tokens  # a row is finished once its committed blocks reach this
    rows = jnp.arange(batch) if row_ids is None else jnp.asarray(row_ids)
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, rows.astype(jnp.int32))

    def block_of(a, b):
        return jax.lax.dynamic_slice_in_dim(a, b * n, n, axis=1)

    def reveal(x, masked, predictions, b, step, rule):
        """Commit the positions ``rule`` picks, with candidates drawn from ``predictions``."""
        keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, b), step))(row_keys)
        split = lambda i: jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)  # noqa: E731
        if mask_token_id is not None:
            predictions = forbid(predictions, mask_token_id)
        candidates, confidence = draw_candidates(split(0), predictions, temperature=temperature,
                                                 top_k=top_k, top_p=top_p)
        commit = rule(step, masked, confidence, split(1), block_of(generate, b)) & masked
        block = jnp.where(commit, candidates, block_of(x, b))
        return jax.lax.dynamic_update_slice_in_dim(x, block, b * n, axis=1), masked & ~commit

    def finished(s):
        """Per row, once the current block is clean: nothing more to decode after it."""
        block, b = block_of(s["x"], s["b"]), s["b"]
        eos = (jnp.zeros(batch, bool) if eos_token_id is None else
               ((block == eos_token_id) & block_of(generate, b)).any(axis=1))
        return s["done"] | eos | ((b + 1) * n >= ends)

    # prefill: the blocks complete in every row's prompt, in one pass
    first = jnp.min(lengths) // n
    prefill = width // n * n
    forward = functools.partial(block_pass, cached_fn, block_size=n)
    vocab = jax.eval_shape(forward, params, x[:, :n], cache, 0)[0].shape[-1]
    carried = jnp.zeros((batch, vocab), jnp.float32)
    if prefill:
        logits, cache = forward(params, x[:, :prefill], cache, 0)
        last = jnp.maximum(first * n - 1, 0)
        carried = jax.lax.dynamic_index_in_dim(logits, last, axis=1, keepdims=False)
    init = dict(b=first, step=jnp.int32(0), x=x, masked=block_of(generate, first),
                done=jnp.zeros(batch, bool), carried=carried.astype(jnp.float32),
                forwards=jnp.int32(1 if prefill else 0))
    max_passes = 1 + num_blocks * (n + (steps or 0) + 1)  # a guard; every rule makes progress

    def draw_single(s):
        """Blocks of one token: the only prediction is the carried logit, so the token is drawn
        as soon as that logit exists, with no pass of its own (each pass is then a commit)."""
        if n > 1:
            return s
        x, masked = reveal(s["x"], s["masked"], s["carried"][:, None], s["b"], s["step"], rule)
        return dict(s, x=x, masked=masked)

    init = draw_single(init)

    def keep_going(carry):
        s, _ = carry
        over = ~s["masked"].any() & finished(s).all()
        return (s["b"] < num_blocks) & ~over & (s["forwards"] < max_passes)

    def denoise(s, logits):
        predictions = jnp.concatenate([s["carried"][:, None], logits[:, :-1]], axis=1)
        x, masked = reveal(s["x"], s["masked"], predictions, s["b"], s["step"], rule)
        return dict(s, x=x, masked=masked, step=s["step"] + 1)

    def commit(s, logits):
        done = finished(s)
        return draw_single(dict(s, b=s["b"] + 1, step=jnp.int32(0), carried=logits[:, -1],
                                done=done, masked=block_of(generate, s["b"] + 1) & ~done[:, None]))

    def one_pass(carry):
        s, cache = carry
        logits, cache = forward(params, block_of(s["x"], s["b"]), cache, s["b"] * n)
        s = dict(s, forwards=s["forwards"] + 1)
        s = jax.lax.cond(s["masked"].any(), denoise, commit, s, logits.astype(jnp.float32))
        return s, cache

    final, cache = jax.lax.while_loop(keep_going, one_pass, (init, cache))

    positions = lengths[:, None] + jnp.arange(new_tokens)[None, :]
    tokens = jnp.take_along_axis(final["x"], positions, axis=1)
    produced = jnp.full(batch, new_tokens, jnp.int32)
    if eos_token_id is not None:
        is_eos = tokens == eos_token_id
        produced = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, produced)
    tokens = jnp.where(jnp.arange(new_tokens)[None, :] < produced[:, None], tokens, pad)
    canvas = jnp.where(jnp.arange(length)[None, :] < (lengths + produced)[:, None], final["x"],
                       pad)
    return DecodeOutput(tokens=tokens, lengths=produced, canvas=canvas,
                        forwards=final["forwards"], cache=cache)

