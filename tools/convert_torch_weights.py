#!/usr/bin/env python
"""Convert Hugging Face (PyTorch) weights to a diffujax checkpoint, or back with --to-hf.

    tools/convert_torch_weights.py SRC DST [--dtype keep|float32|bfloat16]
                                           [--mask-token-id N | --no-mask-token] [--overwrite]
    tools/convert_torch_weights.py --to-hf SRC DST [--max-shard-size 5GB] [--overwrite]

Same as ``diffujax convert`` / ``diffujax export``.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

from diffujax.convert import tool_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(tool_main())
