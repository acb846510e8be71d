"""``diffujax eval``: perplexity of a text file, AR (exact) or diffusion (ELBO bound,
docs/algorithms.md §5; the block NELBO of §9 for a block model). The arguments' checks and the
printing; the scoring itself is ``inference/perplexity.py``."""

from __future__ import annotations

import json
import jax
import numpy as np

from diffujax.diffusion import NLLEstimate
from diffujax.inference.perplexity import eval_block_size, evaluate, read_blocks
from diffujax.runtime import (LoadedModel, checkpoint_config, load_from_args, require,
                              require_at_least)


def check_eval_args(args, config) -> None:
    """Every argument in its valid range, before the weights are loaded (``config``: the
    checkpoint's model config)."""
    require(args.seq_len >= 2, "--seq-len", args.seq_len, ">= 2 (position 0 is never scored)")
    require(args.seq_len <= config.max_positions, "--seq-len", args.seq_len,
            f"<= {config.max_positions}, the model's maximum positions")
    require_at_least(args, blocks=1, draws=1, batch_size=1, seed=0)
    require(args.block_size is None or 0 <= args.block_size <= args.seq_len, "--block-size",
            args.block_size, f"in 0..{args.seq_len} (--seq-len {args.seq_len}; 0: the whole"
            " sequence)")


def run_eval(args) -> int:
    check_eval_args(args, checkpoint_config(args))
    return print_score(args, score(args, load_from_args(args)))


def score(args, model: LoadedModel) -> tuple[NLLEstimate, np.ndarray, int]:
    """The work of ``diffujax eval`` on a loaded model, its arguments already checked
    (``check_eval_args``): the estimate, the blocks scored ``[blocks, seq_len]`` and the block
    size of the bound (0: the whole sequence, or AR)."""
    blocks = read_blocks(model.tokenizer, args.text, args.seq_len, args.blocks)
    est = evaluate(model, blocks, objective=args.objective, draws=args.draws,
                   batch_size=args.batch_size, seed=args.seed, block_size=args.block_size)
    block = 0 if args.objective == "ar" else eval_block_size(model.config, args.seq_len,
                                                             args.block_size)
    return est, blocks, block


def metrics(args, result) -> dict:
    """The numbers ``diffujax eval --json`` prints (``result``: ``score``'s)."""
    est, _, block = result
    stderr = 0.0 if args.objective == "ar" else est.std_error
    return {"nelbo": est.mean_nll, "stderr": stderr, "perplexity": est.perplexity,
            "tokens": est.num_tokens, "draws": est.num_draws, "block_size": block}


def print_score(args, result) -> int:
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
