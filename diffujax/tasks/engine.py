"""Batched scoring and decoding of token rows over the mesh.

A *row* is a token list with a ``fixed`` flag per position (context: never noised, never
scored, never generated) and a ``row_id`` that fixes its random draws. Rows are packed in their
given order into batches of a fixed number of rows (a multiple of the mesh's batch shards;
short batches are filled with copies of their first row, dropped afterwards) and a bucketed
length (powers of two from 32, so only a few programs compile). Padding never changes a score:
pad positions are fixed, outside every sum, and in their own attention segment, so no real
position attends to them; every draw of a row is made from ``row_id`` alone, and position-wise
draws are prefix-consistent in the length, so a row scores the same alone and unpadded as in a
padded batch. (Sampled decoding is the exception: its candidate draws depend on the bucketed
canvas length; greedy decoding does not.)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffujax.attention.pattern import causal, full
from diffujax.diffusion import (DEFAULT_EPS, NoisedBatch, apply_noise, conditional_nll,
                                multiple_choice_score, per_sequence_terms, sample_noise_mask,
                                shifted_cross_entropy)
from diffujax.inference.generation import decode, sampler_call
from diffujax.runtime import LoadedModel, pad_rows

MIN_BUCKET = 32
# Row ids: item i, choice j -> i * ROW_STRIDE + j, so an item's draws never depend on which
# other items are scored with it (batching, --limit, resuming).
ROW_STRIDE = 64


@dataclasses.dataclass(frozen=True)
class Row:
    tokens: tuple[int, ...]
    fixed: tuple[bool, ...]  # True: context; False: scored / generated
    row_id: int

    @staticmethod
    def make(context: Sequence[int], target: Sequence[int], row_id: int,
             suffix: Sequence[int] = ()) -> "Row":
        tokens = tuple(int(t) for t in (*context, *target, *suffix))
        fixed = (True,) * len(context) + (False,) * len(target) + (True,) * len(suffix)
        return Row(tokens, fixed, int(row_id))


def bucket_length(n: int, limit: int | None = None) -> int:
    """The power of two from ``MIN_BUCKET`` up that holds ``n`` tokens (at most ``limit``)."""
    if limit is not None and n > limit:
        raise ValueError(f"a row of {n} tokens exceeds the model's {limit} positions")
    size = max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())
    return size if limit is None else min(size, limit)


def pack(rows: Sequence[Row], batch_rows: int, length: int) -> list[np.ndarray]:
    """``[tokens, fixed, segments, row_ids]`` of ``rows`` padded to ``[batch_rows, length]``:
    token 0, fixed and segment 0 at padding (1 on a row); the padding rows copy the first."""
    tokens = np.zeros((len(rows), length), np.int32)
    fixed = np.ones((len(rows), length), bool)
    segments = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        n = len(row.tokens)
        tokens[i, :n], fixed[i, :n], segments[i, :n] = row.tokens, row.fixed, 1
    ids = np.asarray([r.row_id for r in rows], np.int32)
    return [pad_rows(a, batch_rows) for a in (tokens, fixed, segments, ids)]


def by_span_length(rows: Sequence[Row], decode) -> list:
    """``decode(rows, n)`` on each group of ``rows`` whose spans are ``n`` tokens long (so that
    ``n`` can set the steps of the group); the spans back in the order of ``rows``."""
    spans, lengths = [None] * len(rows), [row.fixed.count(False) for row in rows]
    for n in sorted(set(lengths)):
        members = [k for k, m in enumerate(lengths) if m == n]
        for k, span in zip(members, decode([rows[k] for k in members], n)):
            spans[k] = span
    return spans


def _span_after_context(row: Row, decoder: str) -> int:
    """The length of ``row``'s span, checked to run from the end of a non-empty context to the
    end of the row (what ``decoder`` generates)."""
    n, free = len(row.fixed), row.fixed.count(False)
    if free and (free == n or not all(row.fixed[:n - free])):
        raise ValueError(f"{decoder} generates after a non-empty context only: infilling (a span"
                         " with fixed tokens after it) is not defined for it")
    return free


def _offsets(row_ids):
    """The ``row_offset`` that makes row ``b`` of a batch draw as global row ``row_ids[b]``."""
    return row_ids - jnp.arange(row_ids.shape[0], dtype=jnp.int32)


class Engine:
    """Scoring and decoding for one loaded model; ``batch_size`` rows per forward pass."""

    def __init__(self, model: LoadedModel, *, batch_size: int = 8, seed: int = 0):
        shards = model.batch_shards()
        self.model = model
        self.batch_size = -(-batch_size // shards) * shards
        self.seed = seed
        self.key = jax.random.key(seed)
        self._jitted: dict = {}
        self._limit = getattr(model.config, "max_positions", None)

    # --- plumbing ------------------------------------------------------------------------------

    def _jit(self, name, fn: Callable):
        """``fn`` jitted, once per ``name`` (which names everything ``fn`` closes over that
        varies between calls)."""
        return self._jitted.setdefault(name, jax.jit(fn))  # a new wrapper compiles nothing

    def _packed_batches(self, rows: Sequence[Row]):
        """``(rows of the batch, its ``pack`` on the mesh)`` for consecutive batches of
        ``batch_size`` rows, each padded to its own length bucket."""
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            longest = max(chunk, key=lambda r: len(r.tokens))
            try:
                length = bucket_length(len(longest.tokens), self._limit)
            except ValueError as e:  # name the item (row ids are item * ROW_STRIDE + choice)
                raise ValueError(f"item {longest.row_id // ROW_STRIDE}: {e}") from None
            yield chunk, [self.model.put_batch(a) for a in pack(chunk, self.batch_size, length)]

    def _run(self, rows: Sequence[Row], fn):
        """``fn(params, tokens, fixed, segments, row_ids)`` over batches (padding is fixed, so
        outside every span); returns the outputs (a tuple of ``[rows]`` host arrays) in the order
        of ``rows``."""
        outputs = []
        m = self.model
        with m.active():
            for chunk, batch in self._packed_batches(rows):
                out = fn(m.params, *batch)
                out = out if isinstance(out, tuple) else (out,)
                outputs.append(tuple(m.fetch(o)[:len(chunk)] for o in out))
        # per-row outputs ([rows]); per-position ones differ in length between batches: a list
        return tuple(np.concatenate(parts) if parts[0].ndim == 1 else
                     [row for part in parts for row in part] for parts in zip(*outputs))

    # --- scores ------------------------------------------------------------------------------

    def _span_score(self, rows, score, **options):
        """``score`` (``multiple_choice_score`` or ``conditional_nll``) of each row's non-fixed
        span given its context, ``[rows]``."""
        apply, mask = self.model.apply_fn, self.model.mask_token_id()

        def fn(params, tokens, fixed, segments, row_ids):
            return score(apply, params, tokens, fixed, self.key, mask_token_id=mask,
                         pattern=full(segments), row_offset=_offsets(row_ids), **options)
        return self._run(rows, self._jit((score.__name__, *options.items()), fn))[0]

    def diffusion_score(self, rows, *, num_levels: int = 32):
        """The reference's multiple-choice score of the span, ``[rows]``, lower is better."""
        return self._span_score(rows, multiple_choice_score, num_levels=num_levels)

    def conditional_nll(self, rows, *, num_draws: int = 128):
        """LLaDA's Monte-Carlo estimate of ``-log p(span | context)``, ``[rows]``."""
        return self._span_score(rows, conditional_nll, num_draws=num_draws)

    def conditional_elbo(self, rows, *, num_draws: int = 8, eps: float = DEFAULT_EPS):
        """Negative ELBO of the span given the context (docs/algorithms.md §5's bound with ``src`` =
        context): ``num_draws`` draws of ``t`` per row, stratified over the row's draws, each with
        its own noise of the span; ``(nelbo [rows], span tokens [rows])``, nats, averaged over
        draws. ``-nelbo`` lower-bounds ``log p(span | context)``."""
        apply, mask = self.model.apply_fn, self.model.mask_token_id()

        def fn(params, tokens, fixed, segments, row_ids):
            offsets = _offsets(row_ids)
            base = jax.random.fold_in(self.key, 0)
            u0 = jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(base, r), ()))(
                row_ids)

            def one_draw(draw):
                u = jnp.mod(u0 + draw.astype(jnp.float32) / num_draws, 1.0)
                t = (1.0 - eps) * u + eps
                noise = sample_noise_mask(jax.random.fold_in(self.key, draw + 1), t,
                                          tokens.shape[1], src=fixed, row_offset=offsets)
                logits = apply(params, apply_noise(tokens, noise, mask), full(segments))
                terms = per_sequence_terms(logits, tokens, NoisedBatch(t, noise, tokens),
                                           src=fixed)
                return terms["weighted"]

            draws = jnp.arange(num_draws, dtype=jnp.int32)
            span = (~fixed)[:, 1:].sum(axis=1).astype(jnp.float32)
            return jax.lax.map(one_draw, draws).mean(axis=0), span
        return self._run(rows, self._jit(("elbo", num_draws, eps), fn))

    def diffusion_greedy(self, rows):
        """Bool ``[rows]``: with the whole span masked, one pass's argmax (mask token excluded)
        reproduces the span (lm-eval's ``is_greedy`` for a diffusion model)."""
        apply, mask = self.model.apply_fn, self.model.mask_token_id()

        def fn(params, tokens, fixed, segments, row_ids):
            span = ~fixed & (jnp.arange(tokens.shape[1]) > 0)
            logits = apply(params, jnp.where(span, mask, tokens), full(segments))
            logits = jnp.where(jnp.arange(logits.shape[-1]) == mask, -jnp.inf, logits)
            guess = jnp.argmax(logits[:, :-1], axis=-1)
            hit = (guess == tokens[:, 1:]) | ~span[:, 1:]
            return hit.all(axis=1)
        return self._run(rows, self._jit("diffusion_greedy", fn))[0]

    def ar_logprob(self, rows):
        """AR (causal) log-probability of the span: ``(sum [rows], tokens [rows],
        greedy [rows])``, greedy = every span token is the argmax of its prediction."""
        apply = self.model.apply_fn

        def fn(params, tokens, fixed, segments, row_ids):
            logits = apply(params, tokens, causal(segments))
            scored = ~fixed[:, 1:]
            logp = -shifted_cross_entropy(logits, tokens)
            greedy = jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]
            return (jnp.where(scored, logp, 0.0).sum(axis=1),
                    scored.sum(axis=1).astype(jnp.float32),
                    (greedy | ~scored).all(axis=1))
        return self._run(rows, self._jit("ar", fn))

    # --- decoding ------------------------------------------------------------------------------

    def diffusion_decode(self, rows, *, sampler: str = "confidence", steps: int = 32,
                         temperature: float = 0.0, top_k=None, top_p=None,
                         ranking: str = "masked", confidence_temperature=None,
                         threshold: float = 0.9) -> list[list[int]]:
        """Fill each row's non-fixed positions with a diffusion sampler; returns the filled
        span of every row (token lists). ``steps`` is the number of denoising passes. On a
        block diffusion model the sampler runs inside the cached block decoder."""
        if self.model.config.block_size > 0:
            if ranking != "masked" or confidence_temperature is not None:
                raise ValueError("the reference ranking / tempered confidence options are not"
                                 " defined for a block diffusion model")
            return self._block_decode(rows, sampler=sampler, steps=steps,
                                      temperature=temperature, top_k=top_k, top_p=top_p,
                                      threshold=threshold)
        apply, mask = self.model.apply_fn, self.model.mask_token_id()
        outputs, m = [], self.model
        with m.active():
            for chunk, (tokens, fixed, segments, ids) in self._packed_batches(rows):
                longest = max(r.fixed.count(False) for r in chunk)
                fn, extra = sampler_call(sampler, steps=steps, generated=longest,
                                         threshold=threshold, ranking=ranking,
                                         confidence_temperature=confidence_temperature)
                out = fn(apply, m.params, tokens, fixed, self.key, mask_token_id=mask,
                         pattern=full(segments), temperature=temperature, top_k=top_k,
                         top_p=top_p, row_ids=ids, **extra)
                filled = m.fetch(out.tokens)[:len(chunk)]
                for row, values in zip(chunk, filled):
                    outputs.append([int(values[i]) for i, f in enumerate(row.fixed) if not f])
        return outputs

    def _block_decode(self, rows, **options) -> list[list[int]]:
        """``diffusion_decode`` of a block model: each row's span must run from the end of its
        context to the end of the row (no suffix: infilling is not defined for block models);
        rows are decoded ``batch_size`` at a time with the cached block decoder."""
        spans = [_span_after_context(row, "a block diffusion model") for row in rows]
        prompts = [list(row.tokens[:len(row.tokens) - k]) for row, k in zip(rows, spans)]
        outputs = []
        for start in range(0, len(rows), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            # the prompt width bucketed (a row's tokens do not depend on it), so fewer programs
            # compile; ``steps`` is spread over the blocks of the chunk's longest span
            width = bucket_length(max(len(p) for p in prompts[chunk]))
            out, _ = decode(self.model, prompts[chunk], new_tokens=max(1, *spans[chunk]),
                            width=width, seed=self.seed, stop_at_eos=False, timed=False,
                            row_ids=[r.row_id for r in rows[chunk]], **options)
            outputs += [[int(t) for t in tokens[:k]] for tokens, k in zip(out.tokens,
                                                                         spans[chunk])]
        return outputs

    def ar_decode(self, rows) -> list[list[int]]:
        """Greedy AR decoding of each row's non-fixed span (``_span_after_context``; one full
        forward pass per generated token, no KV cache)."""
        apply = self.model.apply_fn

        def fn(params, tokens, fixed, segments, row_ids):
            span = ~fixed
            first = jnp.argmax(span, axis=1)  # the span's first position per row
            count = span.sum(axis=1)
            rows_index = jnp.arange(tokens.shape[0])

            def step(k, x):
                logits = apply(params, x, causal(segments))
                position = jnp.minimum(first + k, x.shape[1] - 1)
                guess = jnp.argmax(logits[rows_index, position - 1], axis=-1)
                write = k < count
                value = jnp.where(write, guess.astype(x.dtype), x[rows_index, position])
                return x.at[rows_index, position].set(value)

            return jax.lax.fori_loop(0, count.max(), step, tokens)

        for row in rows:
            _span_after_context(row, "AR decoding")
        filled = self._run(rows, self._jit("ar_decode", fn))[0]
        return [[int(v[i]) for i, f in enumerate(r.fixed) if not f] for r, v in zip(rows, filled)]
