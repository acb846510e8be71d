"""Decoding speed: full-recompute diffusion sampling vs the cached block decoder vs AR decoding
with a KV cache, on the same model and prompts (docs/algorithms.md §6, §9).

    python benchmarks/decoding.py                # SmolLM2-135M: prompt 64, 256 new tokens, B 1, 8
    python benchmarks/decoding.py --json         # the table as JSON on the last line
    python benchmarks/decoding.py --tiny         # a random tiny LLaMA: a smoke run in seconds

Decoders (greedy, no EOS stop, so every row produces all its tokens):

- ``full recompute``: today's ``semi_ar`` sampler (``sample_semi_ar``), which runs the whole
  canvas (prompt + every new position) through the model at each pass, here under the block
  attention mask ``full().with_blocks(N)``, ``--steps-per-block`` passes per block;
- ``cached confidence``: the cached block decoder with the same rule (the ``ceil(N / steps)`` most
  confident positions per pass): the same denoising passes, each running one block of ``N``
  tokens against the KV cache, plus one prefill pass and a commit pass between blocks. It
  commits the same tokens as the row above (printed as a check: ``same tokens``);
- ``cached threshold``: the cached decoder with Fast-dLLM's confidence threshold
  (``--threshold``); its pass count depends on how confident the model is (an AR checkpoint
  that was never adapted to diffusion is rarely confident, so it is close to one per token);
- ``AR + KV cache``: the same decoder with blocks of one token: one prefill pass, then one pass
  per token.

SmolLM2 is an AR checkpoint, not a trained block model: the timings do not depend on the
weights, but the tokens and the threshold decoder's pass counts do. Reported per batch size:
new tokens per second over the batch (``B * new / seconds``, compilation excluded, best of
``--repeats``), forward passes per new token (per row), and the speed ratios against the full
recompute and against AR decoding.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffujax.attention.pattern import full
from diffujax.diffusion import sample_semi_ar
from diffujax.diffusion.decoding import canvas_length, decode_blocks
from diffujax.models import LlamaConfig, apply_fn_for, cached_fn_for, init_cache, init_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = LlamaConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=128, max_positions=128, mask_token_id=127, bos_token_id=0,
                   eos_token_id=1, tie_word_embeddings=False)


def smollm2():
    """``(config, params, prompt tokens source)``: the embedded default model, float32."""
    from diffujax.checkpoint import load
    from diffujax.checkpoint.smollm2 import default_model
    from diffujax.data.tokenizer import load_tokenizer

    path = default_model()
    config, params = load(path, dtype="float32")
    text = load_tokenizer(path).encode((ROOT / "README.md").read_text())
    return config, params, np.asarray(text, np.int32)


def tiny():
    params = init_params(TINY, seed=0)
    params = jax.tree.map(lambda x: x * 4.0, params)  # peaked: greedy choices are no near-ties
    source = np.random.default_rng(0).integers(2, TINY.vocab_size - 1, 4096).astype(np.int32)
    return TINY, params, source


def prompts(config, source, batch: int, length: int) -> np.ndarray:
    """``batch`` prompts of ``length`` tokens: BOS, then consecutive windows of ``source``."""
    rows = np.stack([source[i * 97:i * 97 + length - 1] for i in range(batch)])
    bos = config.bos_token_id if config.bos_token_id is not None else int(source[0])
    return np.concatenate([np.full((batch, 1), bos, np.int32), rows], axis=1)


def best_time(run, repeats: int):
    """(result of the last run, fastest seconds) of ``repeats`` runs after the compile."""
    times, out = [], None
    for _ in range(repeats):
        begin = time.perf_counter()
        out = jax.block_until_ready(run())
        times.append(time.perf_counter() - begin)
    return out, min(times)


def full_recompute(config, params, prompt, args):
    batch, width = prompt.shape
    canvas = np.full((batch, width + args.new_tokens), config.mask_token_id, np.int32)
    canvas[:, :width] = prompt
    src = np.zeros(canvas.shape, bool)
    src[:, :width] = True
    traced = dict(mask_token_id=config.mask_token_id,
                  pattern=full().with_blocks(args.block_size))
    static = dict(steps=args.steps_per_block, block_length=args.block_size, temperature=0.0)
    fn = sample_semi_ar.lower(apply_fn_for(config), params, canvas, src, jax.random.key(0),
                              **traced, **static).compile()
    out, seconds = best_time(lambda: fn(params, canvas, src, jax.random.key(0), **traced),
                             args.repeats)
    return np.asarray(out.tokens)[:, width:], int(out.forwards), seconds


def cached(config, params, prompt, args, *, block_size, sampler, steps=None, threshold=0.9):
    batch, width = prompt.shape
    length = canvas_length(width, args.new_tokens, block_size)
    lengths = np.full(batch, width, np.int32)
    cached_fn = cached_fn_for(config)
    static = dict(block_size=block_size, new_tokens=args.new_tokens,
                  mask_token_id=config.mask_token_id, sampler=sampler, steps=steps,
                  threshold=threshold)
    fn = decode_blocks.lower(cached_fn, params, prompt, lengths, init_cache(config, batch, length),
                             jax.random.key(0), **static).compile()
    caches = [init_cache(config, batch, length) for _ in range(args.repeats)]  # each is donated
    out, seconds = best_time(lambda: fn(params, prompt, lengths, caches.pop(),
                                        jax.random.key(0)), args.repeats)
    return np.asarray(out.tokens), int(out.forwards), seconds


DECODERS = ("AR + KV cache", "cached confidence", "cached threshold", "full recompute")


def run_decoder(name, config, params, prompt, args):
    """``(tokens, forward passes, seconds)`` of one decoder (the module docstring's list)."""
    n = args.block_size
    if name == "full recompute":
        return full_recompute(config, params, prompt, args)
    if name == "AR + KV cache":
        return cached(config, params, prompt, args, block_size=1, sampler="confidence", steps=1)
    if name == "cached confidence":
        return cached(config, params, prompt, args, block_size=n, sampler="confidence",
                      steps=args.steps_per_block)
    return cached(config, params, prompt, args, block_size=n, sampler="threshold",
                  threshold=args.threshold)


def measure(config, params, source, batch: int, args) -> list[dict]:
    """One row per decoder at this batch size, each printed as soon as it is measured (a slow
    machine may not finish them all)."""
    prompt = jnp.asarray(prompts(config, source, batch, args.prompt_length))
    new, runs, rows = args.new_tokens, {}, []
    for name in args.decoders:
        runs[name] = run_decoder(name, config, params, prompt, args)
        print(f"  measured: batch {batch}, {name}: {runs[name][1]} passes, "
              f"{runs[name][2]:.2f} s", flush=True)
    rate_of = {name: batch * new / seconds for name, (_, _, seconds) in runs.items()}
    same = None
    if "full recompute" in runs and "cached confidence" in runs:
        same = bool((runs["full recompute"][0] == runs["cached confidence"][0]).all())
    for name, (_, forwards, _) in runs.items():
        ratio = lambda other: (round(rate_of[name] / rate_of[other], 2)  # noqa: E731
                               if other in rate_of else None)
        rows.append(dict(batch=batch, decoder=name, tokens_per_second=round(rate_of[name], 2),
                         passes_per_token=round(forwards / new, 3), forward_passes=forwards,
                         vs_full_recompute=ratio("full recompute"), vs_ar=ratio("AR + KV cache"),
                         same_tokens=(same if name in ("full recompute", "cached confidence")
                                      else None)))
    return rows


def print_table(rows) -> None:
    print(f"{'batch':>5}  {'decoder':<17} {'tokens/s':>9} {'passes/token':>12} "
          f"{'vs full':>8} {'vs AR':>6}")
    ratio = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
    for r in rows:
        print(f"{r['batch']:>5}  {r['decoder']:<17} {r['tokens_per_second']:>9.1f} "
              f"{r['passes_per_token']:>12.3f} {ratio(r['vs_full_recompute']):>8} "
              f"{ratio(r['vs_ar']):>6}")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="a random tiny LLaMA, prompt 8, 16 new tokens, blocks of 4")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-length", type=int, default=None, help="default 64 (tiny: 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 256 (tiny: 16)")
    parser.add_argument("--block-size", type=int, default=None, help="default 32 (tiny: 4)")
    parser.add_argument("--steps-per-block", type=int, default=None,
                        help="full recompute and cached confidence: passes per block (default"
                             " N / 4: four tokens per pass)")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--decoders", nargs="+", choices=DECODERS, default=list(DECODERS),
                        help="which decoders to run, in this order (default: all)")
    parser.add_argument("--json", action="store_true", help="the table as JSON on the last line")
    args = parser.parse_args(argv)
    defaults = (8, 16, 4) if args.tiny else (64, 256, 32)
    args.prompt_length = args.prompt_length or defaults[0]
    args.new_tokens = args.new_tokens or defaults[1]
    args.block_size = args.block_size or defaults[2]
    args.steps_per_block = args.steps_per_block or max(1, args.block_size // 4)
    if args.prompt_length % args.block_size or args.new_tokens % args.block_size:
        parser.error("--prompt-length and --new-tokens must be multiples of --block-size (the"
                     " full-recompute sampler counts its blocks from the first new token)")

    config, params, source = tiny() if args.tiny else smollm2()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; "
          f"{'tiny LLaMA' if args.tiny else 'SmolLM2-135M'}, prompt {args.prompt_length}, "
          f"{args.new_tokens} new tokens, blocks of {args.block_size}, "
          f"{args.steps_per_block} passes per block (confidence), threshold {args.threshold}")
    rows = [r for b in args.batch_sizes for r in measure(config, params, source, b, args)]
    print_table(rows)
    checks = [r["same_tokens"] for r in rows if r["same_tokens"] is not None]
    if checks:
        print(f"cached confidence commits the same tokens as the full recompute: {all(checks)}")
    if args.json:
        print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
