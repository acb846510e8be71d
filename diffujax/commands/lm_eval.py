"""``diffujax lm-eval ARGS``: lm-evaluation-harness's own command line, offline, with the
``--model diffujax`` of ``tasks/harness.py`` registered (importing it registers it)."""

from __future__ import annotations

import argparse
import os
import sys

from diffujax import console
from diffujax.tasks import harness  # noqa: F401  (registers the model; names the missing extra)

# After the harness: without lm-eval installed, its import error names the extra to install.
from lm_eval.__main__ import cli_evaluate  # noqa: E402


def run_lm_eval(argv) -> int:
    """Hand ``argv`` (the arguments after ``diffujax lm-eval``) to lm-eval's own CLI."""
    if isinstance(argv, argparse.Namespace):
        argv = []
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except (OSError, ValueError) as e:  # bad model_args, files: one line, as every command
        console.error_line(e, "diffujax lm-eval")
        return 2
    finally:
        sys.argv = saved
    return 0
