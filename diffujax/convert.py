"""``diffujax {convert,export,default-model}`` and ``tools/convert_torch_weights.py``: the
command-line faces of the checkpoint package (and of training checkpoints, which ``export`` also
takes). Each ``run_*`` returns the process exit code and prints a ``CheckpointError`` as one line
on stderr (exit code 1)."""

from __future__ import annotations

import argparse
import sys

from diffujax import console
from diffujax.checkpoint import convert, export, smollm2
from diffujax.checkpoint.errors import CheckpointError
from diffujax.train.checkpointing import export_hf, is_training_checkpoint


def add_convert_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("src", help="Hugging Face model directory (config.json + weights)")
    parser.add_argument("dst", help="diffujax checkpoint directory to create")
    parser.add_argument("--dtype", default="keep", choices=("keep", "float32", "bfloat16", "float16"),
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
    return parser


def add_default_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--cache-dir", default=None,
                        help="cache folder (default: $DIFFUJAX_CACHE or ~/.cache/diffujax)")
    return parser


def _report(fn) -> int:
    try:
        print(fn())
    except CheckpointError as e:
        console.error_line(e)  # one line (--debug: with the traceback)
        return 1
    return 0


def run_convert(args) -> int:
    return _report(lambda: convert(args.src, args.dst, dtype=args.dtype,
                                   mask_token_id=args.mask_token_id,
                                   no_mask_token=args.no_mask_token, overwrite=args.overwrite))


def run_export(args) -> int:
    """Export a model checkpoint, or a training run / training step (its model weights)."""
    exporter = export_hf if is_training_checkpoint(args.src) else export
    return _report(lambda: exporter(args.src, args.dst, max_shard_size=args.max_shard_size,
                                    dtype=args.dtype, overwrite=args.overwrite,
                                    naming=getattr(args, "names", None)))


def run_default_model(args) -> int:
    return _report(lambda: smollm2.default_model(args.cache_dir))


def tool_main(argv=None) -> int:
    """``convert_torch_weights.py SRC DST [...]`` converts; with ``--to-hf`` it exports."""
    argv = list(sys.argv[1:] if argv is None else argv)
    to_hf = "--to-hf" in argv
    parser = argparse.ArgumentParser(
        prog="convert_torch_weights.py",
        description="Hugging Face checkpoint -> diffujax checkpoint (or back with --to-hf).")
    parser.add_argument("--to-hf", action="store_true",
                        help="export a diffujax checkpoint SRC as a Hugging Face directory DST")
    (add_export_args if to_hf else add_convert_args)(parser)
    parser.add_argument("--debug", action="store_true", help="debug log records, tracebacks")
    args = parser.parse_args(argv)
    console.setup_logging(debug=args.debug)
    return (run_export if to_hf else run_convert)(args)
