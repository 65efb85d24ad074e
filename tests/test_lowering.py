"""Lowering: every format is written atomically, reloaded and checked; failures leave nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision

import graphopt
from graphopt import GraphIR, PassManager
from graphopt.lowering import Exporter, lower, program_runner, read_metadata
from graphopt.plugins import get_registry

EXPORTERS = get_registry().exporters


@pytest.fixture(scope="module")
def optimised():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    ir = GraphIR.trace(model, (torch.randn(2, 3, 32, 32),), source="resnet18")
    return PassManager("cleanup").run(ir)


@pytest.mark.parametrize("out", ["model.pt2", "model.pt", "model.onnx", "folder"])
def test_each_format_round_trips_with_metadata(optimised, tmp_path, out):
    path = str(tmp_path / out)
    check = lower(
        optimised.ir.gm, optimised.ir.example_inputs, path, optimised.metadata(), EXPORTERS
    )
    assert check["rel_err"] <= (1e-4 if out.endswith(".onnx") else 1e-6)
    meta = read_metadata(path, EXPORTERS)
    assert meta["pipeline"] == "cleanup" and meta["torch"] == torch.__version__
    assert [e["step"] for e in meta["ledger"]] == ["(input)", "cleanup"]
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".graphopt-")]
    assert leftovers == []


def test_folder_is_readable_python_loadable_without_graphopt(optimised, tmp_path):
    folder = tmp_path / "artifact"
    lower(
        optimised.ir.gm, optimised.ir.example_inputs, str(folder), optimised.metadata(), EXPORTERS
    )
    source = (folder / "model.py").read_text()
    assert "class OptimisedModel(torch.nn.Module)" in source
    assert "torch.ops.aten.conv2d" in source and "graphopt" not in source.split('"""')[2]
    x = optimised.ir.example_inputs[0]
    torch.save(x, tmp_path / "x.pt")
    torch.save(optimised.ir.gm(x), tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import importlib.util, sys, torch
        sys.modules["graphopt"] = None  # any import of graphopt now fails
        spec = importlib.util.spec_from_file_location(
            "artifact", {str(folder / "__init__.py")!r},
            submodule_search_locations=[{str(folder)!r}])
        module = importlib.util.module_from_spec(spec); sys.modules["artifact"] = module
        spec.loader.exec_module(module)
        model = module.OptimisedModel()
        got = model(torch.load({str(tmp_path / "x.pt")!r}))
        torch.testing.assert_close(got, torch.load({str(tmp_path / "expected.pt")!r}))
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_onnx_runs_in_onnxruntime_and_passes_the_checker(optimised, tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort

    path = str(tmp_path / "m.onnx")
    lower(optimised.ir.gm, optimised.ir.example_inputs, path, optimised.metadata(), EXPORTERS)
    onnx.checker.check_model(path, full_check=True)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = optimised.ir.example_inputs[0]
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, optimised.ir.gm(x).detach().numpy(), rtol=1e-3, atol=1e-4)


def _broken(kind):
    def write(gm, inputs, path, meta):
        with open(path, "w") as f:
            f.write("half-written")
        if kind == "raise":
            raise OSError("disk full")

    def load(path):
        if kind == "garbage":
            return lambda *a: torch.zeros(2, 10)  # wrong numbers: verification must catch it
        raise ValueError("unreadable")

    return Exporter(kind, (".bad",), write, load, lambda p: None)


@pytest.mark.parametrize("kind", ["raise", "garbage", "unloadable"])
def test_failed_write_or_check_leaves_nothing(optimised, tmp_path, kind):
    target = tmp_path / "model.bad"
    with pytest.raises(graphopt.GraphoptError) as info:
        lower(optimised.ir.gm, optimised.ir.example_inputs, str(target), {}, {"bad": _broken(kind)})
    assert "\n" not in str(info.value)
    assert os.listdir(tmp_path) == []


def test_existing_output_is_replaced_only_after_success(optimised, tmp_path):
    target = tmp_path / "model.bad"
    target.write_text("previous good artifact")
    with pytest.raises(graphopt.GraphoptError):
        lower(
            optimised.ir.gm,
            optimised.ir.example_inputs,
            str(target),
            {},
            {"bad": _broken("garbage")},
        )
    assert target.read_text() == "previous good artifact"


def test_unwritable_and_unknown_outputs_fail_before_work(tmp_path):
    from graphopt.lowering import check_output

    with pytest.raises(graphopt.GraphoptError, match="no output format"):
        check_output(str(tmp_path / "model.xyz"), EXPORTERS)


def test_unwritable_location_even_for_root():
    from graphopt.lowering import check_output

    with pytest.raises(graphopt.GraphoptError, match=r"not a writable directory|cannot write"):
        check_output("/proc/graphopt-test/m.pt2", EXPORTERS)


def test_foreign_directory_is_not_overwritten(tmp_path):
    from graphopt.lowering import check_output

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_text("meow")
    with pytest.raises(graphopt.GraphoptError, match="not written by graphopt"):
        check_output(str(tmp_path / "photos"), EXPORTERS)


def test_report_metadata_is_json(optimised):
    json.dumps(optimised.metadata())


class _WithConstant(torch.nn.Module):
    """Parameters, buffers (BatchNorm), a plain tensor attribute (a lifted constant) and a
    tuple output with a nested list."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.offset = torch.linspace(-1, 1, 4).view(1, 4, 1, 1)

    def forward(self, x, y):
        z = self.bn(self.conv(x)) + self.offset
        return z.relu(), [z.mean(), y * 2]


@pytest.mark.parametrize("case", ["constants", "attention"])
def test_program_runner_matches_module(tmp_path, case) -> None:
    """The .pt2 check runs the reloaded program's graph with its lifted state instead of
    torch's quadratic ``module()``: both give the same outputs, in the same structure."""
    torch.manual_seed(0)
    if case == "constants":
        model, args = _WithConstant().eval(), (torch.randn(2, 3, 8, 8), torch.randn(3))
        torch.nn.init.uniform_(model.bn.running_var, 0.5, 2.0)
    else:
        model = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
        args = (torch.randn(1, 5, 16),) * 3
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, args), path)
    program = torch.export.load(path)
    got, want = program_runner(program)(*args), program.module()(*args)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(got, model(*args))


