"""The plugin host, through real entry points: built-ins first, broken plugins reported,
duplicate pass names refused naming both plugins, disabling, and every hook kind."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from conftest import run_graphopt

from graphopt import GraphoptError
from graphopt.plugins import load_registry


def _make_dist(root: Path, name: str, module_source: str) -> None:
    """A minimal installed distribution: a module plus dist-info with a graphopt entry point."""
    module = f"{name.replace('-', '_')}_plugin"
    (root / f"{module}.py").write_text(textwrap.dedent(module_source))
    info = root / f"{name}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[graphopt]\n{name} = {module}\n")


GOOD = """
    from dataclasses import dataclass
    import torch
    import typer
    import graphopt
    from graphopt.lowering import Exporter

    class Negate(graphopt.Pass):
        name = "negate-{tag}"
        summary = "Multiply the output by -1 (lossy, for plugin tests)."
        exact = False
        after = ("cleanup",)

        def run(self, ir, ctx):
            out = next(n for n in ir.graph.nodes if n.op == "output")
            value = out.args[0]
            with ir.graph.inserting_before(out):
                neg = ir.graph.call_function(torch.neg, (value,))
            out.args = (neg,)

    @graphopt.hookimpl
    def graphopt_register_passes(register):
        register(Negate)

    @graphopt.hookimpl
    def graphopt_register_analyses(register):
        register("node-count-{tag}", lambda ir: len(ir.graph.nodes))

    @graphopt.hookimpl
    def graphopt_register_exporters(register):
        def write(gm, inputs, path, meta):
            torch.save(gm.state_dict(), path)
        register(Exporter("weights-{tag}", (".w{tag}",), write,
                          lambda p: (lambda *a: None), lambda p: None))

    @graphopt.hookimpl
    def graphopt_register_commands(app):
        @app.command("hello-{tag}")
        def hello():
            "Say hello."
            print("hello from {tag}")
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in [m for m in sys.modules if m.endswith("_plugin")]:
        del sys.modules[name]  # each test writes its own plugin modules under the same names


def test_entry_point_plugin_contributes_every_hook_kind(site):
    _make_dist(site, "alpha", GOOD.replace("{tag}", "a"))
    reg = load_registry()
    assert reg.pass_owner["negate-a"] == "alpha"
    assert "node-count-a" in reg.analyses and "weights-a" in reg.exporters
    info = reg.plugins["alpha"]
    assert (info.version, info.builtin, info.passes) == ("1.2.3", False, ["negate-a"])
    reg.cli_app()
    assert info.commands == ["hello-a"]
    # built-ins are registered first, through the same hook
    names = list(reg.plugins)
    assert names.index("graphopt.passes") < names.index("alpha")
    assert reg.pass_owner["cleanup"] == "graphopt.passes"


def test_broken_plugin_warns_and_the_rest_loads(site):
    _make_dist(site, "broken", "raise ImportError('missing dependency xyz')\n")
    with pytest.warns(UserWarning, match="plugin 'broken' failed to import.*xyz"):
        reg = load_registry()
    assert reg.plugins["broken"].error and "cleanup" in reg.passes


def test_duplicate_pass_names_name_both_plugins(site):
    _make_dist(site, "alpha", GOOD.replace("{tag}", "x"))
    _make_dist(site, "beta", GOOD.replace("{tag}", "x"))
    with pytest.raises(GraphoptError, match=r"registered by both plugin '(alpha|beta)' and plugin"):
        load_registry()
    reg = load_registry(disabled=["beta"])
    assert reg.pass_owner["negate-x"] == "alpha"


def test_disable_all_entry_points_with_environment(site, monkeypatch):
    _make_dist(site, "alpha", GOOD.replace("{tag}", "a"))
    monkeypatch.setenv("GRAPHOPT_DISABLE_PLUGIN_AUTOLOAD", "1")
    reg = load_registry()
    assert "alpha" not in reg.plugins and "negate-a" not in reg.passes


def test_plugin_pass_and_command_from_the_cli(site, tmp_path):
    _make_dist(site, "alpha", GOOD.replace("{tag}", "a"))
    env = {"PYTHONPATH": str(site)}
    listed = run_graphopt("plugins", env=env)
    assert listed.code == 0 and "alpha" in listed.stdout and "negate-a" in listed.stdout
    hello = run_graphopt("hello-a", env=env)
    assert hello.code == 0 and "hello from a" in hello.stdout
    out = tmp_path / "m.pt"
    run = run_graphopt(
        "optimize",
        "torchvision:resnet18",
        "--input-shape",
        "1,3,32,32",
        "--passes",
        "cleanup,negate-a",
        "-o",
        str(out),
        env=env,
    )
    assert run.code == 0, run.stderr
    assert "negate-a" in run.stdout and "lossy" in run.stdout
    disabled = run_graphopt(
        "-p",
        "no:alpha",
        "optimize",
        "torchvision:resnet18",
        "--passes",
        "negate-a",
        "-o",
        str(tmp_path / "n.pt"),
        env=env,
    )
    assert disabled.code == 2 and "unknown pass 'negate-a'" in disabled.stderr
    assert not (tmp_path / "n.pt").exists()
    misordered = run_graphopt(
        "optimize",
        "torchvision:resnet18",
        "--passes",
        "negate-a,cleanup",
        "-o",
        str(tmp_path / "n.pt"),
        env=env,
    )
    assert misordered.code == 2 and "must run after 'cleanup'" in misordered.stderr
    assert len(misordered.stderr.strip().splitlines()) == 1 and not (tmp_path / "n.pt").exists()
