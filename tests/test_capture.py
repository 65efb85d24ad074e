"""The two capture paths: torch.fx symbolic tracing and torch.export raised to the same
vocabulary (leaf-module calls, torch functions and tensor methods), the choice between them
(``capture=`` / ``--capture``), ``.pt2`` programs given as MODEL, and the passes on what
export captured."""

from __future__ import annotations

import collections
import operator
import pickle
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import run_graphopt, run_main
from torch import nn

import graphopt
from graphopt.capture import symbolic_trace
from graphopt.ir import GraphIR
from graphopt.raising import raise_program

pytestmark = pytest.mark.usefixtures("one_thread")

aten = torch.ops.aten


def _aten_ops(ir: GraphIR) -> list[str]:
    return [str(n.target) for n in ir.graph.nodes if isinstance(n.target, torch._ops.OpOverload)]


def _module_calls(ir: GraphIR) -> collections.Counter:
    return collections.Counter(str(n.target) for n in ir.graph.nodes if n.op == "call_module")


# -- raising: the vocabulary of fx ------------------------------------------------------------


def test_export_of_the_test_block_speaks_fx_vocabulary(block, block_input):
    """Residual add, split, concat, grouped and depthwise convs, attention called with three
    arguments, a module called twice: the same module calls as fx, no ATen op left."""
    fx_ir = GraphIR.trace(block, block_input, capture="fx")
    ex_ir = GraphIR.trace(block, block_input, capture="export")
    assert ex_ir.capture == "export" and fx_ir.capture == "fx"
    assert _aten_ops(ex_ir) == []
    # export records no op for an Identity: that call vanishes, nothing else
    fx_calls = _module_calls(fx_ir)
    del fx_calls["ident"]
    assert _module_calls(ex_ir) == fx_calls
    attn = ex_ir.nodes(op="call_module", target="attn")[0]
    assert len(attn.args) == 3 and attn.args[0] is attn.args[1] is attn.args[2]
    shared = ex_ir.nodes(op="call_module", target="shared")
    assert [n.name for n in shared] == ["shared", "shared_1"]
    targets = {n.target for n in ex_ir.graph.nodes}
    assert {operator.add, torch.cat, torch.split, F.relu, operator.getitem} <= targets
    with torch.no_grad():
        torch.testing.assert_close(ex_ir.gm(*block_input), block(*block_input))
    ex_ir.analysis("shapes")
    assert ex_ir.total_macs() == fx_ir.total_macs()
    assert ex_ir.total_params() == fx_ir.total_params()


def test_names_come_from_module_paths():
    """Module calls are named as fx names them; functions after the module they ran in."""
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    exported = GraphIR.trace(model, (x,), capture="export")
    traced = GraphIR.trace(model, (x,), capture="fx")
    calls = [n.name for n in exported.graph.nodes if n.op == "call_module"]
    assert calls == [n.name for n in traced.graph.nodes if n.op == "call_module"]
    functions = [n.name for n in exported.graph.nodes if n.op == "call_function"]
    assert functions[:2] == ["layer1_0_add", "layer1_1_add"] and functions[-1] == "flatten"
    assert "layer1_0_relu_1" in calls
    stack = exported.nodes(name="layer1_0_add")[0].meta["nn_module_stack"]
    assert list(stack) == ["layer1", "layer1.0"]
    assert stack["layer1.0"][1] is torchvision.models.resnet.BasicBlock


class _Aliasing(nn.Module):
    """An in-place op whose effect another view reads, and one nobody else sees."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = x * 2
        seen = a.view(-1)
        a.relu_()  # `seen` is read after: must stay in place
        b = x - 1
        b.relu_()  # nothing else reads b's old value: may run out of place
        return seen + 1, b


def test_in_place_ops_run_out_of_place_only_where_unseen():
    x = torch.randn(2, 3)
    ir = GraphIR.trace(_Aliasing(), (x,), capture="export")
    assert _aten_ops(ir) == ["aten.relu_.default"]
    assert len(ir.nodes(target=F.relu)) == 1
    for got, want in zip(ir.gm(x), _Aliasing()(x), strict=True):
        torch.testing.assert_close(got, want)


class Pair(NamedTuple):
    logits: torch.Tensor
    extra: torch.Tensor


class _Structured(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> tuple[Pair, dict[str, torch.Tensor], None]:
        self.calls += 1  # a buffer the forward writes
        y = self.fc(x) + torch.tensor([1.0, 2.0, 3.0])  # a constant made in forward
        return Pair(y, y.sum(1)), {"double": 2 * y}, None


def test_outputs_keep_their_types_and_buffers_their_updates(tmp_path):
    model = _Structured().eval()
    x = torch.randn(2, 4)
    ir = GraphIR.trace(model, (x,), capture="export")
    reference = _Structured().eval()
    reference.load_state_dict(model.state_dict())
    got, want = ir.gm(x), reference(x)
    assert type(got[0]) is Pair and got[2] is None and list(got[1]) == ["double"]
    torch.testing.assert_close(got[0].logits, want[0].logits)
    torch.testing.assert_close(got[1]["double"], want[1]["double"])
    assert float(ir.gm.get_buffer("calls")) == float(reference.calls) == 1.0
    # the output node holds the plain leaves (what passes look at) ...
    output = next(n for n in ir.graph.nodes if n.op == "output")
    assert [type(a).__name__ for a in output.args[0]] == ["Node", "Node", "Node", "NoneType"]
    # ... and a pickled copy still returns the named tuple
    path = tmp_path / "m.pt"
    torch.save(ir.gm, path)
    again = torch.load(path, weights_only=False)
    assert type(again(x)[0]) is Pair


class _Normalised(nn.Module):
    """F.normalize decomposes into an ATen op with no torch-level twin."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.b(F.normalize(self.a(x), dim=1))))


