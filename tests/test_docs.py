"""Documentation keeps up with the code: every hook, pass, option and command is documented,
and the examples run."""

from __future__ import annotations

import inspect
import runpy
import sys

import pytest
from conftest import ROOT

from graphopt import hookspecs
from graphopt.plugins import load_registry

DOCS = ROOT / "docs"


def test_every_hook_is_documented_in_the_plugin_guide():
    guide = (DOCS / "plugins.md").read_text()
    hooks = [
        n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("graphopt_")
    ]
    assert hooks, "no hooks found"
    for name in hooks:
        assert name in guide, f"{name} missing from docs/plugins.md"


def test_every_builtin_pass_has_a_page_naming_each_option():
    registry = load_registry(autoload=False)
    index = (DOCS / "passes.md").read_text()
    for name, cls in registry.passes.items():
        page = DOCS / "passes" / f"{name}.md"
        assert page.exists(), f"docs/passes/{name}.md is missing"
        text = page.read_text()
        for spec in cls.option_specs():
            assert f"`{spec.name}`" in text, f"option {name}.{spec.name} undocumented in {page}"
        assert f"passes/{name}.md" in index, f"docs/passes.md does not link {name}"


def test_every_cli_command_is_documented():
    from typer.main import get_group

    from graphopt.cli import app

    cli_doc = (DOCS / "cli.md").read_text()
    for name in get_group(app).commands:
        assert f"`{name}" in cli_doc, f"command {name} missing from docs/cli.md"


@pytest.mark.parametrize(
    "script", ["custom_pass.py", "inspect_and_optimize.py", "quant_digits.py", "prune_resnet.py"]
)
def test_examples_run(script, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [script]
    if script == "inspect_and_optimize.py":
        args += ["torchvision:mobilenet_v3_small", "cleanup", str(tmp_path / "m.pt2")]
    if script == "quant_digits.py":
        args += [str(tmp_path)]  # trains a digits CNN, writes int8 .pt and .onnx
    monkeypatch.setattr(sys, "argv", args)
    runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    out = capsys.readouterr().out
    assert "ledger" in out or "→" in out or "custom pass" in out or "int8 accuracy" in out
    if script == "custom_pass.py":
        assert "'relu6 rewritten': 35" in out
