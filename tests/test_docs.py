"""Documentation keeps up with the code: every hook, pass, option and command is documented,
and the examples run."""

from __future__ import annotations

import inspect
import re
import runpy
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, pip_install, run_graphopt

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
    "script",
    [
        "custom_pass.py",
        "inspect_and_optimize.py",
        "quant_digits.py",
        "prune_resnet.py",
        "compress_bert.py",
    ],
)
def test_examples_run(script, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [script]
    if script == "inspect_and_optimize.py":
        args += ["torchvision:mobilenet_v3_small", "cleanup", str(tmp_path / "m.pt2")]
    if script == "quant_digits.py":
        args += [str(tmp_path)]  # trains a digits CNN, writes int8 .pt and .onnx
    if script == "compress_bert.py":
        args += ["--fast", str(tmp_path)]  # fewer sequences and steps than the documented run
    monkeypatch.setattr(sys, "argv", args)
    runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    out = capsys.readouterr().out
    assert "ledger" in out or "→" in out or "custom pass" in out or "int8 accuracy" in out
    if script == "custom_pass.py":
        assert "'relu6 rewritten': 35" in out


# -- the plugin guide's complete plugin, installed and run --------------------------------------


def _guide_files() -> dict[str, str]:
    """The files of docs/plugins.md's complete plugin: each fenced block whose info string
    names a file (```python file=NAME)."""
    text = (DOCS / "plugins.md").read_text()
    blocks = re.findall(r"^```\w+ file=(\S+)\n(.*?)^```$", text, flags=re.M | re.S)
    return dict(blocks)


@pytest.fixture(scope="module")
def guide_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guide's plugin, pip-installed into a private target exactly as written."""
    root = tmp_path_factory.mktemp("guide")
    source = root / "graphopt-example"
    source.mkdir()
    for name, code in _guide_files().items():
        (source / name).write_text(code)
    pip_install(source, root / "site")
    (root / "guide_data.py").write_text(
        "import torch\n"
        "def batches():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 1000, (4,),\n"
        "             generator=g)) for _ in range(2)]\n"
    )
    return root


def test_the_plugin_guide_covers_every_hook_in_one_plugin():
    files = _guide_files()
    assert set(files) == {"pyproject.toml", "graphopt_example.py"}
    hooks = [n for n, _ in inspect.getmembers(hookspecs, inspect.isfunction)]
    for name in (h for h in hooks if h.startswith("graphopt_")):
        assert f"def {name}(" in files["graphopt_example.py"], name


def test_the_plugin_guides_plugin_installs_and_each_contribution_works(guide_plugin, monkeypatch):
    """In this process: every contribution registered under the plugin's name, and each one
    doing what the guide says, checked against a direct computation."""
    import torch
    import torchvision

    import graphopt

    monkeypatch.syspath_prepend(str(guide_plugin / "site"))
    monkeypatch.delenv("GRAPHOPT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    reg = load_registry()
    info = reg.plugins["example"]
    assert (info.distribution, info.status) == ("graphopt-example", "loaded")
    reg.cli_app()
    assert (info.passes, info.analyses, info.exporters) == (
        ["swap-activation"],
        ["activation-modules"],
        ["zip"],
    )
    assert (info.criteria, info.losses, info.commands) == (["l4"], ["cosine"], ["activations"])
    assert info.prune_rules == ["graphopt_example.ChannelScaleRule"]

    model = torchvision.models.resnet18(weights=None).eval()
    ir = graphopt.trace(model, (torch.randn(2, 3, 32, 32),))
    result = graphopt.PassManager("swap-activation(limit=3)", registry=reg).run(ir)
    swapped = [type(m).__name__ for m in result.ir.gm.modules()]
    assert swapped.count("ReLU6") == 3 and result.ledger[-1].stats == {"modules replaced": 3}
    with pytest.raises(graphopt.GraphoptError, match=r"expected a whole number ≥ 1"):
        graphopt.PassManager("swap-activation(limit=0)", registry=reg)

    w = torch.randn(8, 4)
    ci = graphopt.CriterionInput(ir, {"a.weight": w, "bn.weight": w}, [], None, 0, {"bn.weight"})
    saliency = reg.criteria["l4"](ci)
    assert saliency.power == 4 and list(saliency.params) == ["a.weight"]

    # the op rule: without it the scale layer and everything coupled to it stays whole;
    # with it, the conv before it, the scales and the conv after it lose the same channels
    import graphopt_example

    scaled = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3), graphopt_example.ChannelScale(16), torch.nn.Conv2d(16, 8, 3)
    ).eval()
    with torch.no_grad():
        scaled[1].weight.uniform_(0.5, 2)
    x = torch.randn(2, 3, 12, 12)
    ir = graphopt.trace(scaled, (x,), leaf_modules=["ChannelScale"])
    without = graphopt.PassManager("prune(ratio=0.5)", registry=load_registry(["example"]))
    with pytest.raises(graphopt.GraphoptError, match="does not know how module ChannelScale"):
        without.run(ir)
    pruned = graphopt.PassManager("prune(ratio=0.5)", registry=reg).run(ir).ir.gm
    conv, scale = pruned.get_submodule("0"), pruned.get_submodule("1")
    assert conv.out_channels == scale.channels == scale.weight.numel() == 8
    assert pruned.get_submodule("2").in_channels == 8 and pruned(x).shape == scaled(x).shape

    s, t = torch.randn(4, 10), torch.randn(4, 10)
    loss = reg.losses["cosine"](graphopt.LossInputs(s, t, [], [], None, 4.0))
    expected = 1 - torch.nn.functional.cosine_similarity(s, t, dim=1).mean()
    assert torch.allclose(loss, expected)
    assert float(reg.losses["cosine"](graphopt.LossInputs(s, s, [], [], None, 4.0))) < 1e-6


