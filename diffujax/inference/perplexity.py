"""Perplexity of token blocks under a loaded model: AR (exact) or diffusion (ELBO bound,
docs/algorithms.md §5; the block NELBO of §9 for a block model). ``diffujax eval``
(``commands/evaluate.py``) and the demo call it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from diffujax import console, paths
from diffujax.diffusion import ar_nll_terms, elbo_terms, summarize_nll
from diffujax.diffusion.blocks import effective_block_size
from diffujax.runtime import LoadedModel, pad_rows


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
        fn = jax.jit(lambda p, x, key, offset: ar_nll_terms(model.apply_fn, p, x))
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
    starts = console.progress(range(0, len(rows), batch_size), desc=f"eval {objective}",
                              unit="batch")
    with model.active():
        for start in starts:
            chunk = rows[start:start + batch_size]  # one compiled shape: the last one padded
            batch = model.put_batch(pad_rows(chunk, batch_size))
            out = fn(model.params, batch, key, jnp.int32(start))
            nll.append(model.fetch(out[0])[:len(chunk)])
            targets.append(model.fetch(out[1])[:len(chunk)])
    nll, targets = np.concatenate(nll), np.concatenate(targets)
    if objective == "ar":
        return summarize_nll(nll, targets, num_draws=0)
    nll, targets = nll.reshape(draws, len(blocks)), targets.reshape(draws, len(blocks))
    if len(blocks) > 1:
        # Rows of one block share its data: average its draws and count blocks as the units.
        return summarize_nll(nll.mean(axis=0), targets[0], num_draws=draws)
    est = summarize_nll(nll[:, 0], targets[:, 0], num_draws=draws)
    return dataclasses.replace(est, num_tokens=int(targets[0, 0]), num_sequences=1)
