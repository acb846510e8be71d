"""Print diffujax's package import graph and check that it is acyclic and points downward.

    python tools/import_graph.py             # package edges, then any problem; exit 1 on one
    python tools/import_graph.py --modules   # module edges instead
    python tools/import_graph.py --deferred  # also list imports made inside functions

Reads the source with ``ast`` (nothing is imported). Every ``import diffujax...`` /
``from diffujax...`` counts wherever it sits, except under ``if TYPE_CHECKING:`` (never runs).
Problems (``problems()``, also run by tests/test_import_graph.py):

- a cycle between modules or between packages;
- an edge that points up ``LAYERS`` (a package may import its own layer's packages only when
  that makes no cycle) or a package missing from ``LAYERS``;
- an import inside a function: of a diffujax module (it hides an edge) other than those
  ``DEFERRED_COMMANDS`` allows, or of a third-party module not in ``DEFERRABLE`` (imports belong
  at the top unless optional or heavy by design).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = "diffujax"

# Bottom to top; a package imports only packages of its own layer or below.
LAYERS = (
    # JSON; kernels; mesh; local paths vs bucket URLs; what a person sees (logs, errors, bars,
    # whether a text reads as text)
    ("diffujax.plain", "diffujax.attention", "diffujax.parallel", "diffujax.paths",
     "diffujax.console", "diffujax.processes", "diffujax.readability"),
    ("diffujax.models", "diffujax.diffusion"),  # networks; the diffusion math
    # tokenizers and pipelines; checkpoint formats; run operations (lock, run dir, logs, FLOPs)
    ("diffujax.data", "diffujax.checkpoint", "diffujax.runs"),
    ("diffujax.config",),  # the run config tree
    ("diffujax.train", "diffujax.runtime"),  # training; a checkpoint loaded for inference
    ("diffujax.inference", "diffujax.plan"),  # perplexity and sampling; the TPU run planner
    ("diffujax.tasks",),  # the paper's tasks and the lm-eval model (on inference's pieces)
    ("diffujax.commands", "diffujax.arguments"),  # one module per subcommand; their arguments
    ("diffujax.cli", "diffujax.api"),  # the command line; the Python API (commands as functions)
)

# The one exception to "diffujax imports at the top": the command line imports each command's
# module (which loads jax) in the function that runs it, so --help stays quick. The edges still
# count for cycles and layers.
DEFERRED_COMMANDS = ("diffujax.cli", "diffujax.commands")

# Third-party modules that may be imported inside a function: optional extras or heavy imports
# that only one path needs (each such import says why on its line or the line above).
DEFERRABLE = ("torch", "transformers", "tensorflow_datasets", "array_record", "libtpu", "wandb",
              "huggingface_hub")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, third_party: list):
    """Yield ``(imported diffujax module, deferred?)`` for every import in one module's tree and
    append ``(top-level name, line)`` of each function-level third-party import to
    ``third_party``. ``from pkg import name`` yields ``pkg.name`` (the caller trims it to ``pkg``
    when ``name`` is no module)."""
    here = module.split(".") if is_package else module.split(".")[:-1]

    def statements(node, deferred):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                children = child.orelse  # the TYPE_CHECKING branch never runs
            else:
                children = [child]
            for c in children:
                yield c, deferred
                inside = deferred or isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                    ast.Lambda))
                yield from statements(c, inside)

    for node, deferred in statements(tree, False):
        if isinstance(node, ast.Import):
            names = [(alias.name, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            names = [(base, f"{base}.{alias.name}" if alias.name != "*" else base)
                     for alias in node.names]
        else:
            continue
        for top_name, target in names:
            if top_name.split(".")[0] == PACKAGE:
                yield target, deferred
            elif deferred:
                third_party.append((top_name.split(".")[0], node.lineno))


def build_graph(root: Path, third_party: dict | None = None):
    """{module: {imported module: deferred?}} over every module under root/diffujax; fills
    ``third_party`` with {module: [(name, line)]} of function-level third-party imports."""
    files = {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}
    graph: dict[str, dict[str, bool]] = {}
    for mod, path in files.items():
        edges: dict[str, bool] = {}
        tree = ast.parse(path.read_text(), filename=str(path))
        found: list = []
        for target, deferred in _imports(tree, mod, path.name == "__init__.py", found):
            while target not in files and "." in target:  # `from pkg import name`, name no module
                target = target.rsplit(".", 1)[0]
            if target != mod and target in files:
                edges[target] = edges.get(target, True) and deferred
        graph[mod] = edges
        if third_party is not None and found:
            third_party[mod] = found
    return graph


def package_of(module: str) -> str:
    """`diffujax.data.sources` -> `diffujax.data`; top-level modules stand for themselves."""
    parts = module.split(".")
    return ".".join(parts[:2])


def cycles(graph: dict[str, dict[str, bool]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def package_graph(graph):
    """Edges between subpackages (`diffujax.data` -> `diffujax.config`), a package's own __init__
    importing its modules excluded."""
    out: dict[str, set[str]] = {}
    for mod, edges in graph.items():
        for target in edges:
            a, b = package_of(mod), package_of(target)
            if a != b:
                out.setdefault(a, set()).add(b)
    return out


def problems(root: Path) -> list[str]:
    """Every cycle, upward edge, unplaced package and misplaced function-level import."""
    third_party: dict = {}
    graph = build_graph(Path(root), third_party)
    pg = package_graph(graph)
    out = [f"module cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    out += [f"package cycle: {' <-> '.join(c)}"
            for c in cycles({k: dict.fromkeys(v) for k, v in pg.items()})]
    layer = {pkg: i for i, names in enumerate(LAYERS) for pkg in names}
    for pkg in sorted({package_of(m) for m in graph} - {PACKAGE}):
        if pkg not in layer:
            out.append(f"{pkg} is in no layer: add it to LAYERS in tools/import_graph.py")
    for pkg, targets in sorted(pg.items()):
        for target in sorted(targets):
            if pkg in layer and target in layer and layer[target] > layer[pkg]:
                out.append(f"upward import: {pkg} (layer {layer[pkg]}) -> {target}"
                           f" (layer {layer[target]})")
    importer, commands = DEFERRED_COMMANDS
    for mod, edges in sorted(graph.items()):
        out += [f"function-level import of {t} in {mod}: import it at the top"
                for t, deferred in sorted(edges.items()) if deferred
                and not (mod == importer and package_of(t) == commands)]
    for mod, found in sorted(third_party.items()):
        out += [f"function-level import of {name} in {mod} (line {line}): import it at the top,"
                f" or add it to DEFERRABLE if it is optional or heavy by design"
                for name, line in found if name not in DEFERRABLE]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument("--deferred", action="store_true",
                        help="list imports made inside functions")
    parser.add_argument("--modules", action="store_true",
                        help="print module edges, not package edges")
    args = parser.parse_args(argv)
    graph = build_graph(Path(args.root))
    if args.modules:
        for mod in sorted(graph):
            for target in sorted(graph[mod]):
                print(f"{mod} -> {target}")
    else:
        pg = package_graph(graph)
        for pkg in sorted(pg):
            print(f"{pkg} -> {', '.join(sorted(pg[pkg]))}")
    if args.deferred:
        print("\ndeferred (function-level) imports:")
        for mod in sorted(graph):
            for target, deferred in sorted(graph[mod].items()):
                if deferred:
                    print(f"  {mod} -> {target}")
    found = problems(Path(args.root))
    for line in found:
        print("PROBLEM: " + line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
