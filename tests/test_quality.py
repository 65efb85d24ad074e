"""The project's own tools agree with the code: ruff (lint and format) and mypy."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

#: what mypy must check: the core, the built-in passes and the example plugin
TYPED = ("graphopt", "passes", "plugins/graphopt-lowrank/graphopt_lowrank")


def _run(*args: str) -> subprocess.CompletedProcess:
    # as modules of this interpreter, so a venv that only links another's packages works too
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_lint_and_format():
    lint = _run("ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = _run("ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy():
    config = (ROOT / "pyproject.toml").read_text().split("[tool.mypy]")[1].split("\n[")[0]
    assert all(f'"{path}"' in config for path in TYPED), config
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
