"""A third-party plugin's fault is the plugin's: a real distribution, pip-installed, that
breaks wherever the environment variable FAULTY_BREAK says (its import, any of its six
hooks, or any of the functions it contributes). Each failure names the plugin and its
distribution, says how to disable it, and leaves everything else working."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import pip_install, run_graphopt

import graphopt
from graphopt import GraphIR, GraphoptError, PassCrash, PassManager, PluginError, PluginWarning
from graphopt.plugins import load_registry

PLUGIN = '''
    """A graphopt plugin that fails where FAULTY_BREAK (comma-separated) says."""
    import os

    import torch
    import typer

    import graphopt


    def broken(what):
        return what in os.environ.get("FAULTY_BREAK", "").split(",")


    if broken("import"):
        raise ImportError("faulty needs libfoo, which is missing")


    def fail_if(what):
        if broken(what):
            raise RuntimeError(f"{what} is broken")


    class Mirror(graphopt.Pass):
        name = "mirror"
        summary = "Do nothing, or explode (FAULTY_BREAK=run)."

        def run(self, ir, ctx):
            if broken("run"):
                raise ValueError("mirror exploded")
            ctx.stat("nodes seen", len(ir.graph.nodes))


    def count_nodes(ir):
        fail_if("analysis-run")
        return len(ir.graph.nodes)


    def write(gm, inputs, path, metadata):
        fail_if("write")
        torch.save(gm, path)
        if broken("extra-file"):
            with open(path + ".json", "w") as f:
                f.write("{}")


    def load(path):
        return torch.load(path, weights_only=False)


    def l1(ci):
        fail_if("criterion-run")
        return graphopt.Saliency(params=dict(ci.params), power=1)


    def zero(inputs):
        fail_if("loss-run")
        return inputs.student_logits.sum() * 0


    @graphopt.hookimpl
    def graphopt_register_passes(register):
        fail_if("passes")
        register(Mirror)


    @graphopt.hookimpl
    def graphopt_register_analyses(register):
        fail_if("analyses")
        register("faulty-count", count_nodes)


    @graphopt.hookimpl
    def graphopt_register_exporters(register):
        fail_if("exporters")
        register(graphopt.Exporter("faulty", (".fty",), write, load, lambda path: None))


    @graphopt.hookimpl
    def graphopt_register_prune_criteria(register):
        fail_if("criteria")
        register("faulty-l1", l1)


    @graphopt.hookimpl
    def graphopt_register_distill_losses(register):
        fail_if("losses")
        register("faulty-zero", zero)


    @graphopt.hookimpl
    def graphopt_register_commands(app):
        fail_if("commands")

        @app.command("faulty-hello")
        def hello():
            """Say hello (or raise, with FAULTY_BREAK=command-run)."""
            if broken("command-run"):
                raise KeyError("no greeting")
            print("hello from faulty")
'''

PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "graphopt-faulty"
version = "0.3.0"
dependencies = ["graphopt"]

[project.entry-points.graphopt]
faulty = "graphopt_faulty"

[tool.setuptools]
py-modules = ["graphopt_faulty"]
"""

