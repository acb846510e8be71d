"""Every subcommand's command-line arguments, with light imports only (argparse, the task list,
the mesh arguments): ``diffujax CMD --help`` builds its parser from here without importing jax,
orbax, grain or torch, which the command's own module (``cli.COMMANDS``) loads only to run it.

``HelpFormatter`` shows every option's default in ``--help``."""

from __future__ import annotations

import argparse
import copy
import importlib.resources
import pathlib

from diffujax.parallel.arguments import add_mesh_args
from diffujax.tasks.formats import OBJECTIVES, TASKS

# inference/generation.py's SAMPLERS, RENAMED_SAMPLERS and DEFAULT_BLOCK_LENGTH, spelled here so
# that `--help` need not import the samplers (tests/test_cli.py checks that they agree).
DIFFUSION_SAMPLERS = ("ancestral", "confidence", "semi_ar", "threshold")  # tasks can use these
SAMPLERS = DIFFUSION_SAMPLERS + ("ar",)
RENAMED_SAMPLERS = {"topk": "confidence", "blocks": "semi_ar"}
DEFAULT_BLOCK_LENGTH = 32
PLAN_WHAT = ("train", "eval", "generate", "decode")
# The demo's default text, shipped inside the package (the GNU GPL v3, verbatim: its own terms
# allow that); commands/demo.py reads it from here.
DEMO_TEXT = pathlib.Path(str(importlib.resources.files("diffujax"))) / "assets" / "gpl-3.0.txt"
DTYPES = ("float32", "bfloat16")


def sampler_name(value: str) -> str:
    """``--sampler``'s type: a former sampler name is refused with its new one (argparse then
    checks the choices)."""
    if value in RENAMED_SAMPLERS:
        raise argparse.ArgumentTypeError(f"the {value} sampler is now called"
                                         f" {RENAMED_SAMPLERS[value]}")
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; every option's help ends with its default unless it
    already speaks of it (required options, flags and positionals have none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.required or action.nargs == 0 or not action.option_strings
                or "default" in text):
            return text
        shown = ("none" if action.default is None else "''" if action.default == ""
                 else "%(default)s")
        return f"{text} (default: {shown})" if text else f"default: {shown}"

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help:  # argparse shows no help for an empty one: show the default alone
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


def add_convert_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("src", help="Hugging Face model directory (config.json + weights), or a"
                        " Hub id org/name[@revision], fetched into the Hugging Face cache"
                        " (HF_HUB_OFFLINE=1: from the cache only)")
    parser.add_argument("dst", help="diffujax checkpoint directory to create")
    parser.add_argument("--dtype", default="keep",
                        choices=("keep", "float32", "bfloat16", "float16"),
                        help="parameter dtype (keep: the file's)")
    mask = parser.add_mutually_exclusive_group()
    mask.add_argument("--mask-token-id", type=int, default=None,
                      help="mask token id (DiffuGPT-S 10541, DiffuGPT-M 50257, DiffuLLaMA 811);"
                           " vocab_size adds a new token. Default: config.json's mask_token_id,"
                           " else the tokenizer's mask token, else a fresh <|mask|> token")
    mask.add_argument("--no-mask-token", action="store_true",
                      help="leave the vocabulary untouched (pure AR use, bit-exact round trips)")
    parser.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    return parser


def add_export_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("src", help="diffujax checkpoint directory")
    parser.add_argument("dst", help="Hugging Face model directory to create")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="split the safetensors file above this size (e.g. 5GB, 500MB)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="cast the weights (default: as stored)")
    parser.add_argument("--names", default=None, choices=("transformers", "bare", "diffugpt"),
                        help="tensor naming (default: that of the converted source)")
    parser.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    parser.add_argument("--adapter", action="store_true",
                        help="a LoRA training run: write its adapters as a PEFT LoRA adapter"
                             " (adapter_config.json + adapter_model.safetensors) instead of the"
                             " merged model")
    return parser


def add_default_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--cache-dir", default=None,
                        help="cache folder (default: $DIFFUJAX_CACHE or ~/.cache/diffujax)")
    return parser


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """What every command that runs a checkpoint takes last: its dtype, the seed, ``--json``, the
    mesh."""
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute and parameter dtype (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    add_mesh_args(p)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="diffujax checkpoint directory")
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("--objective", choices=("ar", "diffusion"), default="diffusion")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per block")
    p.add_argument("--blocks", type=int, default=None,
                   help="score only the first BLOCKS x SEQ_LEN tokens (default: the whole file,"
                        " as many SEQ_LEN blocks as it holds)")
    p.add_argument("--draws", type=int, default=16,
                   help="diffusion: noise draws per block (t stratified over all draws)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows per forward pass (rounded up to a multiple of the mesh's batch"
                        " shards)")
    p.add_argument("--block-size", type=int, default=None,
                   help="diffusion: score as a block model with blocks of this many tokens"
                        " (default: the checkpoint's own block size; 0: the full-sequence bound)")
    _add_run_args(p)


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="diffujax checkpoint directory")
    p.add_argument("--prompt", default="", help="fixed text before the generated span")
    p.add_argument("--suffix", default=None, help="fixed text after the span (infilling)")
    p.add_argument("--length", type=int, default=64, help="tokens to generate")
    p.add_argument("--infill-length", type=int, default=None,
                   help="with --suffix: tokens to infill (overrides --length)")
    p.add_argument("--sampler", type=sampler_name, choices=SAMPLERS, default=None,
                   help="default: confidence; threshold on a block diffusion model (cached block"
                        " decoder); ar: AR decoding with a KV cache")
    p.add_argument("--ar", action="store_true", help="the same as --sampler ar")
    p.add_argument("--steps", type=int, default=64,
                   help="denoising steps (forward passes; a block model spreads them evenly"
                        " over its blocks)")
    p.add_argument("--block-length", type=int, default=None,
                   help=f"semi_ar sampler: block size (default {DEFAULT_BLOCK_LENGTH}; a block"
                        " model uses its own)")
    p.add_argument("--threshold", type=float, default=0.9, help="threshold sampler: confidence")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: 1 for ancestral, 0 otherwise)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--keep-after-eos", action="store_true", help="do not cut text at EOS")
    _add_run_args(p)


