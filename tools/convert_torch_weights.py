#!/usr/bin/env python
"""Convert Hugging Face (PyTorch) weights to a diffujax checkpoint, or back with --to-hf.

    tools/convert_torch_weights.py SRC DST [--dtype keep|float32|bfloat16]
                                           [--mask-token-id N | --no-mask-token] [--overwrite]
    tools/convert_torch_weights.py --to-hf SRC DST [--max-shard-size 5GB] [--overwrite]

Same as ``diffujax convert`` / ``diffujax export``.
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

from diffujax import arguments, console  # noqa: E402
from diffujax.commands.convert import run_convert, run_export  # noqa: E402


def main(argv=None) -> int:
    """``convert_torch_weights.py SRC DST [...]`` converts; with ``--to-hf`` it exports."""
    argv = list(sys.argv[1:] if argv is None else argv)
    to_hf = "--to-hf" in argv
    parser = argparse.ArgumentParser(
        prog="convert_torch_weights.py", formatter_class=arguments.HelpFormatter,
        description="Hugging Face checkpoint -> diffujax checkpoint (or back with --to-hf).")
    parser.add_argument("--to-hf", action="store_true",
                        help="export a diffujax checkpoint SRC as a Hugging Face directory DST")
    (arguments.add_export_args if to_hf else arguments.add_convert_args)(parser)
    parser.add_argument("--debug", action="store_true", help="debug log records, tracebacks")
    args = parser.parse_args(argv)
    console.setup_logging(debug=args.debug)
    return (run_export if to_hf else run_convert)(args)


if __name__ == "__main__":
    sys.exit(main())
