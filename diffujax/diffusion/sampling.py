"""Samplers of the reverse process, docs/algorithms.md §6.

Every sampler fills a batch of canvases ``[B, L]``: positions in ``src`` keep their token, every
other position starts as the mask token and is committed once, for good. One loop iteration is
one forward pass; the loop is a ``lax.while_loop`` over static shapes (one compilation per shape
and setting) that stops as soon as nothing is masked. The docs/algorithms.md §1 shift applies: the
prediction for position ``j`` is read from the logits at ``j - 1``, so position 0 is never generated
and must hold a real token (BOS or the first prompt token).

Randomness: row ``b`` uses ``fold_in(key, row_ids[b])`` and step ``s`` folds ``s`` into that, so a
row's output depends only on its own canvas and key, never on the batch it is in (given a model
whose rows do not interact). Infilling is just a ``src`` with fixed positions anywhere.

The samplers are jitted with ``apply_fn`` static: pass the same function object each call.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffujax.attention.pattern import AttentionPattern, full
from diffujax.diffusion.categorical import filter_logits, sample_categorical


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleOutput:
    tokens: jax.Array  # [B, L] int32, every generated position committed
    forwards: jax.Array  # int32 scalar: forward passes run for the batch
    row_forwards: jax.Array  # [B] int32: forward passes during which the row still had masks
    # [B, L] int32: the step that committed the position, -1 if fixed (the canvas after step s
    # is ``tokens`` where ``0 <= commit_step <= s``, the mask token at the other generated ones)
    commit_step: jax.Array


# --- the canvas ----------------------------------------------------------------------------

def infill_canvas(head, span: int, mask_token_id: int, tail=()) -> tuple[np.ndarray, np.ndarray]:
    """One row to sample into, ``head + [mask] * span + tail`` (int32), and its ``src`` (True on
    the fixed tokens: all but the span). ``head[0]`` must be a real token (the §1 shift)."""
    tokens = np.asarray([*head, *[mask_token_id] * span, *tail], np.int32)
    src = np.ones(len(tokens), bool)
    src[len(head):len(head) + span] = False
    return tokens, src


# --- candidates ----------------------------------------------------------------------------

def draw_candidates(keys, logits, *, temperature, top_k, top_p, confidence_temperature=None):
    """Candidate token per position and its confidence: the log-probability of the candidate
    under the model's own (untempered, unfiltered) distribution. ``temperature == 0``: greedy.
    ``confidence_temperature``: score under ``softmax(logits / confidence_temperature)`` instead
    (the reference ranks by its sampling temperature's probability, greedy decoding included)."""
    if temperature == 0:
        candidates = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        candidates = jax.vmap(sample_categorical)(keys, filtered)
    if confidence_temperature is not None:
        logits = logits / confidence_temperature
    picked = jnp.take_along_axis(logits, candidates[..., None], axis=-1)[..., 0]
    return candidates, picked - jax.nn.logsumexp(logits, axis=-1)


def forbid(logits, token):
    """``logits [..., V]`` with ``token`` never drawn (the mask token: a revealed position must
    hold a real token)."""
    return jnp.where(jnp.arange(logits.shape[-1]) == token, -jnp.inf, logits)


# --- commit rules: (step, masked, confidence, keys, generate) -> positions to commit ----------

def lowest(scores, candidates, count):
    """Bool: the ``count[b]`` lowest-scoring ``candidates`` of each row (ties by position)."""
    scores = jnp.where(candidates, scores, jnp.inf)
    rank = jnp.argsort(jnp.argsort(scores, axis=-1, stable=True), axis=-1, stable=True)
    return candidates & (rank < count[:, None])


def ancestral_rule(steps):
    def rule(step, masked, confidence, keys, generate):
        # from level (s + 1) / T to s / T a masked position is revealed with probability 1 / (s + 1)
        s = steps - 1 - step
        u = jax.vmap(lambda k: jax.random.uniform(k, masked.shape[1:]))(keys)
        return masked & (u * (s + 1).astype(jnp.float32) < 1.0)
    return rule


RANKINGS = ("masked", "all")


def _confidence_rule(steps, ranking="masked"):
    """``ranking="masked"`` (diffujax): the ``keep`` lowest-confidence *masked* positions stay
    masked, so every step commits exactly the nominal schedule. ``"all"`` (the reference's
    ``generate_samples``): rank among all initially masked positions, committed ones included
    (scored by the fresh prediction, which is then discarded), and keep those strictly below the
    ``keep``-th smallest score; committed positions that rank low take up slots, so the step
    commits more than the schedule says."""
    if ranking not in RANKINGS:
        raise ValueError(f"ranking {ranking!r} is not one of {RANKINGS}")

    def rule(step, masked, confidence, keys, generate):
        # keep floor(N * s / T) lowest-confidence positions masked, N = initially masked count
        s = steps - 1 - step
        keep = generate.sum(axis=1) * s // steps
        if ranking == "masked":
            return masked & ~lowest(confidence, masked, keep)
        ranked = jnp.sort(jnp.where(generate, confidence, jnp.inf), axis=-1)
        cutoff = jnp.take_along_axis(ranked, keep[:, None], axis=-1)
        return masked & ~(generate & (confidence < cutoff))
    return rule


def most_confident_rule(per_pass):
    """The ``per_pass`` most confident masked positions of each row (all when fewer are left):
    the confidence ranking of block decoding (docs/algorithms.md §9)."""
    def rule(step, masked, confidence, keys, generate):
        left = masked.sum(axis=1)
        return masked & ~lowest(confidence, masked, jnp.maximum(left - per_pass, 0))
    return rule


def _block_index(generate, block_length):
    """Block of each generated position: its rank among the row's generated positions // size."""
    return (jnp.cumsum(generate, axis=1) - 1) // block_length


def _semi_ar_rule(steps_per_block, block_length):
    def rule(step, masked, confidence, keys, generate):
        # the confidence rule inside the current block; blocks go left to right
        in_block = generate & (_block_index(generate, block_length) == step // steps_per_block)
        s = steps_per_block - 1 - step % steps_per_block
        keep = in_block.sum(axis=1) * s // steps_per_block
        return masked & in_block & ~lowest(confidence, masked & in_block, keep)
    return rule


def threshold_rule(threshold, block_length):
    def rule(step, masked, confidence, keys, generate):
        eligible = masked
        if block_length is not None:
            # the leftmost block of the row that still has masked positions
            block = _block_index(generate, block_length)
            current = jnp.min(jnp.where(masked, block, jnp.iinfo(jnp.int32).max), axis=1)
            eligible = masked & (block == current[:, None])
        sure = eligible & (confidence > jnp.log(threshold))
        # at least one per step: the most confident eligible position
        best = jnp.argmax(jnp.where(eligible, confidence, -jnp.inf), axis=1)
        most_confident = eligible & (jnp.arange(masked.shape[1]) == best[:, None])
        return sure | most_confident
    return rule


# --- the loop ------------------------------------------------------------------------------

def _denoise(apply_fn, params, canvas, src, key, *, mask_token_id, pattern, max_steps, rule,
             temperature, top_k, top_p, row_ids, schedule_only: bool = False,
             confidence_temperature=None) -> SampleOutput:
    """The shared loop. ``schedule_only``: the rule ignores the model's confidence (ancestral),
    which lets a step that reveals nothing skip its forward pass."""
    batch, length = canvas.shape
    canvas = jnp.asarray(canvas, jnp.int32)
    first = jnp.arange(length) == 0
    generate = ~jnp.asarray(src, bool) & ~first[None, :]
    mask_token = jnp.asarray(mask_token_id, jnp.int32)
    pattern = full() if pattern is None else pattern
    rows = jnp.arange(batch) if row_ids is None else jnp.asarray(row_ids)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, rows.astype(jnp.int32))

    init = dict(step=jnp.int32(0), forwards=jnp.int32(0),
                x=jnp.where(generate, mask_token, canvas), masked=generate,
                commit_step=jnp.full((batch, length), -1, jnp.int32),
                row_forwards=jnp.zeros(batch, jnp.int32))

    def keep_going(state):
        return (state["step"] < max_steps) & state["masked"].any()

    def candidates_for(x, draw_keys):
        logits = forbid(apply_fn(params, x, pattern).astype(jnp.float32), mask_token)
        # aligned with the positions they predict: row j holds logits j - 1 (§1; row 0 a copy
        # of row 0, never used)
        logits = jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
        return draw_candidates(draw_keys, logits, temperature=temperature, top_k=top_k,
                                top_p=top_p, confidence_temperature=confidence_temperature)

    def one_pass(state):
        step, x, masked = state["step"], state["x"], state["masked"]
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        draw_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(step_keys, 0)
        rule_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(step_keys, 1)
        if schedule_only:
            # The positions to reveal do not depend on the model: a step that reveals nothing in
            # any row leaves the canvas as it is, so its forward pass is skipped (same output).
            commit = rule(step, masked, None, rule_keys, generate) & masked
            ran = commit.any()
            x_new = jax.lax.cond(ran, lambda: jnp.where(commit, candidates_for(x, draw_keys)[0], x),
                                 lambda: x)
        else:
            candidates, confidence = candidates_for(x, draw_keys)
            commit = rule(step, masked, confidence, rule_keys, generate) & masked
            ran, x_new = jnp.bool_(True), jnp.where(commit, candidates, x)
        return dict(step=step + 1, forwards=state["forwards"] + ran, x=x_new,
                    masked=masked & ~commit,
                    commit_step=jnp.where(commit, step, state["commit_step"]),
                    row_forwards=state["row_forwards"] + (masked.any(axis=1) & ran))

    final = jax.lax.while_loop(keep_going, one_pass, init)
    return SampleOutput(tokens=final["x"], forwards=final["forwards"],
                        row_forwards=final["row_forwards"], commit_step=final["commit_step"])


_STATIC = ("apply_fn", "steps", "temperature", "top_k", "top_p")


@functools.partial(jax.jit, static_argnames=_STATIC)
def sample_ancestral(apply_fn: Callable, params, canvas, src, key, *, mask_token_id: int,
                     steps: int, pattern: AttentionPattern | None = None,
                     temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, row_ids=None) -> SampleOutput:
    """The paper's Algorithm 2 ("random"): ``steps`` levels on a uniform grid; at each step every
    masked position is revealed with probability ``1 / (s + 1)`` with a candidate drawn from the
    model, so after the last step (s = 0) all are revealed."""
    return _denoise(apply_fn, params, canvas, src, key, mask_token_id=mask_token_id,
                    pattern=pattern, max_steps=steps, rule=ancestral_rule(steps),
                    temperature=temperature, top_k=top_k, top_p=top_p, row_ids=row_ids,
                    schedule_only=True)


@functools.partial(jax.jit, static_argnames=_STATIC + ("ranking", "confidence_temperature"))
def sample_confidence(apply_fn: Callable, params, canvas, src, key, *, mask_token_id: int,
                      steps: int, pattern: AttentionPattern | None = None,
                      temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, row_ids=None, ranking: str = "masked",
                      confidence_temperature: float | None = None) -> SampleOutput:
    """Confidence ranking, MaskGIT style (the reference's conditional sampler): after step
    ``T - s`` the ``floor(N * s / T)`` masked positions whose candidates have the lowest
    log-probability stay masked and the rest are committed. ``temperature=0`` is greedy and
    deterministic.

    Reference parity (``generate_samples`` of HKUNLP/DiffuLLaMA): ``ranking="all"`` ranks among
    all initially masked positions (see ``_confidence_rule``) and ``confidence_temperature=tau``
    scores candidates by ``softmax(logits / tau)`` (the reference's ``logits_temp``, also when
    it decodes greedily). The defaults are diffujax's rule: the nominal schedule, untempered."""
    return _denoise(apply_fn, params, canvas, src, key, mask_token_id=mask_token_id,
                    pattern=pattern, max_steps=steps, rule=_confidence_rule(steps, ranking),
                    temperature=temperature, top_k=top_k, top_p=top_p, row_ids=row_ids,
                    confidence_temperature=confidence_temperature)


@functools.partial(jax.jit, static_argnames=_STATIC + ("block_length",))
def sample_semi_ar(apply_fn: Callable, params, canvas, src, key, *, mask_token_id: int,
                   steps: int, block_length: int, pattern: AttentionPattern | None = None,
                   temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None, row_ids=None) -> SampleOutput:
    """LLaDA semi-autoregressive decoding: the generated positions of each row, in order, form
    blocks of ``block_length``; the confidence rule runs ``steps`` passes per block, blocks left
    to right (a block is complete before the next one starts)."""
    max_blocks = -(-(canvas.shape[1] - 1) // block_length)
    return _denoise(apply_fn, params, canvas, src, key, mask_token_id=mask_token_id,
                    pattern=pattern, max_steps=max_blocks * steps,
                    rule=_semi_ar_rule(steps, block_length), temperature=temperature,
                    top_k=top_k, top_p=top_p, row_ids=row_ids)


@functools.partial(jax.jit, static_argnames=_STATIC + ("threshold", "block_length"))
def sample_threshold(apply_fn: Callable, params, canvas, src, key, *, mask_token_id: int,
                     threshold: float = 0.9, block_length: int | None = None,
                     pattern: AttentionPattern | None = None, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None, row_ids=None,
                     steps: int | None = None) -> SampleOutput:
    """Confidence-threshold parallel decoding (Fast-dLLM): each pass commits every masked
    position whose candidate has probability above ``threshold``, and at least the most
    confident one, until nothing is masked; ``forwards`` counts the passes. With
    ``block_length`` it works on the leftmost unfinished block of each row only.
    ``steps`` caps the passes (default: one per position, which always suffices)."""
    max_steps = canvas.shape[1] if steps is None else steps
    return _denoise(apply_fn, params, canvas, src, key, mask_token_id=mask_token_id,
                    pattern=pattern, max_steps=max_steps,
                    rule=threshold_rule(threshold, block_length), temperature=temperature,
                    top_k=top_k, top_p=top_p, row_ids=row_ids)
