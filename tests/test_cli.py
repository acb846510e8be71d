"""The command line's own face: every subcommand's ``--help`` answers without importing the heavy
libraries (checked on a fresh interpreter's ``sys.modules``, not on a clock), shows every option's
default, and ``--version`` prints the installed package's version."""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from diffujax import arguments, cli

REPO = Path(__file__).parents[1]
HEAVY = ("jax", "orbax", "grain", "torch", "tensorflow", "transformers")

# Prints the --help text on stdout, then (stderr) the heavy libraries that building it imported.
PROBE = """
import json, sys
from diffujax import cli
try:
    cli.main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})), file=sys.stderr)
"""


def _help(*argv: str) -> tuple[str, list[str]]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-c", PROBE.format(heavy=set(HEAVY)), *argv],
                         capture_output=True, text=True, env=env, timeout=120)
    return run.stdout, json.loads(run.stderr.strip().splitlines()[-1])


HELP_CASES = list(cli.COMMANDS)


@pytest.mark.integration
@pytest.mark.parametrize("command", [None, *HELP_CASES])
def test_help_imports_no_heavy_library(command):
    text, heavy = _help(*([command] if command else []), "--help")
    assert text.startswith("usage: diffujax"), text
    assert heavy == [], f"diffujax {command or ''} --help imported {heavy[:8]}"


def _option_blocks(text: str) -> dict[str, str]:
    """Each option's lines of a --help text, keyed by its first option string."""
    blocks, current = {}, None
    for line in text.splitlines():
        match = re.match(r"  (-[-\w]+)", line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return {k: re.sub(r"\s+", " ", v) for k, v in blocks.items()}


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = cli.build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("command", [c for c in cli.COMMANDS if c != "lm-eval"])
def test_help_shows_every_default(command):
    """Every option that takes a value (not required) says its default: the value argparse
    will use, or in words where the help explains it."""
    parser = _subparser(command)
    blocks = _option_blocks(parser.format_help())
    checked = 0
    for action in parser._actions:
        if not action.option_strings or action.required or action.nargs == 0:
            continue
        block = blocks[action.option_strings[0]]
        assert "default" in block, f"diffujax {command} --help: {block!r} shows no default"
        if "default" not in (action.help or ""):  # not explained in words: the value itself
            shown = "none" if action.default is None else str(action.default) or "''"
            assert f"default: {shown})" in block or block.endswith(f"default: {shown}"), block
        checked += 1
    assert checked >= 1


def test_help_default_is_the_value_used():
    """Spot check against known values: the default shown is the one a run gets."""
    blocks = _option_blocks(_subparser("eval").format_help())
    assert "(default: 1024)" in blocks["--seq-len"] and "default: 0" in blocks["--seed"]
    args = cli.build_parser(["eval"]).parse_args(["eval", "--checkpoint", "c", "--text", "t"])
    assert args.seq_len == 1024 and args.seed == 0 and args.mesh == "auto"


@pytest.mark.parametrize("command, required", [
    ("generate", ["--checkpoint", "c"]),
    ("tasks", ["--checkpoint", "c", "--task", "lambada", "--data", "d"])])
@pytest.mark.parametrize("old, new", [("topk", "confidence"), ("blocks", "semi_ar")])
def test_former_sampler_names_are_refused_with_the_new_one(capsys, command, required, old, new):
    """No alias: a former name stops the command (exit 2) with one line naming the new name;
    the new name parses."""
    parser = cli.build_parser([command])
    with pytest.raises(SystemExit) as done:
        parser.parse_args([command, *required, "--sampler", old])
    assert done.value.code == 2
    assert f"--sampler: the {old} sampler is now called {new}" in capsys.readouterr().err
    assert parser.parse_args([command, *required, "--sampler", new]).sampler == new


def test_version_is_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"diffujax {importlib.metadata.version('diffujax')}"


def test_sampler_names_agree_with_the_samplers():
    from diffujax.inference import generation  # imports jax: only here, where the lists meet

    assert arguments.SAMPLERS == generation.SAMPLERS
    assert arguments.DIFFUSION_SAMPLERS == generation.DIFFUSION_SAMPLERS
    assert arguments.RENAMED_SAMPLERS == generation.RENAMED_SAMPLERS
    assert arguments.DEFAULT_BLOCK_LENGTH == generation.DEFAULT_BLOCK_LENGTH


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_each_runner_calls_the_run_function_of_its_command_module(command):
    """A runner imports its command's module only when called, so a misspelt name would surface
    only then (default-model and demo run in no quick test): read each runner instead."""
    source = textwrap.dedent(inspect.getsource(cli.COMMANDS[command].run))
    imported, returned = ast.parse(source).body[0].body
    module_name = f"{imported.module}.{imported.names[0].name}"
    assert module_name.startswith("diffujax.commands.")
    if command == "lm-eval":
        pytest.importorskip("lm_eval")  # an optional extra
    module = importlib.import_module(module_name)
    function = returned.value.func.attr
    assert function == f"run_{command.replace('-', '_')}" and callable(getattr(module, function))
