"""The shape of the code: no import cycles in the core, no module reaching into another's
private names, heavy optional packages imported only where needed, and the examples in the
core's docstrings run.

The import graph is read from the source (every ``import`` statement, at any depth, those
under ``TYPE_CHECKING`` included), so a cycle hidden inside a function counts too.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import networkx as nx
import pytest
from conftest import ROOT

#: where each import package of this repository lives
PACKAGES = {
    "graphopt": ROOT / "graphopt",
    "graphopt.passes": ROOT / "passes",
    "graphopt_lowrank": ROOT / "plugins" / "graphopt-lowrank" / "graphopt_lowrank",
}

#: private names imported across modules that the prune package's restructuring (issue 15,
#: item 1: typed accessors for node.args) removes; nothing may be added to this list
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str, str]] = set()


def _modules() -> dict[str, Path]:
    """Every module of the repository's packages by dotted name (graphopt.passes from the
    passes/ folder, as installed)."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[tuple[str, str | None, int]]:
    """``(module, imported name or None, line)`` for every import in a module, relative
    imports resolved; ``from package import submodule`` yields the submodule."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:
                    yield sub, None, node.lineno
                else:
                    yield base, alias.name, node.lineno


def _import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for name, path in MODULES.items():
        graph.add_node(name)
        for target, _, _ in _imports(name, path):
            if target in MODULES and target != name:
                graph.add_edge(name, target)
    return graph


def test_the_core_has_no_import_cycles() -> None:
    graph = _import_graph()
    core = graph.subgraph(
        n for n in graph if n.startswith("graphopt") and not n.startswith("graphopt.passes")
    )
    # the package's own __init__ re-exports everything: an import of it from a module it
    # imports is a cycle too, and is counted
    cycles = sorted(sorted(c) for c in nx.simple_cycles(core))
    assert not cycles, f"import cycles in graphopt/: {cycles}"
    assert len(core) > 15 and core.number_of_edges() > 30  # the graph was really read


def test_no_pass_or_plugin_module_is_part_of_an_import_cycle_with_the_core() -> None:
    graph = _import_graph()
    for cycle in nx.simple_cycles(graph):
        outside = [n for n in cycle if n.startswith(("graphopt.passes", "graphopt_lowrank"))]
        inside = [n for n in cycle if n not in outside]
        assert not (outside and inside), f"the core and a pass import each other: {cycle}"


def test_no_module_imports_another_modules_private_names() -> None:
    found = set()
    for name, path in MODULES.items():
        for target, imported, _ in _imports(name, path):
            if target not in MODULES or target == name:
                continue
            private_module = any(p.startswith("_") and not p.startswith("__") for p in
                                 target.split("."))  # fmt: skip
            private_name = imported is not None and imported.startswith("_")
            private_name = private_name and not imported.startswith("__")
            if private_module or private_name:
                found.add((name, target, imported or target.rpartition(".")[2]))
    new = sorted(found - KNOWN_PRIVATE_IMPORTS)
    assert not new, f"modules importing another module's private names: {new}"


#: packages graphopt uses on some paths only (ONNX output, zoo sources, views, data): a
#: command that needs none of them must not pay for importing them
ON_DEMAND = ("onnx", "onnxruntime", "onnxscript", "transformers", "timm", "networkx",
             "matplotlib", "sklearn", "pandas")  # fmt: skip

IMPORTS_OF_A_RUN = """
import json, sys
from graphopt.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    assert not exc.code, f"exit status {exc.code}"
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_pruning_a_torchvision_model_to_pt_imports_no_on_demand_package(tmp_path: Path) -> None:
    """The CLI's whole path (plugins found, model built, traced, pruned, written, reloaded
    and checked) in a fresh interpreter."""
    out = tmp_path / "small.pt"
    args = ["optimize", "torchvision:resnet18", "--input-shape", "1,3,32,32",
            "--passes", "prune(ratio=0.5)", "-o", str(out)]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", IMPORTS_OF_A_RUN, *args], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout.splitlines()[-1]))
    assert out.is_file() and {"torch", "torchvision", "graphopt", "typer"} <= loaded
    assert not loaded & set(ON_DEMAND), f"imported without need: {sorted(loaded & set(ON_DEMAND))}"


def test_importing_graphopt_imports_no_on_demand_package() -> None:
    code = "import json, sys, graphopt, graphopt.cli; graphopt.get_registry()\n" + (
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout))
    assert "graphopt" in loaded and not loaded & set(ON_DEMAND), sorted(loaded & set(ON_DEMAND))


CORE_DOCTESTS = [
    "graphopt",
    "graphopt.contributions",
    "graphopt.ir",
    "graphopt.manager",
    "graphopt.measuring",
    "graphopt.pass_api",
    "graphopt.threads",
]


@pytest.mark.parametrize("module", CORE_DOCTESTS)
def test_docstring_examples_run(module: str) -> None:
    failures, tried = doctest.testmod(
        importlib.import_module(module), optionflags=doctest.ELLIPSIS, verbose=False
    )
    assert tried and not failures, module
