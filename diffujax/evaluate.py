"""``diffujax eval``: perplexity of a text file, AR (exact) or diffusion (ELBO bound,
docs/algorithms.md §5; the block NELBO of §9 for a block model)."""

from __future__ import annotations

import dataclasses
import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffujax import console, paths
from diffujax.diffusion import NLLEstimate, ar_nll_terms, elbo_terms, summarize_nll
from diffujax.diffusion.blocks import effective_block_size
from diffujax.runtime import (LoadedModel, checkpoint_config, load_from_args,
                              max_positions, pad_rows, require)


def read_blocks(tokenizer, path: str, seq_len: int, blocks: int | None = None) -> np.ndarray:
    """The first ``blocks * seq_len`` tokens of a file as ``[blocks, seq_len]`` (``None``: every
    whole block in the file; fewer blocks if the file is short; an error if it has less than one
    block). Tokens after the last whole block are not scored."""
    try:
        text = paths.resolve(path).read_bytes().decode("utf-8")  # a local file or a URL
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    ids = tokenizer.encode(text)
    available = len(ids) // seq_len if blocks is None else min(blocks, len(ids) // seq_len)
    if available == 0:
        raise ValueError(f"{path}: {len(ids)} tokens, fewer than one block of --seq-len {seq_len}")
    return np.asarray(ids[: available * seq_len], np.int32).reshape(available, seq_len)


def _batches(rows: np.ndarray, batch_size: int):
    """Fixed-size batches (one compiled shape); the last is padded with copies of row 0."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        yield start, len(chunk), pad_rows(chunk, batch_size)


def eval_block_size(config, seq_len: int, block_size: int | None = None) -> int:
    """The block size the diffusion bound is computed with (0: the whole sequence):
    ``block_size``, else the model config's (``diffusion.block_size`` of the run that trained
    it), shorter than ``seq_len`` (docs/algorithms.md §9)."""
    return effective_block_size(config.block_size if block_size is None else block_size, seq_len)


def evaluate(model: LoadedModel, blocks: np.ndarray, *, objective: str, draws: int = 1,
             batch_size: int = 8, seed: int = 0, block_size: int | None = None):
    """NLL estimate over ``blocks``. Diffusion: every block is scored ``draws`` times, one row per
    (draw, block), draw-major, with ``t`` stratified across all rows (MDLM protocol), so each
    block's draws are spread over the whole range of ``t``. The error bar is over blocks (each
    averaged over its draws), or over the draws when there is a single block (then it measures
    the Monte-Carlo error only). Each row's noise follows from its index among all rows, so the
    numbers do not depend on ``batch_size`` or the mesh (up to float rounding). A block model
    (``eval_block_size``) is scored with the block NELBO, one ``t`` per block, stratified the
    same way per block."""
    shards = model.batch_shards()
    batch_size = -(-batch_size // shards) * shards
    if objective == "ar":
        fn = jax.jit(lambda p, x: ar_nll_terms(model.apply_fn, p, x))
        rows = blocks
    else:
        mask_id = model.mask_token_id()
        rows = np.tile(blocks, (draws, 1))
        block = eval_block_size(model.config, blocks.shape[1], block_size)
        fn = jax.jit(lambda p, x, key, offset: elbo_terms(
            model.apply_fn, p, x, key, mask_token_id=mask_id, row_offset=offset,
            global_batch=len(rows), block_size=block))
    key = jax.random.key(seed)
    nll, targets = [], []
    bar = console.progress(_batches(rows, batch_size), total=-(-len(rows) // batch_size),
                           desc=f"eval {objective}", unit="batch")
    with model.active():
        for start, count, batch in bar:
            batch = model.put_batch(batch)
            if objective == "ar":
                out = fn(model.params, batch)
            else:
                out = fn(model.params, batch, key, jnp.int32(start))
            nll.append(model.fetch(out[0])[:count])
            targets.append(model.fetch(out[1])[:count])
    nll, targets = np.concatenate(nll), np.concatenate(targets)
    if objective == "ar":
        return summarize_nll(nll, targets, num_draws=0)
    nll, targets = nll.reshape(draws, len(blocks)), targets.reshape(draws, len(blocks))
    if len(blocks) > 1:
        # Rows of one block share its data: average its draws and count blocks as the units.
        return summarize_nll(nll.mean(axis=0), targets[0], num_draws=draws)
    est = summarize_nll(nll[:, 0], targets[:, 0], num_draws=draws)
    return dataclasses.replace(est, num_tokens=int(targets[0, 0]), num_sequences=1)


def check_eval_args(args, config) -> None:
    """Every argument in its valid range, before the weights are loaded (``config``: the
    checkpoint's model config)."""
    limit = max_positions(config)
    require(args.seq_len >= 2, "--seq-len", args.seq_len, ">= 2 (position 0 is never scored)")
    require(limit is None or args.seq_len <= limit, "--seq-len", args.seq_len,
            f"<= {limit}, the model's maximum positions")
    require(args.blocks is None or args.blocks >= 1, "--blocks", args.blocks, ">= 1")
    require(args.draws >= 1, "--draws", args.draws, ">= 1")
    require(args.batch_size >= 1, "--batch-size", args.batch_size, ">= 1")
    require(args.seed >= 0, "--seed", args.seed, ">= 0")
    require(args.block_size is None or 0 <= args.block_size <= args.seq_len, "--block-size",
            args.block_size, f"in 0..{args.seq_len} (--seq-len {args.seq_len}; 0: the whole"
            " sequence)")


def run_eval(args) -> int:
    check_eval_args(args, checkpoint_config(args))
    return print_score(args, score(args, load_from_args(args)))


class Score(NamedTuple):
    """What ``diffujax eval`` reports: the estimate, the blocks scored ``[blocks, seq_len]``
    and the block size of the bound (0: the whole sequence, or AR)."""
    estimate: NLLEstimate
    blocks: np.ndarray
    block_size: int


def score(args, model: LoadedModel) -> Score:
    """The work of ``diffujax eval`` on a loaded model, its arguments already checked
    (``check_eval_args``)."""
    blocks = read_blocks(model.tokenizer, args.text, args.seq_len, args.blocks)
    est = evaluate(model, blocks, objective=args.objective, draws=args.draws,
                   batch_size=args.batch_size, seed=args.seed, block_size=args.block_size)
    block = 0 if args.objective == "ar" else eval_block_size(model.config, args.seq_len,
                                                             args.block_size)
    return Score(est, blocks, block)


def metrics(args, result: Score) -> dict:
    """The numbers ``diffujax eval --json`` prints."""
    est = result.estimate
    stderr = 0.0 if args.objective == "ar" else est.std_error
    return {"nelbo": est.mean_nll, "stderr": stderr, "perplexity": est.perplexity,
            "tokens": est.num_tokens, "draws": est.num_draws, "block_size": result.block_size}


def print_score(args, result: Score) -> int:
    est, blocks, block = result
    if jax.process_index() != 0:  # every process computed the same numbers; one prints them
        return 0
    if args.json:
        print(json.dumps(metrics(args, result)))
    else:
        kind = ("AR perplexity" if args.objective == "ar" else
                f"block diffusion ELBO perplexity bound (blocks of {block})" if block else
                "diffusion ELBO perplexity bound")
        print(f"{kind} of {args.text} ({blocks.shape[0]} x {blocks.shape[1]} tokens"
              f"{'' if args.blocks else ', the whole file but its last partial block'}): {est}")
    return 0
