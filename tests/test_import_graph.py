"""The package's import graph is acyclic and downward (tools/import_graph.py is the reference).

The checker is tested on small synthetic packages first, so a pass on diffujax means something.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import re
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)


def _package(tmp_path, files: dict[str, str]) -> pathlib.Path:
    for name, text in files.items():
        path = tmp_path / "diffujax" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for d in (tmp_path / "diffujax").rglob("*"):
        if d.is_dir() and not (d / "__init__.py").exists():
            (d / "__init__.py").write_text("")
    (tmp_path / "diffujax" / "__init__.py").touch()
    return tmp_path


def test_checker_finds_a_hidden_cycle_an_upward_edge_and_deferred_imports(tmp_path):
    root = _package(tmp_path, {
        "data/sources.py": """
            def make():
                from diffujax.data.pretokenize import Reader  # hidden edge closing a cycle
                return Reader
            """,
        "data/pretokenize.py": "from diffujax.data.sources import make\n",
        "parallel/mesh.py": "from diffujax.config import X\n",  # layer 0 -> layer 3
        "config.py": """
            import typing
            if typing.TYPE_CHECKING:
                from diffujax.train import loop  # never runs: no edge
            def f():
                import torch  # optional: allowed
                import yaml  # not optional: must be at the top
            """,
        "train/loop.py": "",
    })
    found = import_graph.problems(root)
    assert "module cycle: diffujax.data.pretokenize <-> diffujax.data.sources" in found
    assert "upward import: diffujax.parallel (layer 0) -> diffujax.config (layer 3)" in found
    assert any("function-level import of diffujax.data.pretokenize in diffujax.data.sources"
               in p for p in found)
    assert any("function-level import of yaml in diffujax.config" in p for p in found)
    assert not any("torch" in p or "diffujax.train" in p for p in found), found
    assert len(found) == 4, found


def test_checker_names_a_package_cycle_and_an_unplaced_package(tmp_path):
    root = _package(tmp_path, {
        "models/a.py": "from diffujax.diffusion import b\n",
        "diffusion/b.py": "import diffujax.models.c\n",
        "models/c.py": "",
        "newthing/x.py": "",
    })
    found = import_graph.problems(root)
    assert "package cycle: diffujax.diffusion <-> diffujax.models" in found
    assert any(p.startswith("diffujax.newthing is in no layer") for p in found)


def test_diffujax_import_graph_is_acyclic_and_downward():
    assert import_graph.problems(ROOT) == []


def test_the_readme_design_section_lists_the_layers():
    """The README's numbered layer list is ``LAYERS``: the same packages, in the same order."""
    text = (ROOT / "README.md").read_text()
    start = text.index("Imports point down a fixed stack of layers")
    block = text[start:text.index("Modules import at the top", start)]
    listed = [tuple(f"diffujax.{name}" for name in re.findall(r"`(\w+)`", names))
              for names in re.findall(r"^\d+\. ([^:]+):", block, re.M)]
    assert listed == list(import_graph.LAYERS)


def test_only_cli_may_import_a_command_module_inside_a_function_and_the_edge_still_counts(
        tmp_path):
    root = _package(tmp_path, {
        "cli.py": """
            def run_generate(args):
                from diffujax.commands import generate  # the one allowed deferred import
                return generate.run_generate(args)
            def run_train(args):
                from diffujax.commands.train import run_train
                return run_train(args)
            def config():
                from diffujax.config import X  # not a command module
                return X
            """,
        "commands/generate.py": """
            def run_generate(args):
                from diffujax.commands import plan  # a command module, but not in cli
                return plan
            """,
        "commands/plan.py": "",
        "commands/train.py": "from diffujax import cli\n",  # closes a cycle through cli
        "config.py": "X = 1\n",
    })
    found = import_graph.problems(root)
    deferred = sorted(p for p in found if p.startswith("function-level"))
    assert deferred == [
        "function-level import of diffujax.commands.plan in diffujax.commands.generate:"
        " import it at the top",
        "function-level import of diffujax.config in diffujax.cli: import it at the top"], found
    assert "module cycle: diffujax.cli <-> diffujax.commands.train" in found
    assert any(p.startswith("upward import: diffujax.commands") for p in found), found


def test_the_planner_reaches_no_metric_writer():
    """``diffujax plan`` and the FLOP arithmetic (``runs/flops.py``) import no logging backend:
    no module they reach, their packages' ``__init__`` included, imports tensorboardX or W&B."""
    graph = import_graph.build_graph(ROOT)
    start = [m for m in graph if m.startswith("diffujax.plan")] + ["diffujax.runs.flops"]
    reached, todo = set(), list(start)
    while todo:
        mod = todo.pop()
        if mod in reached:
            continue
        reached.add(mod)
        parents = [mod.rsplit(".", i)[0] for i in range(1, mod.count(".") + 1)]
        todo += [m for m in graph[mod]] + [p for p in parents if p in graph]
    assert "diffujax.runs.metrics" not in reached and "diffujax.plan.search" in reached
    writers = {"tensorboardX", "wandb"}
    for mod in sorted(reached):
        path = ROOT / (mod.replace(".", "/") + ".py")
        path = path if path.exists() else ROOT / mod.replace(".", "/") / "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not {n.split(".")[0] for n in names} & writers, (mod, names)
