"""``diffujax`` command line: convert | export | default-model | eval | generate | tasks |
lm-eval | train | plan | demo.

``COMMANDS`` names each subcommand's help, its arguments (``arguments.add_<name>_args``, light
imports only) and its runner (the functions above it), which imports the command's module
(``diffujax/commands/``) and calls its ``run_<name>(args) -> int``. These are the package's only imports of a diffujax
module inside a function (``tools/import_graph.py`` allows them in ``cli`` alone): a command's
module loads jax, so importing it only to run it keeps ``--help`` quick and lets a command run
without another command's optional extra (lm-eval).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from typing import Callable, NamedTuple

import yaml

from diffujax import arguments, console
from diffujax.parallel.tpu_env import quiet_libtpu_without_tpu


def _convert(args) -> int:
    from diffujax.commands import convert
    return convert.run_convert(args)


def _export(args) -> int:
    from diffujax.commands import convert
    return convert.run_export(args)


def _default_model(args) -> int:
    from diffujax.commands import convert
    return convert.run_default_model(args)


def _eval(args) -> int:
    from diffujax.commands import evaluate
    return evaluate.run_eval(args)


def _generate(args) -> int:
    from diffujax.commands import generate
    return generate.run_generate(args)


def _tasks(args) -> int:
    from diffujax.commands import tasks
    return tasks.run_tasks(args)


def _lm_eval(argv) -> int:
    from diffujax.commands import lm_eval
    return lm_eval.run_lm_eval(argv)


def _train(args) -> int:
    from diffujax.commands import train
    return train.run_train(args)


def _plan(args) -> int:
    from diffujax.commands import plan
    return plan.run_plan(args)


def _demo(args) -> int:
    from diffujax.commands import demo
    return demo.run_demo(args)


class Command(NamedTuple):
    help: str  # one line
    add_args: Callable  # (parser) -> None: the subcommand's arguments
    run: Callable  # (args) -> exit status (lm-eval: the arguments after it, unparsed)


COMMANDS = {
    "convert": Command(
        "Hugging Face directory -> diffujax checkpoint",
        arguments.add_convert_args, _convert),
    "export": Command(
        "diffujax checkpoint -> Hugging Face safetensors",
        arguments.add_export_args, _export),
    "default-model": Command(
        "materialise and convert the embedded SmolLM2-135M-Instruct; print its path",
        arguments.add_default_model_args, _default_model),
    "eval": Command(
        "perplexity: AR or diffusion ELBO bound",
        arguments.add_eval_args, _eval),
    "generate": Command(
        "sample or infill text with a diffusion sampler",
        arguments.add_generate_args, _generate),
    "tasks": Command(
        "the paper's tasks (Lambada, HellaSwag, ..., GSM8K) from local files",
        arguments.add_tasks_args, _tasks),
    "lm-eval": Command(
        "lm-evaluation-harness with the diffujax model",
        arguments.add_lm_eval_args, _lm_eval),
    "train": Command(
        "diffusion (pre-)training from a YAML config",
        arguments.add_train_args, _train),
    "plan": Command(
        "compile a run for a Cloud TPU slice here: HBM, collectives, est. MFU",
        arguments.add_plan_args, _plan),
    "demo": Command(
        "the README's main job on the embedded default model",
        arguments.add_demo_args, _demo),
}


DEBUG_HELP = "debug log records, and a traceback with any error"


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
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help,
                           formatter_class=arguments.HelpFormatter)
        # Also accepted after the command; SUPPRESS keeps `diffujax --debug CMD` working.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        if name == wanted:  # only the arguments of the subcommand being run
            command.add_args(p)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_libtpu_without_tpu()  # before any command starts JAX (no E0000 noise on a CPU machine)
    if argv[:1] == ["lm-eval"] and not {"-h", "--help"} & set(argv[1:2]):
        return int(_lm_eval(argv[1:]) or 0)  # lm-eval parses its own arguments
    args = build_parser(argv).parse_args(argv)
    console.setup_logging(debug=args.debug)
    try:
        return int(COMMANDS[args.command].run(args) or 0)
    except (OSError, ValueError, yaml.YAMLError) as e:
        # Bad input: one clear line naming what is at fault, non-zero exit (--debug: traceback).
        console.error_line(e, f"diffujax {args.command}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
