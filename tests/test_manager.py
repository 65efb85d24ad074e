"""The pass manager: ledger, never mutating the caller, instrumentation, crash reproducers."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision

import graphopt
from graphopt import GraphIR, PassManager
from graphopt.plugins import load_registry


class Halve(graphopt.Pass):
    """Lossy on purpose: scales every conv weight, so the ledger must show a deviation."""

    name = "halve"
    summary = "Scale conv weights."
    exact = False

    @dataclass
    class Options:
        factor: float = graphopt.option(0.5, "scale")

    def run(self, ir, ctx):
        for node in ir.nodes(module_type=torch.nn.Conv2d):
            ir.module(node).weight.data.mul_(self.options.factor)
            ctx.stat("scaled")


class Liar(graphopt.Pass):
    """Claims to be exact but is not: the manager must say so."""

    name = "liar"
    summary = "Breaks the model while claiming exactness."

    def run(self, ir, ctx):
        for node in ir.nodes(op="call_module"):
            module = ir.module(node)
            if hasattr(module, "bias") and module.bias is not None:
                module.bias.data.add_(1.0)


class Crash(graphopt.Pass):
    name = "crash"
    summary = "Raises."

    def run(self, ir, ctx):
        raise ZeroDivisionError("boom")


class Claims(graphopt.Pass):
    """Leaves outputs it never computed: the ledger takes them, the artifact check does not."""

    name = "claims"
    summary = "Provides made-up outputs."
    keeps = ("outputs",)

    def run(self, ir, ctx):
        ir.provide("outputs", torch.zeros_like(ir.analysis("outputs")))


class _Plugin:
    @staticmethod
    @graphopt.hookimpl
    def graphopt_register_passes(register):
        for cls in (Halve, Liar, Crash, Claims):
            register(cls)


@pytest.fixture(scope="module")
def registry():
    return load_registry(autoload=False, extra=[_Plugin])


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_ledger_records_each_pass_and_caller_model_is_untouched(registry, block, block_input):
    before = _state(block)
    ir = GraphIR.trace(block, block_input)
    code_before = ir.gm.code
    result = PassManager("cleanup,halve(factor=0.25)", registry=registry).run(ir)
    steps = [e.step for e in result.ledger]
    assert steps == ["(input)", "cleanup", "halve(factor=0.25)"]
    assert result.pipeline == "cleanup,halve(factor=0.25)"
    cleanup, halve = result.ledger[1:]
    assert cleanup.exact and cleanup.rel_err < 1e-6 and cleanup.stats["dropout removed"] == 1
    assert not halve.exact and halve.rel_err > 1e-3 and halve.stats["scaled"] == 5
    assert halve.options == {"factor": 0.25}
    # the deviation is real: recompute it independently
    expected = block(*block_input)
    got = result.ir.gm(*block_input)
    assert halve.rel_err == pytest.approx(
        float((got - expected).norm() / expected.norm()), rel=1e-4
    )
    assert result.ledger[0].params == sum(p.numel() for p in block.parameters())
    # the caller's model and IR are unchanged
    after = _state(block)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert ir.gm.code == code_before
    assert ir.history == [] and result.ir.history == ["cleanup", "halve(factor=0.25)"]


def test_top1_agreement_for_classifiers(registry):
    model = torchvision.models.resnet18(num_classes=10).eval()
    inputs = (torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
    result = PassManager("halve(factor=0.0)", registry=registry).run(GraphIR.trace(model, inputs))
    entry = result.ledger[-1]
    ref = model(*inputs).argmax(1)
    got = result.ir.gm(*inputs).argmax(1)
    assert entry.top1 == pytest.approx(float((ref == got).float().mean()))


def test_exact_pass_that_changes_output_is_flagged(registry, block, block_input):
    result = PassManager("liar", registry=registry).run(GraphIR.trace(block, block_input))
    assert any("exact pass changed the output" in n for n in result.ledger[-1].notes)


def test_exact_pass_is_judged_against_the_step_before_it(registry, block, block_input):
    """After a lossy pass the output differs from the original; an exact pass that keeps the
    lossy output is not flagged, one that changes it further is."""
    ir = GraphIR.trace(block, block_input)
    result = PassManager("halve,fold", registry=registry).run(ir)
    halve, fold = result.ledger[1:]
    assert fold.rel_err == pytest.approx(halve.rel_err, abs=1e-5) and halve.rel_err > 0.1
    assert not any("exact pass changed" in n for n in fold.notes)
    result = PassManager("halve,liar", registry=registry).run(ir)
    assert any("against the previous step" in n for n in result.ledger[-1].notes)


def test_crash_writes_a_reproducer(registry, block, block_input, tmp_path):
    manager = PassManager("cleanup,crash", registry=registry, repro_dir=str(tmp_path))
    with pytest.raises(graphopt.PassCrash) as info:
        manager.run(GraphIR.trace(block, block_input))
    bundle = info.value.bundle
    assert bundle and os.path.dirname(bundle) == str(tmp_path)
    assert "crash" in str(info.value) and "boom" in str(info.value)
    files = set(os.listdir(bundle))
    assert {
        "input_model.pt",
        "before_pass.pt",
        "inputs.pt",
        "pipeline.txt",
        "versions.json",
        "traceback.txt",
        "README.txt",
    } <= files
    read = lambda name: Path(bundle, name).read_text()  # noqa: E731
    assert read("pipeline.txt").strip() == "cleanup,crash"
    assert json.loads(read("versions.json"))["torch"] == torch.__version__
    # the saved models reproduce the original behaviour
    saved = torch.load(os.path.join(bundle, "before_pass.pt"), weights_only=False)
    inputs = torch.load(os.path.join(bundle, "inputs.pt"))
    torch.testing.assert_close(saved(*inputs), block(*inputs))
    assert "ZeroDivisionError" in read("traceback.txt")


def test_print_after_and_time_passes(registry, block, block_input):
    from rich.console import Console

    console = Console(record=True, width=200)
    PassManager(
        "cleanup,halve",
        registry=registry,
        print_after=["cleanup"],
        time_passes=True,
        console=console,
    ).run(GraphIR.trace(block, block_input))
    text = console.export_text()
    assert "after cleanup" in text and "def forward" in text
    assert "time per pass" in text and "halve" in text
    assert "after halve" not in text


def test_training_mode_model_is_probed_in_eval_and_left_in_training(registry, block, block_input):
    model = copy.deepcopy(block).train()
    result = PassManager("halve(factor=1.0)", registry=registry).run(
        GraphIR.trace(model, block_input)
    )
    assert result.ledger[-1].rel_err == 0.0  # dropout would make it random if run in training
    assert model.training and result.ir.gm.training


def test_optimize_accepts_a_model_spec_like_the_cli():
    result = graphopt.optimize("torchvision:mobilenet_v3_small", "cleanup,fold")
    assert result.ir.example_inputs[0].shape == (1, 3, 224, 224)
    assert not result.ir.nodes(module_type=torch.nn.BatchNorm2d)
    given = (torch.randn(2, 3, 20, 20),)
    result = graphopt.optimize("models_for_cli:small_cnn", "fold", example_inputs=given)
    assert result.ir.example_inputs[0].shape == (2, 3, 20, 20)
    assert not result.ir.nodes(module_type=torch.nn.BatchNorm2d)


def test_model_with_torch_prune_masks_gets_one_sentence():
    from torch.nn.utils import prune

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    prune.l1_unstructured(model[0], "weight", 0.5)
    with pytest.raises(graphopt.GraphoptError, match=r"prune\.remove"):
        graphopt.optimize(model, "cleanup", example_inputs=(torch.randn(1, 4),))


def test_output_may_be_a_path(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    result = graphopt.optimize(
        model, "cleanup", example_inputs=(torch.randn(1, 4),), output=tmp_path / "m.pt2"
    )
    assert (tmp_path / "m.pt2").is_file() and result.ledger[-1].rel_err == 0.0


def test_reproducer_without_a_folder_goes_to_the_temporary_directory_and_skips_large_weights(
    registry, block, block_input, tmp_path, monkeypatch
):
    """Nobody asked for it: it goes to the temporary directory, keeps the model weights only
    up to a size, and the one-line message says where it went and how large it is."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ir = GraphIR.trace(block, block_input)
    weights = sum(t.numel() * t.element_size() for t in block.state_dict().values())
    small = PassManager("cleanup,crash", registry=registry, reproducer_limit=weights // 2)
    with pytest.raises(graphopt.PassCrash) as info:
        small.run(ir)
    bundle = info.value.bundle
    assert bundle and os.path.dirname(bundle) == str(tmp_path)
    files = set(os.listdir(bundle))
    assert {"input_model.py", "before_pass.py", "inputs.pt", "README.txt"} <= files
    assert not {"input_model.pt", "before_pass.pt"} & files
    size = sum(os.path.getsize(os.path.join(bundle, f)) for f in files)
    message = str(info.value)
    assert "\n" not in message and "; a reproducer (" in message
    assert f"was written to {bundle}; the fault is in the plugin" in message  # a test plugin
    assert f"a reproducer ({graphopt.manager.human_bytes(size)}, without the model weights" in (
        message
    )
    assert "keep them with --reproducer DIR" in message
    assert "--reproducer DIR" in Path(bundle, "README.txt").read_text()

    large = PassManager("cleanup,crash", registry=registry)  # a small model keeps its weights
    with pytest.raises(graphopt.PassCrash) as info:
        large.run(ir)
    assert {"input_model.pt", "before_pass.pt"} <= set(os.listdir(info.value.bundle))
    assert "without the model weights" not in str(info.value)

    asked = tmp_path / "asked"
    asked.mkdir()
    chosen = PassManager("crash", registry=registry, repro_dir=str(asked), reproducer_limit=1)
    with pytest.raises(graphopt.PassCrash) as info:
        chosen.run(ir)
    assert os.path.dirname(info.value.bundle) == str(asked)  # asked for: weights whatever size
    assert {"input_model.pt", "before_pass.pt"} <= set(os.listdir(info.value.bundle))


def test_ledger_takes_the_outputs_a_pass_left_and_the_artifact_check_runs_the_model(
    registry, block, block_input, tmp_path
):
    """A pass that has just run its graph may leave the outputs for the ledger (prune does);
    the written artifact is still run and compared with them, so made-up ones are caught."""
    ir = GraphIR.trace(block, block_input)
    result = PassManager("claims", registry=registry).run(ir)
    assert result.ledger[-1].rel_err == pytest.approx(1.0)  # the ledger took them
    assert torch.count_nonzero(result.outputs) == 0
    out = tmp_path / "claims.pt"
    with pytest.raises(graphopt.GraphoptError, match="does not reproduce the model"):
        graphopt.lower(result.ir.gm, result.ir.example_inputs, out, result.metadata(),
                       registry.exporters, expected=result.outputs)  # fmt: skip
    assert not out.exists()
    # with probe inputs of its own the ledger runs the model itself
    probe = tuple(t + 1 for t in block_input)
    result = PassManager("claims", registry=registry).run(ir, probe_inputs=probe)
    assert result.ledger[-1].rel_err == 0 and result.outputs is None