#: each hook's name in the hook specifications
SPEC = {
    "passes": "graphopt_register_passes",
    "analyses": "graphopt_register_analyses",
    "exporters": "graphopt_register_exporters",
    "criteria": "graphopt_register_prune_criteria",
    "losses": "graphopt_register_distill_losses",
    "commands": "graphopt_register_commands",
}
#: what each hook contributes (the registry table it fills) and one name it gives there
HOOKS = {
    "passes": ("passes", "mirror"),
    "analyses": ("analyses", "faulty-count"),
    "exporters": ("exporters", "faulty"),
    "criteria": ("criteria", "faulty-l1"),
    "losses": ("losses", "faulty-zero"),
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``graphopt-faulty`` built and installed with pip into a private target."""
    root = tmp_path_factory.mktemp("faulty")
    source = root / "src"
    source.mkdir()
    (source / "pyproject.toml").write_text(PYPROJECT)
    (source / "graphopt_faulty.py").write_text(textwrap.dedent(PLUGIN))
    target = pip_install(source, root / "site")
    shutil.rmtree(source)  # only the installed copy is importable
    return target


@pytest.fixture
def installed(site: Path, monkeypatch: pytest.MonkeyPatch):
    """The plugin importable in this process, its module forgotten afterwards."""
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("GRAPHOPT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    yield
    sys.modules.pop("graphopt_faulty", None)


def _registry(monkeypatch: pytest.MonkeyPatch, breaks: str = "", **kw) -> graphopt.Registry:
    monkeypatch.setenv("FAULTY_BREAK", breaks)
    sys.modules.pop("graphopt_faulty", None)
    return load_registry(**kw)


def _advice(text: str) -> None:
    """The sentence names the plugin, its distribution, whose fault it is and the cure."""
    assert "plugin 'faulty'" in text and "distribution graphopt-faulty 0.3.0" in text
    assert "not in graphopt" in text and "-p no:faulty" in text
    assert "graphopt bug" not in text and "\n" not in text


def test_a_working_plugin_contributes_all_six_kinds_and_lists_them(installed, monkeypatch):
    reg = _registry(monkeypatch)
    for attr, name in HOOKS.values():
        assert getattr(reg, attr).owner(name).name == "faulty", attr
    reg.cli_app()
    info = reg.plugins["faulty"]
    assert (info.distribution, info.version, info.status) == ("graphopt-faulty", "0.3.0", "loaded")
    assert (info.criteria, info.losses, info.commands) == (["faulty-l1"], ["faulty-zero"],
                                                           ["faulty-hello"])  # fmt: skip


@pytest.mark.parametrize("hook", [*HOOKS, "commands"])
def test_a_hook_that_raises_contributes_nothing_and_the_rest_works(installed, monkeypatch, hook):
    with pytest.warns(PluginWarning) as warned:
        reg = _registry(monkeypatch, hook)
        if hook == "commands":
            reg.cli_app()
    (warning,) = [str(w.message) for w in warned]
    assert warning.startswith(
        f"graphopt plugin 'faulty' failed in {SPEC[hook]} (RuntimeError: {hook} is broken), so its "
    )
    _advice(warning)
    info = reg.plugins["faulty"]
    assert "failed in graphopt_register_" in info.status and f"{hook} is broken" in info.status
    for other, (attr, name) in HOOKS.items():  # the plugin's other hooks still contribute
        assert (name in getattr(reg, attr)) is (other != hook), (other, attr)
    assert "cleanup" in reg.passes and "pt2" in reg.exporters  # graphopt's own are all there
    if hook == "commands":
        assert not reg.commands and not reg.cli_app().registered_commands
        return
    attr, name = HOOKS[hook]
    with pytest.raises(GraphoptError) as missing:
        getattr(reg, attr)[name]
    text = str(missing.value)
    assert text.startswith(f"unknown {getattr(reg, attr).kind} '{name}'")
    assert "failed to register its" in text and f"{hook} is broken" in text
    _advice(text.split("; the registered")[1])


def test_a_plugin_that_fails_to_import_is_one_line_in_graphopts_voice(site):
    env = {"PYTHONPATH": str(site), "FAULTY_BREAK": "import"}
    run = run_graphopt("passes", env=env)
    assert run.code == 0 and "cleanup" in run.stdout
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith(
        "warning: graphopt plugin 'faulty' failed to import (ImportError: faulty needs libfoo, "
        "which is missing), so it is left out;"
    )
    _advice(line)
    assert "UserWarning" not in line and "plugins.py" not in line and "warnings.warn" not in line
    table = run_graphopt("plugins", env=env)  # the table shows it failed, and why
    assert table.code == 0 and "graphopt-faulty" in table.stdout, table.stderr
    assert "│ failed │" in table.stdout and line[len("warning: ") :] in table.stdout


def test_from_the_cli_a_failed_hook_is_named_and_other_commands_keep_working(site, tmp_path):
    env = {"PYTHONPATH": str(site), "FAULTY_BREAK": "passes"}
    listed = run_graphopt("plugins", "--format", "json", env=env)
    assert listed.code == 0, listed.stderr
    row = next(r for r in json.loads(listed.stdout) if r["plugin"] == "faulty")
    assert (row["distribution"], row["version"], row["passes"]) == ("graphopt-faulty", "0.3.0", [])
    assert (row["criteria"], row["losses"], row["commands"], row["exporters"]) == (
        ["faulty-l1"],
        ["faulty-zero"],
        ["faulty-hello"],
        ["faulty"],
    )
    assert row["status"] == "failed in graphopt_register_passes: RuntimeError: passes is broken"
    (warning,) = listed.stderr.strip().splitlines()
    assert warning == "warning: " + row["faults"][0]
    _advice(warning)
    hello = run_graphopt("faulty-hello", env=env)  # the same plugin's command works
    assert hello.code == 0 and "hello from faulty" in hello.stdout
    out = tmp_path / "m.pt"
    args = ["optimize", "torchvision:resnet18", "--input-shape", "1,3,32,32", "-o", str(out)]
    missing = run_graphopt(*args, "--passes", "cleanup,mirror", env=env)
    assert missing.code == 2 and not out.exists()
    error = missing.stderr.strip().splitlines()[-1]
    assert error.startswith("error: unknown pass 'mirror'") and "passes is broken" in error
    _advice(error)
    assert "internal error" not in missing.stderr
    fine = run_graphopt("-p", "no:faulty", *args, "--passes", "cleanup", env=env)
    assert fine.code == 0 and out.exists() and fine.stderr.strip() == ""


def test_a_failed_command_hook_and_a_command_that_raises(site):
    broken = run_graphopt("faulty-hello", env={"PYTHONPATH": str(site), "FAULTY_BREAK": "commands"})
    assert broken.code == 2
    error = broken.stderr.strip().splitlines()[-1]
    assert (
        error.startswith("error: unknown command 'faulty-hello'") and "commands is broken" in error
    )
    raising = run_graphopt(
        "faulty-hello", env={"PYTHONPATH": str(site), "FAULTY_BREAK": "command-run"}
    )
    assert raising.code == 1
    (error,) = raising.stderr.strip().splitlines()
    assert error.startswith("error: command 'faulty-hello' of plugin 'faulty' failed with KeyError")
    _advice(error)


# -- faults in what a plugin contributed, raised while it is used -----------------------------


@pytest.fixture(scope="module")
def resnet() -> GraphIR:
    return graphopt.trace(torchvision.models.resnet18(weights=None).eval(),
                          (torch.randn(1, 3, 32, 32),))  # fmt: skip


def test_a_contributed_analysis_criterion_or_pass_that_raises_blames_the_plugin(
    installed, monkeypatch, resnet
):
    reg = _registry(monkeypatch, "analysis-run,criterion-run,run")

    class UsesAnalysis(graphopt.Pass):
        name = "uses-analysis"
        summary = "Asks for the plugin's analysis."

        def run(self, ir, ctx):
            ctx.stat("nodes", ir.analysis("faulty-count"))

    for pipeline in ([UsesAnalysis()], "prune(criterion=faulty-l1)"):
        with pytest.raises(PluginError) as info:
            PassManager(pipeline, registry=reg, reproducer=False).run(resnet)
        assert info.value.exit_code == 1 and "is broken" in str(info.value)
        _advice(str(info.value))
    with pytest.raises(PassCrash) as crash:
        PassManager("mirror", registry=reg, reproducer=False).run(resnet)
    text = str(crash.value)
    assert text.startswith("pass 'mirror' of plugin 'faulty' crashed with ValueError")
    _advice(text)


def test_the_registry_in_effect_decides_which_criteria_and_analyses_exist(
    installed, monkeypatch, resnet
):
    """``-p no:faulty`` takes the plugin's criterion away from prune; with the plugin on, the
    criterion and the analysis are those of the registry the pipeline runs with."""
    on = _registry(monkeypatch)
    off = load_registry(disabled=["faulty"])
    assert "faulty-l1" in on.criteria and "faulty-l1" not in off.criteria
    with pytest.raises(GraphoptError, match="unknown pruning criterion 'faulty-l1'"):
        PassManager("prune(criterion=faulty-l1)", registry=off, reproducer=False).run(resnet)
    result = PassManager("prune(criterion=faulty-l1,ratio=0.25)", registry=on).run(resnet)
    assert result.ledger[-1].macs < result.ledger[0].macs
    l1 = PassManager("prune(criterion=l1,ratio=0.25)", registry=off).run(resnet)
    assert result.ledger[-1].macs == l1.ledger[-1].macs  # the plugin's l1 is the built-in's

    class Counts(graphopt.Pass):
        name = "counts"
        summary = "Reads the plugin's analysis."

        def run(self, ir, ctx):
            ctx.stat("nodes", ir.analysis("faulty-count"))

    counted = PassManager([Counts()], registry=on).run(resnet)
    assert counted.ledger[-1].stats["nodes"] == len(resnet.graph.nodes)
    with pytest.raises(GraphoptError, match="unknown analysis 'faulty-count'"):
        PassManager([Counts()], registry=off, reproducer=False).run(resnet)


def test_an_exporter_that_raises_or_writes_beside_its_path_blames_the_plugin(
    installed, monkeypatch, resnet, tmp_path
):
    out = tmp_path / "model.fty"
    reg = _registry(monkeypatch)
    check = graphopt.lower(resnet.gm, resnet.example_inputs, out, {}, reg.exporters)
    assert out.exists() and check["format"] == "faulty" and check["rel_err"] == 0.0
    out.unlink()
    for breaks, expected in (("write", "write is broken"), ("extra-file", "model.fty.json")):
        monkeypatch.setenv("FAULTY_BREAK", breaks)
        with pytest.raises(GraphoptError) as info:
            graphopt.lower(resnet.gm, resnet.example_inputs, out, {}, reg.exporters)
        assert expected in str(info.value) and "output format" in str(info.value)
        _advice(str(info.value))
        assert list(tmp_path.iterdir()) == []  # nothing written, nothing left behind


def test_a_loss_that_raises_blames_the_plugin(installed, monkeypatch):
    from graphopt.passes.distill import distill

    reg = _registry(monkeypatch, "loss-run")
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = torch.randn(16, 4)
    data = [(x, teacher(x).argmax(1))]
    with pytest.raises(PluginError) as info:
        distill(teacher, teacher, data, example_inputs=(x,), epochs=1, progress=False,
                losses=["faulty-zero"], registry=reg)  # fmt: skip
    assert str(info.value).startswith("distillation loss 'faulty-zero' of plugin 'faulty'")
    _advice(str(info.value))


def test_a_plugins_pass_crashing_from_the_cli_names_the_plugin_and_the_reproducer(site, tmp_path):
    folder = tmp_path / "repro"
    out = tmp_path / "m.pt"
    run = run_graphopt(
        "optimize", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--passes",
        "cleanup,mirror", "-o", str(out), "--reproducer", str(folder),
        env={"PYTHONPATH": str(site), "FAULTY_BREAK": "run"},
    )  # fmt: skip
    assert run.code == 1 and not out.exists()
    (error,) = run.stderr.strip().splitlines()
    (bundle,) = folder.iterdir()
    assert error.startswith(
        "error: pass 'mirror' of plugin 'faulty' crashed with ValueError: mirror exploded; a "
        "reproducer ("
    )
    assert f"was written to {bundle};" in error and "without the model weights" not in error
    _advice(error)
    assert {"input_model.pt", "before_pass.pt", "README.txt"} <= {p.name for p in bundle.iterdir()}