def test_an_existing_directory_named_like_a_file_is_refused_unless_the_path_ends_in_a_slash(
    optimised, tmp_path, capsys
):
    """``-o out.pt`` where out.pt is a directory used to get the folder format written into
    it without a word; now the suffix decides, and only a trailing slash asks for a folder."""
    from conftest import run_main

    from graphopt.lowering import check_output, pick_exporter

    target = tmp_path / "out.pt"
    target.mkdir()
    with pytest.raises(graphopt.GraphoptError, match="is an existing directory, but its suffix"):
        check_output(str(target), EXPORTERS)
    run = run_main(capsys, "optimize", "torchvision:resnet18", "--input-shape", "1,3,32,32",
                   "--passes", "cleanup", "-o", str(target),
                   "--reproducer", str(tmp_path / "repro"))  # fmt: skip
    assert run.code == 2 and "end the path with '/'" in run.stderr
    assert list(target.iterdir()) == []  # refused before any work: nothing written
    assert not (tmp_path / "repro").exists()
    assert pick_exporter(str(target) + "/", EXPORTERS).name == "folder"
    lower(optimised.ir.gm, optimised.ir.example_inputs, str(target) + "/", {}, EXPORTERS)
    assert (target / "model.py").exists() and (target / "weights.pt").exists()
    (tmp_path / "plain").mkdir()
    assert pick_exporter(str(tmp_path / "plain"), EXPORTERS).name == "folder"
    assert pick_exporter(str(tmp_path / "new.pt"), EXPORTERS).name == "pt"


class _DataDependentGate(torch.nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x - 1


def test_error_text_carries_no_terminal_escape_codes(tmp_path):
    """A real failure whose message torch colours (the ONNX exporter's 'step 1/3' when
    torch.export cannot export a module fx kept opaque): graphopt's sentence for it has no
    escape codes, whether torch's own export or the ONNX exporter's is what fails."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), _DataDependentGate()).eval()
    ir = graphopt.trace(model, (torch.randn(2, 4),), leaf_modules=["_DataDependentGate"])
    with pytest.raises(Exception) as raw:
        torch.onnx.export(ir.gm, ir.example_inputs, dynamo=True, verbose=False)
    assert "\x1b[" in str(raw.value)  # torch's own message is coloured
    assert graphopt.errors.first_line(raw.value) == (
        "Failed to export the model with torch.export. This is step 1/3 of exporting the "
        "model to ONNX. Next steps:"
    )
    with pytest.raises(graphopt.GraphoptError) as info:
        lower(ir.gm, ir.example_inputs, str(tmp_path / "m.onnx"), {}, EXPORTERS)
    text = str(info.value)
    assert "torch.export cannot export the optimised model" in text and "\x1b" not in text
    assert "data-dependent" in text
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("suffix", [".onnx", ".pt2", "/"])
def test_artifacts_leave_the_batch_free_and_are_checked_at_another_size(block, tmp_path, suffix):
    """The residual/split/concat/grouped/depthwise/attention/shared block, traced at batch
    2, is written with a free batch dim; the artifact runs at batch 5 as the eager block."""
    ir = graphopt.trace(block, (torch.randn(2, 3, 8, 8),))
    out = str(tmp_path / "m") + suffix
    check = lower(ir.gm, ir.example_inputs, out, {}, EXPORTERS)
    assert check["free_dims"] == ["batch"] and check["also_checked_at"] == {"batch": 3}
    assert read_metadata(out, EXPORTERS)["dynamic_dims"] == {"0": {"0": "batch"}}
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    exporter = EXPORTERS[{".onnx": "onnx", ".pt2": "pt2", "/": "folder"}[suffix]]
    got = exporter.load(out)(x)
    got = got[0] if isinstance(got, list | tuple) else got
    with torch.no_grad():
        torch.testing.assert_close(got, block(x), rtol=1e-4, atol=1e-4)


class _FixedBatch(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x.view(2, -1))  # the batch is written into the graph


def test_a_graph_that_fixes_the_batch_is_written_with_the_examples_shape(tmp_path):
    ir = graphopt.trace(_FixedBatch().eval(), (torch.randn(2, 2, 4),))
    check = lower(ir.gm, ir.example_inputs, str(tmp_path / "m.pt2"), {}, EXPORTERS)
    assert "free_dims" not in check and check["rel_err"] < 1e-6
    assert "dynamic_dims" not in read_metadata(str(tmp_path / "m.pt2"), EXPORTERS)