def test_the_plugin_guides_commands_run(guide_plugin, tmp_path):
    """From the command line, as the guide shows: the command, then one pipeline using the
    pass (and its analysis), the criterion and the loss, written in the plugin's format."""
    import json

    env = {"PYTHONPATH": f"{guide_plugin / 'site'}:{guide_plugin}", "OMP_NUM_THREADS": "1"}
    listed = run_graphopt("activations", "torchvision:resnet18", "--input-shape", "1,3,32,32",
                          env=env)  # fmt: skip
    assert listed.code == 0, listed.stderr
    assert listed.stdout.startswith("ReLU: 9 modules (relu, layer1.0.relu, layer1.1.relu")
    out = tmp_path / "resnet18.zip"
    pipeline = (
        "swap-activation(new=ReLU6),prune(criterion=l4,ratio=0.25),"
        "distill(losses=[cosine:1],epochs=1,progress=false)"
    )
    run = run_graphopt("optimize", "torchvision:resnet18", "--input-shape", "1,3,32,32",
                       "--data", "guide_data:batches", "--passes", pipeline, "-o", str(out),
                       "--report-json", str(tmp_path / "report.json"), env=env)  # fmt: skip
    assert run.code == 0, run.stderr
    assert "wrote" in run.stdout and "(zip; free dims: batch)" in run.stdout
    assert "modules replaced: 9" in run.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    steps = [e["step"] for e in report["ledger"]]
    assert steps[1:] == ["swap-activation", "prune(ratio=0.25,criterion=l4)",
                         "distill(epochs=1,losses=[cosine:1],progress=false)"]  # fmt: skip
    assert report["ledger"][2]["macs"] < 0.8 * report["ledger"][0]["macs"]
    with zipfile.ZipFile(out) as archive:
        assert {"model.py", "weights.pt", "graphopt.json"} <= set(archive.namelist())
        assert json.loads(archive.read("graphopt.json"))["pipeline"] == report["pipeline"]


def test_hook_docstrings_name_only_public_types():
    """Every ``graphopt.NAME`` a hook's docstring mentions is importable from graphopt, and
    none points into a private or pass module."""
    import graphopt

    for name, function in inspect.getmembers(hookspecs, inspect.isfunction):
        if not name.startswith("graphopt_"):
            continue
        doc = function.__doc__ or ""
        # (a pass's package, graphopt.passes.NAME, is public too: its own extension types)
        mentioned = re.findall(r"graphopt\.(?!passes\.)([A-Za-z_]\w*)", doc)
        for public in mentioned:
            assert public in graphopt.__all__, f"{name} mentions graphopt.{public}"
        # a pass's own extension types are public from the pass's package, never deeper
        assert not re.search(r"graphopt\.passes\.\w+\.\w", doc), name
        assert ".importance" not in doc, name
    assert "graphopt.CriterionInput" in hookspecs.graphopt_register_prune_criteria.__doc__
    assert "graphopt.LossInputs" in hookspecs.graphopt_register_distill_losses.__doc__


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_examples_answer_help_without_working(script, tmp_path):
    """``--help`` prints the usage and does nothing else (an example that took it for its
    output folder once trained for 20 minutes and wrote into ./--help)."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--help"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage:") and not list(tmp_path.iterdir())
