"""The distribution as a user gets it: the sdist is built from a copy of the source tree,
the wheel from the unpacked sdist (as pip does), and the wheel installed, not editable, into
a fresh virtual environment that sees the heavy dependencies already installed here but not
this checkout. Every built-in pass must be there (each pass module of the source tree is
looked up, so a new pass package is covered without editing this test), a ``fold,quant``
pipeline must run from the installed copy, and no generic top-level name may be installed.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

import graphopt

#: what never goes into a distribution (build output, caches, the local environment)
IGNORED = (".git", ".venv", "build", "dist", "out", "__pycache__", "*.egg-info", ".*_cache",
           ".hypothesis", "*.pyc")  # fmt: skip


def _python_files(folder: Path) -> set[str]:
    return {
        str(p.relative_to(folder)) for p in folder.rglob("*.py") if "__pycache__" not in p.parts
    }


def _builtin_pass_names() -> set[str]:
    """The passes the source tree's ``passes/`` folder declares, module by module."""
    names = set()
    for info in pkgutil.iter_modules([str(ROOT / "passes")]):
        if not info.name.startswith("_"):
            module = importlib.import_module(f"graphopt.passes.{info.name}")
            names |= {cls.name for cls in getattr(module, "PASSES", ())}
    return names


def _build(script: str, cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; print({script})"],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The sdist built from a copy of the checkout, and the wheel built from that sdist."""
    root = tmp_path_factory.mktemp("dist")
    tree = root / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(*IGNORED))
    out = root / "out"
    sdist = out / _build(f"build_meta.build_sdist({str(out)!r})", tree)
    with tarfile.open(sdist) as archive:
        archive.extractall(root / "unpacked", filter="data")
    (unpacked,) = (root / "unpacked").iterdir()
    wheel = out / _build(f"build_meta.build_wheel({str(out)!r})", unpacked)
    return sdist, wheel


def test_the_wheel_holds_every_module_of_the_core_and_the_passes_and_nothing_else(dists):
    _, wheel = dists
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/")[0] for n in names}
    assert top == {"graphopt", f"graphopt-{graphopt.__version__}.dist-info"}
    expected = {f"graphopt/{f}" for f in _python_files(ROOT / "graphopt")}
    expected |= {f"graphopt/passes/{f}" for f in _python_files(ROOT / "passes")}
    assert len(expected) > 40 and "graphopt/passes/quant/__init__.py" in expected
    assert expected == {n for n in names if n.endswith(".py")}


def test_the_sdist_holds_the_docs_examples_tests_and_the_plugins_sources(dists):
    sdist, _ = dists
    with tarfile.open(sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    wanted = {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in"}
    for folder in ("docs", "examples", "tests", "graphopt", "passes", "plugins/graphopt-lowrank"):
        files = [p for p in (ROOT / folder).rglob("*") if p.is_file()]
        wanted |= {
            str(p.relative_to(ROOT))
            for p in files
            if "__pycache__" not in p.parts and not any(s.endswith(".egg-info") for s in p.parts)
        }
    assert "docs/plugins.md" in wanted and "plugins/graphopt-lowrank/pyproject.toml" in wanted
    assert wanted <= names, sorted(wanted - names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


@pytest.fixture(scope="module")
def installed(dists, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel pip-installed (not editable). It reaches torch and the
    other dependencies through a .pth listing this interpreter's site-packages folders,
    whose .pth files (this checkout's editable finder among them) are not processed."""
    _, wheel = dists
    env = tmp_path_factory.mktemp("venv") / "env"
    venv.create(env, with_pip=False)
    (site,) = (env / "lib").glob("python*/site-packages")
    shared = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    (site / "shared_dependencies.pth").write_text("\n".join(shared) + "\n")
    proc = subprocess.run(
        [str(env / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-index", "--ignore-installed", str(wheel)],
        capture_output=True, text=True, timeout=300, cwd=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return env


def _run(env: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**clean, "COLUMNS": "200", "GRAPHOPT_DISABLE_PLUGIN_AUTOLOAD": "1"},
    )  # fmt: skip


def test_the_installed_copy_has_every_builtin_pass_and_no_generic_top_level_name(
    installed, tmp_path
):
    python = str(installed / "bin" / "python")
    probe = _run(
        installed, python, "-c",
        "import importlib.util as u, graphopt, graphopt.passes as p; "
        "print(graphopt.__file__); print(p.__file__); "
        "print(u.find_spec('passes'), u.find_spec('plugins'))",
        cwd=tmp_path,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    core, passes, generic = probe.stdout.strip().splitlines()
    assert core.startswith(str(installed)) and passes.startswith(str(installed))
    assert not core.startswith(str(ROOT)) and generic == "None None"
    (site,) = (installed / "lib").glob("python*/site-packages")
    assert not {"passes", "plugins"} & {p.name for p in site.iterdir()}

    listed = _run(installed, str(installed / "bin" / "graphopt"), "passes", "--format",
                  "markdown", cwd=tmp_path)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    found = {
        line.split("`")[1]
        for line in listed.stdout.splitlines()
        if line.startswith("## `") and "from `graphopt.passes`" in line
    }
    expected = _builtin_pass_names()
    assert {"quant", "fold", "prune", "distill"} <= expected
    assert found == expected


def test_a_fold_quant_pipeline_runs_from_the_installed_copy(installed, tmp_path):
    out = tmp_path / "r18.pt"
    run = _run(
        installed, str(installed / "bin" / "graphopt"), "optimize", "torchvision:resnet18",
        "--input-shape", "1,3,32,32", "--passes", "fold,quant", "-o", str(out),
        cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert out.exists() and "pipeline: fold,quant" in run.stdout
    assert "reloaded and checked" in run.stdout