def test_ops_left_in_aten_are_safe_for_the_passes():
    """prune freezes the channels an ATen op touches and prunes the rest; quant leaves the
    op in float and the model runs."""
    ir = GraphIR.trace(_Normalised().eval(), (torch.randn(1, 3, 16, 16),), capture="export")
    left = _aten_ops(ir)
    assert left and all("linalg_vector_norm" in op for op in left)
    pruned = graphopt.optimize(ir, "prune(ratio=0.5)")
    notes = " ".join(pruned.ledger[-1].notes)
    assert "linalg_vector_norm" in notes
    assert pruned.ledger[-1].macs < pruned.ledger[0].macs
    assert pruned.ir.module(pruned.ir.nodes(op="call_module", target="a")[0]).out_channels == 16
    quantized = graphopt.optimize(ir, "quant")
    assert quantized.ledger[-1].rel_err < 0.2
    assert any(isinstance(n.target, torch._ops.OpOverload) for n in quantized.ir.graph.nodes)


def test_optional_arguments_are_fixed_to_their_defaults_for_fx():
    class Optional(nn.Module):
        def forward(self, x, mask=None, scale: float = 2.0, *, flag: bool = False):
            y = x * scale
            return y if mask is None else y * mask

    gm = symbolic_trace(Optional(), 1)
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    x = torch.randn(3)
    torch.testing.assert_close(gm(x), x * 2)


# -- .pt2 programs given as MODEL ----------------------------------------------------------


@pytest.fixture(scope="module")
def resnet_pt2(tmp_path_factory) -> str:
    """torchvision's ResNet-18 saved by torch.export.save, and a decomposed copy beside it."""
    folder = tmp_path_factory.mktemp("programs")
    model = torchvision.models.resnet18().eval()
    program = torch.export.export(model, (torch.randn(1, 3, 32, 32),))
    torch.export.save(program, folder / "resnet18.pt2")
    torch.export.save(program.run_decompositions(), folder / "decomposed.pt2")
    return str(folder / "resnet18.pt2")


def test_a_saved_program_is_raised_and_really_pruned_folded_and_quantized(resnet_pt2):
    ir = graphopt.load(resnet_pt2)
    assert ir.capture == "export" and _aten_ops(ir) == []
    kinds = collections.Counter(type(ir.module(n)).__name__ for n in ir.nodes(op="call_module"))
    assert kinds == {"Conv2d": 20, "BatchNorm2d": 20, "Linear": 1}
    result = graphopt.optimize(ir, "prune(ratio=0.5),fold,quant")
    macs = [e.macs for e in result.ledger]
    assert macs[1] <= 0.6 * macs[0]
    assert not result.ir.nodes(module_type=nn.BatchNorm2d)
    assert result.ledger[-1].stats["layers quantized"] >= 20


def test_a_decomposed_program_gets_its_layers_back(resnet_pt2):
    decomposed = resnet_pt2.replace("resnet18.pt2", "decomposed.pt2")
    ir = graphopt.load(decomposed)
    kinds = collections.Counter(type(ir.module(n)).__name__ for n in ir.nodes(op="call_module"))
    assert kinds["Conv2d"] == 20 and kinds["BatchNorm2d"] == 20 and kinds["Linear"] == 1
    x = ir.example_inputs[0]
    program = torch.export.load(decomposed)
    torch.testing.assert_close(ir.gm(x), program.module()(x))


