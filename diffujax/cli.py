"""``diffujax`` command line: convert | export | default-model | eval | generate | tasks |
lm-eval | train | plan | demo.

Each subcommand's arguments are ``arguments.add_<name>_args(parser)`` (light imports only) and
its work is ``run_<name>(args) -> int`` in the module named in ``COMMANDS``, imported only to run
it, so ``--help`` answers without importing jax.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

import yaml

from diffujax import arguments, console
from diffujax.parallel.tpu_env import quiet_libtpu_without_tpu

# subcommand -> (module, one-line help)
COMMANDS = {
    "convert": ("diffujax.convert", "Hugging Face directory -> diffujax checkpoint"),
    "export": ("diffujax.convert", "diffujax checkpoint -> Hugging Face safetensors"),
    "default-model": ("diffujax.convert",
                      "materialise and convert the embedded SmolLM2-135M-Instruct; print its path"),
    "eval": ("diffujax.evaluate", "perplexity: AR or diffusion ELBO bound"),
    "generate": ("diffujax.generate", "sample or infill text with a diffusion sampler"),
    "tasks": ("diffujax.tasks.command", "the paper's tasks (Lambada, HellaSwag, ..., GSM8K)"
              " from local files"),
    "lm-eval": ("diffujax.tasks.harness", "lm-evaluation-harness with the diffujax model"),
    "train": ("diffujax.train.loop", "diffusion (pre-)training from a YAML config"),
    "plan": ("diffujax.plan", "compile a run for a Cloud TPU slice here: HBM, collectives, est. MFU"),
    "demo": ("diffujax.demo", "the README's main job on the embedded default model"),
}


DEBUG_HELP = "debug log records, and a traceback with any error"


def _fn(command: str, verb: str):
    name = f"{verb}_{command.replace('-', '_')}" + ("_args" if verb == "add" else "")
    if verb == "add":
        return getattr(arguments, name)
    return getattr(importlib.import_module(COMMANDS[command][0]), name)


def _version() -> str:
    try:
        return f"diffujax {importlib.metadata.version('diffujax')}"
    except importlib.metadata.PackageNotFoundError:
        return "diffujax (version unknown: the package is not installed)"


def build_parser(argv) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffujax", description=__doc__.splitlines()[0],
                                     formatter_class=arguments.HelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=arguments.HelpFormatter)
        # Also accepted after the command; SUPPRESS keeps `diffujax --debug CMD` working.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        if name == wanted:  # only import the module of the subcommand being run
            _fn(name, "add")(p)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_libtpu_without_tpu()  # before any command starts JAX (no E0000 noise on a CPU machine)
    if argv[:1] == ["lm-eval"] and not {"-h", "--help"} & set(argv[1:2]):
        return int(_fn("lm-eval", "run")(argv[1:]) or 0)  # lm-eval parses its own arguments
    args = build_parser(argv).parse_args(argv)
    console.setup_logging(debug=args.debug)
    try:
        return int(_fn(args.command, "run")(args) or 0)
    except (OSError, ValueError, yaml.YAMLError) as e:
        # Bad input: one clear line naming what is at fault, non-zero exit (--debug: traceback).
        console.error_line(e, f"diffujax {args.command}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
