"""Helpers of the task tests: the tiny vocabulary, plain implementations of the scores, stubs."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from diffujax.attention.pattern import full

V, UNK, MASK, EOS = 64, 61, 62, 63  # w0..w60, <unk>, <mask>, <eos> (also BOS)

_apply = {}


def logits_of(model, tokens, pattern):
    if id(model) not in _apply:
        _apply[id(model)] = jax.jit(model.apply_fn)
    logits = _apply[id(model)](model.params, jnp.asarray([tokens], jnp.int32), pattern)
    return np.asarray(logits[0], np.float64)


def plain_reference_score(model, row, *, seed: int, levels: int = 32):
    """docs/algorithms.md §5 on one row: for k = T..1 noise the span at rate k/T with the uniforms
    that the row's key gives, unweighted mean ce over noised positions (shifted), empty levels
    skipped."""
    tokens = np.asarray(row.tokens)
    span = ~np.asarray(row.fixed) & (np.arange(len(tokens)) > 0)
    key = jax.random.key(seed)
    total = 0.0
    for k in range(levels, 0, -1):
        level_key = jax.random.fold_in(jax.random.fold_in(key, k), 1)
        u = np.asarray(jax.random.uniform(jax.random.fold_in(level_key, row.row_id),
                                          (len(tokens),)))
        noise = (u < np.float32(k / levels)) & span
        if not noise.any():
            continue
        logp = special.log_softmax(logits_of(model, np.where(noise, MASK, tokens), full()), -1)
        ce = [-logp[j - 1, tokens[j]] for j in np.flatnonzero(noise)]
        total += np.mean(ce)
    return total / levels




class CharTokenizer:
    """One token per character (ids = code points + 2; 0 mask, 1 BOS/EOS): round-trips any text,
    so tests can feed the runner exact completions."""

    bos_id = eos_id = pad_id = 1

    def encode(self, text):
        return [ord(c) + 2 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 2) for i in ids if i >= 2)


class ScriptedEngine:
    """An engine whose decoders return scripted spans: ``answers[row_id]`` (token lists),
    recording the rows it was asked for. For the runner's bookkeeping (counting, parsing,
    execution); the real engine is tested against plain implementations in test_engine.py."""

    batch_size = 4

    def __init__(self, answers):
        self.answers, self.seen = answers, []

    def _decode(self, rows, **kwargs):
        self.seen.extend(rows)
        return [list(self.answers[r.row_id]) for r in rows]

    diffusion_decode = ar_decode = _decode