class _EveryLayer(nn.Module):
    """One of each layer a program's functions are rebuilt into, odd settings included."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8, padding_idx=0)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.bn1d = nn.BatchNorm1d(8)
        self.conv = nn.Conv2d(1, 4, 3, padding="same", bias=False)
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.gn = nn.GroupNorm(3, 6)
        self.ln = nn.LayerNorm(16, bias=False)
        self.fc = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        seq = self.bn1d(self.conv1d(self.embed(ids).transpose(1, 2)))  # B×8×L
        image = self.gn(self.up(self.conv(seq.unsqueeze(1))))  # B×6×16×2L
        return self.fc(self.ln(image.mean(1).transpose(1, 2)))


def test_a_program_without_its_model_gets_every_layer_rebuilt(tmp_path):
    from conftest import randomize_bn

    model = randomize_bn(_EveryLayer()).eval()
    ids = torch.randint(0, 20, (2, 8))
    torch.export.save(torch.export.export(model, (ids,)), tmp_path / "layers.pt2")
    ir = graphopt.load(str(tmp_path / "layers.pt2"))
    assert _aten_ops(ir) == []
    kinds = {str(n.target): type(ir.module(n)) for n in ir.nodes(op="call_module")}
    assert kinds == {name: type(m) for name, m in model.named_children()}
    for name, m in model.named_children():
        assert ir.gm.get_submodule(name).extra_repr() == m.extra_repr()
    with torch.no_grad():
        torch.testing.assert_close(ir.gm(ids), model(ids))


def test_graphopt_pt2_artifacts_go_through_more_passes(tmp_path, capsys):
    first, second = tmp_path / "a.pt2", tmp_path / "b.pt"
    shape = ["--input-shape", "1,3,32,32"]
    run = run_main(capsys, "optimize", "torchvision:resnet18", *shape, "--passes", "cleanup",
                   "-o", str(first))  # fmt: skip
    assert run.code == 0, run.stderr
    run = run_main(capsys, "optimize", str(first), "--passes", "prune(ratio=0.5),fold,quant",
                   "-o", str(second), "--report-json", str(tmp_path / "r.json"))  # fmt: skip
    assert run.code == 0, run.stderr
    import json

    ledger = json.loads((tmp_path / "r.json").read_text())["ledger"]
    assert ledger[1]["macs"] <= 0.6 * ledger[0]["macs"]
    assert ledger[2]["stats"]["BN folded"] == 20


def test_a_raised_program_pickles_without_fake_tensors(resnet_pt2):
    program = torch.export.load(resnet_pt2)
    gm = raise_program(program)
    gm2 = pickle.loads(pickle.dumps(gm))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(gm2(x), gm(x))


# -- choosing the path: capture=, --capture, and the errors -----------------------------------


def test_capture_modes_in_python(block, block_input):
    assert graphopt.trace(block, block_input).capture == "fx"
    assert graphopt.trace(block, block_input, capture="export").capture == "export"
    with pytest.raises(graphopt.GraphoptError, match="capture must be one of auto, fx, export"):
        graphopt.trace(block, block_input, capture="jit")


def test_capture_flag_on_the_command_line(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    small = ["models_for_cli:small_cnn", "--input-shape", "2,3,16,16"]
    run = run_main(capsys, "inspect", *small, "--capture", "export", "--format", "json")
    assert run.code == 0, run.stderr
    import json

    kinds = [n["module"] for n in json.loads(run.stdout)["nodes"] if n["op"] == "call_module"]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "Dropout", "AdaptiveAvgPool2d",
                     "Flatten", "Linear"]  # fmt: skip
    branchy = ["models_for_cli:branchy", "--input-shape", "1,4", "--passes", "cleanup"]
    branchy += ["-o", "x.pt"]
    cases = [
        (["--capture", "export"], "cannot capture the model with torch.export: the code "
         "branches on a tensor's values at"),
        (["--capture", "fx"], "cannot trace the model with torch.fx: symbolically traced"),
        (["--capture", "sideways"], "--capture must be auto, fx or export, not 'sideways'"),
    ]  # fmt: skip
    for extra, fragment in cases:
        run = run_main(capsys, "optimize", *branchy, *extra)
        assert run.code == 2 and fragment in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1


def test_both_paths_failing_is_one_sentence_in_a_real_process(tmp_path):
    from pathlib import Path

    tests = Path(__file__).parent
    run = run_graphopt(
        "optimize",
        "models_for_cli:branchy",
        "--input-shape",
        "1,4",
        "--passes",
        "cleanup",
        "-o",
        str(tmp_path / "o.pt"),
        cwd=tests,
        env={"PYTHONPATH": str(tests)},
    )
    assert run.code == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert "torch.fx failed (" in lines[0] and ") and torch.export failed (" in lines[0]
    assert "models_for_cli.py:" in lines[0] and "--leaf-module Branchy" in lines[0]
    assert not list(tmp_path.iterdir())