def add_tasks_args(p: argparse.ArgumentParser) -> None:
    p.epilog = "task files (--data):\n" + "\n".join(
        f"  {name:11s} {spec.data}" for name, spec in TASKS.items())
    p.add_argument("--checkpoint", required=True, help="diffujax checkpoint directory")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--data", required=True, help="the task's file, in its distributed format")
    p.add_argument("--limit", type=int, default=None, help="the first N items only")
    p.add_argument("--objective", choices=OBJECTIVES, default="diffusion",
                   help="diffusion (the adapted model) or ar (the base model, causal)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows per forward pass (rounded up to the mesh's batch shards)")
    p.add_argument("--levels", type=int, default=32,
                   help="multiple choice, diffusion: noise levels T of the score")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising passes (default: Lambada the word's token count, GSM8K 64,"
                        " otherwise 32)")
    p.add_argument("--sampler", type=sampler_name, choices=DIFFUSION_SAMPLERS,
                   default="confidence")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--reference-parity", action="store_true",
                   help="score and sample as the reference's evaluation scripts did, for"
                        " numbers comparable with the paper (README: Tasks)")
    p.add_argument("--logits-temp", type=float, default=0.95,
                   help="--reference-parity: the reference's temperature (DiffuGPT 0.95,"
                        " DiffuLLaMA 0.9)")
    p.add_argument("--seq-len", type=int, default=256, help="GSM8K: canvas length")
    p.add_argument("--sep-id", type=int, default=None,
                   help="GSM8K: the separator token of the SFT data (configs/gsm8k_sft_*.yaml)")
    p.add_argument("--pad-id", type=int, default=None,
                   help="GSM8K: the padding token of the SFT data (default: the tokenizer's)")
    p.add_argument("--timeout", type=float, default=10.0, help="HumanEval: seconds per program")
    p.add_argument("--per-item", default=None,
                   help="JSON lines of every item's result; an existing file with the same"
                        " settings is resumed")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto")
    _add_run_args(p)


def add_lm_eval_args(p: argparse.ArgumentParser) -> None:
    p.description = ("lm-evaluation-harness's command line (lm_eval run ...) with the diffujax"
                     " model registered and the Hugging Face hub offline; every argument after"
                     " 'lm-eval' goes to lm_eval")


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.epilog = (
        "example: diffujax train --config configs/tiny.yaml train.steps=50 output_dir=runs/t\n\n"
        "Rerunning the same command resumes from the newest usable checkpoint in output_dir.\n"
        "Exit status: 0 done, 3 too many consecutive non-finite steps (last good state saved),\n"
        "143/130 SIGTERM/SIGINT (checkpoint saved first).")
    parser.add_argument("--config", metavar="PATH",
                        help="run config (YAML); see configs/ (default: every key's default)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. train.steps=100 optimizer.peak_lr=1e-4")
    return parser


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.epilog = ("example: diffujax plan --config configs/diffugpt_s.yaml --topology v5litepod-8\n"
                "Compiles with the real TPU compiler on this machine (no TPU, no weights, no"
                " data).\nExit status: 0 fits, 1 does not fit, 2 bad input.")
    p.add_argument("--config", metavar="PATH", required=True, help="run config (YAML)")
    p.add_argument("--topology", metavar="SLICE", default=None,
                   help="Cloud TPU slice, e.g. v4-8, v5litepod-16, v5p-128, v6e-8 (default: the"
                        " config's plan.topology)")
    p.add_argument("--num-slices", type=int, default=None,
                   help="slices over DCN (default: mesh.num_slices)")
    p.add_argument("--what", choices=PLAN_WHAT, default="train",
                   help="the train step, the eval step, the sampler, or one pass of a block"
                        " model's cached decoder (default: %(default)s)")
    p.add_argument("--batch", type=int, default=None,
                   help="--what decode: rows per pass (default: one per batch shard of the"
                        " mesh)")
    p.add_argument("--context", type=int, default=None,
                   help="--what decode: KV-cache positions the block attends to, rounded up"
                        " to whole blocks (default: the config's data.seq_len)")
    p.add_argument("--fit", action="store_true",
                   help="search grad_accum_steps, remat and loss_chunk for the fastest setting"
                        " that fits")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", default=str(DEMO_TEXT),
                   help="text file to score (default: the GPL-3 text bundled with diffujax,"
                        " %(default)s)")
    p.add_argument("--seq-len", type=int, default=64, help="evaluation block length")
    p.add_argument("--blocks", type=int, default=4, help="evaluation blocks")
    p.add_argument("--draws", type=int, default=8, help="ELBO noise draws per block")
    p.add_argument("--train-steps", type=int, default=None,
                   help="adaptation steps (default: those of the bundled"
                        " smollm2_135m_demo.yaml); 0 skips")
    p.add_argument("--output-dir", default=None,
                   help="where the run and the export go (default: a new temporary folder)")
