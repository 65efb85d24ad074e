"""The plugin shipped in ``plugins/graphopt-lowrank``, installed for real: pip builds and
installs the distribution into a private target, and the ``graphopt`` console script finds
it through its entry point and runs its pass. The plugin's own tests live in
``plugins/graphopt-lowrank/tests`` and are collected by this suite too (see pyproject)."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import graphopt_lowrank
import pytest
import torch
from conftest import ROOT, run_graphopt
from graphopt_lowrank import factor_ratio
from torch import nn

import graphopt

PLUGIN = ROOT / "plugins" / "graphopt-lowrank"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install --target`` of a copy of the plugin (building in place would leave
    ``build/`` and ``*.egg-info`` in the source tree)."""
    root = tmp_path_factory.mktemp("lowrank")
    source = root / "src"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("__pycache__", "tests"))
    target = root / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (target / "graphopt_lowrank" / "lowrank.py").exists()
    assert list(target.glob("graphopt_lowrank-0.1.0.dist-info/entry_points.txt"))
    return target


def test_pip_installed_plugin_is_listed_and_runs_from_the_cli(site: Path, tmp_path: Path) -> None:
    # one intra-op thread: on a shared 2-core machine LAPACK's spinning threads make the
    # eigensolver many times slower than single-threaded
    env = {"PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    listed = run_graphopt("plugins", env=env)
    assert listed.code == 0, listed.stderr
    line = next(ln for ln in listed.stdout.splitlines() if "lowrank" in ln)
    assert "0.1.0" in line

    out = tmp_path / "r18.pt2"
    pipeline = "lowrank(macs_ratio=0.5),fold"
    run = run_graphopt(
        "optimize",
        "torchvision:resnet18",
        "--input-shape",
        "1,3,32,32",
        "--passes",
        pipeline,
        "-o",
        str(out),
        env=env,
    )
    assert run.code == 0, run.stderr
    assert "lowrank" in run.stdout and "lossy" in run.stdout
    meta = graphopt.read_metadata(str(out), graphopt.get_registry().exporters)
    assert meta is not None and meta["pipeline"] == pipeline
    # the artifact reloads without the plugin and has the factored layers in it
    program = torch.export.load(str(out))
    convs = [n for n in program.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert len(convs) == 2 * 20  # resnet18's 20 convs, each factored into two
    y = program.module()(torch.randn(1, 3, 32, 32))
    assert y.shape == (1, 1000) and bool(torch.isfinite(y).all())


def test_lowrank_on_the_block_model(block: nn.Module, block_input: tuple[torch.Tensor]) -> None:
    """Residual add, split, concat, grouped and depthwise convs, attention, and a 1×1 conv
    shared by two call sites: the factored model is exactly the model with those layers'
    weights replaced by their rank-r approximations."""
    registry = graphopt.load_registry(autoload=False, extra=[graphopt_lowrank])
    before = {k: v.clone() for k, v in block.state_dict().items()}
    manager = graphopt.PassManager("lowrank(macs_ratio=0.5)", registry=registry, reproducer=False)
    result = manager.run(graphopt.trace(block, block_input))
    mods = dict(result.ir.gm.named_modules())
    ranks = {p[: -len("_lr_a")]: mods[p].weight.shape[0] for p in mods if p.endswith("_lr_a")}
    assert ranks == {"stem": 5, "shared": 2, "head": 3}  # the largest ranks within 0.5
    for path, rank in ranks.items():
        weight = block.get_submodule(path).weight
        assert factor_ratio(rank, weight.shape[0], weight[0].numel()) <= 0.5
    notes = result.ledger[-1].notes
    assert "kept grouped: grouped convolution" in notes
    assert "kept depthwise: grouped convolution" in notes
    targets = [str(n.target) for n in result.ir.nodes(op="call_module")]
    assert targets.count("shared_lr_a") == 2 and targets.count("shared_lr_b") == 2

    reference = copy.deepcopy(block)
    with torch.no_grad():
        for path, rank in ranks.items():
            layer = reference.get_submodule(path)
            w = layer.weight.double().reshape(layer.weight.shape[0], -1)
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
            layer.weight.copy_(approx.reshape(layer.weight.shape))
        torch.testing.assert_close(
            result.ir.gm(*block_input), reference(*block_input), rtol=1e-5, atol=1e-5
        )
    assert result.ledger[-1].rel_err > 1e-3  # lossy, and the ledger measured it
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in before.items())
