"""The quant pass: formulas, observers, int8/QDQ/QAT forms on real models, artifacts, errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import randomize_bn, run_main
from graphopt.passes.quant import Quant, QuantReport, quant_report, sqnr_db
from graphopt.passes.quant.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageObserver,
    activation_qparams,
    fake_quantize,
    quantize_weight,
    weight_qparams,
)
from quant_helpers import batches, out_sqnr, quantize
from torch import nn

import graphopt
from graphopt import GraphIR, GraphoptError, PassContext

pytestmark = pytest.mark.usefixtures("one_thread")


def targets(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


# -- formulas --------------------------------------------------------------------------------


def test_asymmetric_qparams_cover_the_range_and_zero_exactly():
    scale, zp = activation_qparams(-1.0, 3.0, symmetric=False, qmin=0, qmax=255)
    assert scale == pytest.approx(4 / 255)
    assert zp == round(1 / scale)
    # zero is representable exactly, the ends within half a step
    assert fake_quantize(torch.tensor(0.0), scale, zp, 0, 255) == 0
    ends = fake_quantize(torch.tensor([-1.0, 3.0]), scale, zp, 0, 255)
    assert torch.allclose(ends, torch.tensor([-1.0, 3.0]), atol=scale / 2)


def test_range_is_widened_to_include_zero():
    assert activation_qparams(2.0, 4.0, symmetric=False, qmin=0, qmax=255) == (
        pytest.approx(4 / 255),
        0,
    )
    scale, zp = activation_qparams(-4.0, -2.0, symmetric=False, qmin=0, qmax=127)
    assert (scale, zp) == (pytest.approx(4 / 127), 127)


def test_symmetric_qparams_centre_the_zero_point():
    scale, zp = activation_qparams(-1.0, 3.0, symmetric=True, qmin=0, qmax=255)
    assert zp == 128 and scale == pytest.approx(6 / 255)
    assert activation_qparams(-1.0, 3.0, symmetric=True, qmin=0, qmax=127)[1] == 64


def test_degenerate_range_gets_a_positive_scale():
    scale, zp = activation_qparams(0.0, 0.0, symmetric=False, qmin=0, qmax=255)
    assert scale > 0 and zp == 0


def test_weight_scales_per_channel_and_codes():
    w = torch.tensor([[1.0, -0.5], [0.0, 0.0], [-2.54, 1.27]])
    scales = weight_qparams(w, per_channel=True)
    assert torch.allclose(scales[[0, 2]], torch.tensor([1 / 127, 2.54 / 127]))
    assert scales[1] > 0  # an all-zero channel still gets a usable scale
    codes = quantize_weight(w, scales)
    assert codes.dtype == torch.int8 and codes.abs().max() == 127
    assert codes[2].tolist() == [-127, 64]  # 1.27 / 0.02 = 63.5 rounds to even
    one = weight_qparams(w, per_channel=False)
    assert one.shape == (1,) and float(one) == pytest.approx(2.54 / 127)


def test_pair_bounded_weight_scales_cannot_saturate_int16_pair_sums():
    """pair_max bounds |code[k]| + |code[k+1]| (even k, along the input dim), the pairs
    vpmaddubsw adds in int16: the worst uint8 activations then still fit."""
    torch.manual_seed(0)
    w = torch.randn(64, 301)  # odd K: the last code pairs with padding
    w[3, 10] = w[3, 11] = 5.0  # one channel's two largest weights side by side
    scales = weight_qparams(w, per_channel=True, pair_max=127)
    codes = quantize_weight(w, scales).int()
    padded = F.pad(codes.abs(), (0, 1))
    pair_sums = padded[:, 0::2] + padded[:, 1::2]
    assert pair_sums.max() <= 128 and 255 * pair_sums.max() <= 32767
    worst = torch.where(codes > 0, 255, 0)  # uint8 activations that maximise every pair
    signed = F.pad(worst * codes, (0, 1))
    assert (signed[:, 0::2] + signed[:, 1::2]).abs().max() <= 32767
    amax = w.abs().amax(1)
    assert torch.all(scales >= amax / 127 - 1e-9) and torch.all(scales <= amax / 63.5 + 1e-9)
    assert scales[3] == pytest.approx(10 / 127)  # the side-by-side channel: the 7-bit bound
    assert (amax / scales).mean() > 85  # the largest code: 91 on average here, 7-bit's 63.5
    one = weight_qparams(w, per_channel=False, pair_max=127)
    assert one.shape == (1,) and float(one) == pytest.approx(10 / 127)


# -- observers --------------------------------------------------------------------------------


def test_minmax_and_moving_average_observers():
    mm, ma = MinMaxObserver(), MovingAverageObserver(c=0.5)
    for batch in (torch.tensor([-1.0, 2.0]), torch.tensor([0.0, 4.0])):
        mm.observe(batch)
        ma.observe(batch)
    assert mm.range() == (-1.0, 4.0)
    assert ma.range() == (pytest.approx(-0.5), pytest.approx(3.0))


def _two_passes(obs, data):
    for x in data:
        obs.observe(x)
    obs.freeze()
    for x in data:
        obs.observe_again(x)
    return obs.range()


def test_percentile_observer_clips_outliers():
    gen = torch.Generator().manual_seed(0)
    data = [torch.rand(10_000, generator=gen) for _ in range(3)]
    data[1][0] = 100.0  # one outlier in 30 000 values
    lo, hi = _two_passes(HistogramObserver("percentile", 99.9), data)
    assert lo == 0 or lo == pytest.approx(0, abs=0.01)
    assert 0.95 < hi < 1.2
    # 100th percentile keeps everything
    assert _two_passes(HistogramObserver("percentile", 100.0), data)[1] == pytest.approx(100.0)


def test_mse_observer_finds_the_best_clipping_range():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((50_000,))  # long-tailed, like activations
    lo, hi = _two_passes(HistogramObserver("mse", qmin=0, qmax=127), [x])

    def error(lo: float, hi: float) -> float:
        s, z = activation_qparams(lo, hi, symmetric=False, qmin=0, qmax=127)
        return float((fake_quantize(x, s, z, 0, 127) - x).pow(2).mean())

    full = error(float(x.min()), float(x.max()))
    brute = min(error(float(x.min()) * f, float(x.max()) * f) for f in torch.linspace(0.02, 1, 200))
    assert hi < float(x.max())
    assert error(lo, hi) < 0.85 * full  # clipping the tail pays on a Laplace
    assert error(lo, hi) < 1.1 * brute  # and the histogram estimate finds the optimum


# -- end to end on the Block model ----------------------------------------------------------------


def test_block_int8_uses_real_kernels_and_keeps_sqnr(block, block_input):
    data = batches((4, 3, 8, 8))
    result = quantize(block, block_input[0], data=data)
    gm = result.ir.gm
    ops = targets(gm)
    assert "quantized.conv2d.new" in ops and "quantized.add.default" in ops
    assert "quantized.cat.default" in ops and "quantized.linear.default" in ops
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) for m in gm.modules())
    # attention is expanded: its projections run int8, the attention core stays float
    assert not any(isinstance(m, nn.MultiheadAttention) for m in gm.modules())
    assert any(n.target is F.scaled_dot_product_attention for n in gm.graph.nodes)
    stats = result.ledger[-1].stats
    assert stats["layers quantized"] == 8 and stats["concats quantized"] == 2
    assert out_sqnr(block, gm, block_input[0]) > 25
    report = quant_report(gm)
    assert isinstance(report, QuantReport) and report.form == "int8"
    sqnrs = [s.sqnr_db for s in report.sensitivity]
    assert len(sqnrs) == 11 and sqnrs == sorted(sqnrs)
    assert any("most sensitive" in n for n in result.ledger[-1].notes)


def test_block_qdq_matches_int8(block, block_input):
    data = batches((4, 3, 8, 8))
    x = block_input[0]
    int8 = quantize(block, x, data=data).ir.gm
    qdq = quantize(block, x, "quant(form=qdq)", data=data).ir.gm
    assert "quantized_decomposed.quantize_per_tensor.default" in targets(qdq)
    with torch.no_grad():
        assert sqnr_db(int8(x), qdq(x)) > 35


def test_skip_lists_keep_layers_in_float(block, block_input):
    data = batches((4, 3, 8, 8))
    result = quantize(block, block_input[0], "quant(skip=[head],skip_types=[Conv2d])", data)
    gm = result.ir.gm
    assert isinstance(gm.get_submodule("head"), nn.Linear)
    assert sum(isinstance(m, nn.Conv2d) for m in gm.modules()) == 4  # all four stay float
    report = quant_report(gm)
    assert "head" in report.skipped and "stem" in report.skipped
    # with the convs in float the residual add has no int8 operand: int8 would only cost
    assert "add" in report.demoted and "quantized.add.default" not in targets(gm)
    assert "quantized.linear.default" in targets(gm)  # attention's projections


def test_random_calibration_warns(block, block_input):
    with pytest.warns(UserWarning, match="no calibration data"):
        result = quantize(block, block_input[0])
    assert any("random inputs" in n for n in result.ledger[-1].notes)


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile"])
def test_other_observers_end_to_end(block, block_input, observer):
    data = batches((4, 3, 8, 8))
    gm = quantize(block, block_input[0], f"quant(observer={observer})", data).ir.gm
    assert out_sqnr(block, gm, block_input[0]) > 20


def test_symmetric_activations(block, block_input):
    data = batches((4, 3, 8, 8))
    result = quantize(block, block_input[0], "quant(symmetric=true)", data)
    zero_points = {zp for _, zp in quant_report(result.ir.gm).qparams.values()}
    assert zero_points == {64}
    assert out_sqnr(block, result.ir.gm, block_input[0]) > 20


# -- torchvision models at small resolution ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "floor"), [("resnet18", 22.0), ("mobilenet_v2", 25.0)])
def test_torchvision_sqnr(arch, floor):
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, arch)(weights=None)).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    result = quantize(model, x, data=batches((4, 3, 64, 64), n=4))
    assert out_sqnr(model, result.ir.gm, x) > floor
    assert result.ledger[-1].stats["BN folded first"] > 0
    assert not any(isinstance(m, nn.Conv2d) for m in result.ir.gm.modules())


# -- real data: a CNN trained on load_digits ------------------------------------------------------


class DigitsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(d.target)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=gen)
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(12):
        for i in range(0, len(train), 64):
            idx = train[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model, x[train], x[test], y[test]


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) * 100


def test_digits_int8_accuracy_within_one_point(digits):
    model, x_train, x_test, y_test = digits
    data = [(x_train[i : i + 64],) for i in range(0, 640, 64)]
    result = quantize(model, x_test[:2], data=data)
    base, int8 = accuracy(model, x_test, y_test), accuracy(result.ir.gm, x_test, y_test)
    assert base > 90
    assert int8 >= base - 1.0, (base, int8)
    # packed int8 weights still count as parameters, in the ledger and per node: as many as
    # the BatchNorm-folded float model has
    folded = quantize(model, x_test[:2], pipeline="fold").ledger[-1].params
    assert result.ledger[-1].params == folded
    assert sum(c.params for c in result.ir.costs().values()) == folded


def test_qat_trains_through_fake_quant_then_converts(digits):
    model, x_train, x_test, _ = digits
    data = [(x_train[i : i + 64],) for i in range(0, 640, 64)]
    qat = quantize(model, x_test[:2], "quant(form=qat)", data=data).ir.gm
    assert any(type(m).__name__ == "FakeQuant" for m in qat.modules())
    qat.train()
    conv = qat.get_submodule("conv2")
    before = conv.parametrizations.weight.original.detach().clone()
    opt = torch.optim.SGD(qat.parameters(), lr=1e-3)
    loss = F.cross_entropy(qat(x_train[:64]), torch.zeros(64, dtype=torch.long))
    loss.backward()
    assert conv.parametrizations.weight.original.grad.abs().sum() > 0  # straight-through
    opt.step()
    assert not torch.equal(before, conv.parametrizations.weight.original)
    qat.eval()
    with torch.no_grad():
        simulated = qat(x_test)
    converted = quantize(qat, x_test[:2], data=data).ir.gm
    assert "quantized.conv2d_relu.new" in targets(converted)
    with torch.no_grad():
        assert sqnr_db(simulated, converted(x_test)) > 25


# -- dynamic mode ---------------------------------------------------------------------------------


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.lstm = nn.LSTM(32, 32, batch_first=True)
        self.out = nn.Linear(32, 5)

    def forward(self, x):
        h, _ = self.lstm(F.relu(self.embed(x)))
        return self.out(h)


def test_dynamic_quantizes_linear_and_lstm():
    torch.manual_seed(0)
    model = Tagger().eval()
    x = torch.randn(3, 7, 8)
    result = quantize(model, x, "quant(mode=dynamic)")
    kinds = {type(m).__module__ for m in result.ir.gm.children()}
    assert kinds == {
        "torch.ao.nn.quantized.dynamic.modules.linear",
        "torch.ao.nn.quantized.dynamic.modules.rnn",
    }
    assert result.ledger[-1].stats["layers quantized (dynamic)"] == 3
    assert out_sqnr(model, result.ir.gm, x) > 25


# -- artifacts ------------------------------------------------------------------------------------

NO_GRAPHOPT = textwrap.dedent(
    """
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "graphopt":
                raise ImportError("graphopt is not installed here")
    sys.meta_path.insert(0, Block())
    import torch
    model = torch.load(sys.argv[1], weights_only=False)
    x = torch.load(sys.argv[2])
    torch.save(model(x), sys.argv[3])
    assert "graphopt" not in sys.modules
    """
)


def test_int8_pt_artifact_runs_without_graphopt(block, block_input, tmp_path):
    x = block_input[0]
    result = graphopt.optimize(
        block,
        "quant",
        example_inputs=(x,),
        data=batches((4, 3, 8, 8)),
        output=str(tmp_path / "q.pt"),
    )
    torch.save(x, tmp_path / "x.pt")
    script = tmp_path / "run.py"
    script.write_text(NO_GRAPHOPT)
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            str(tmp_path / "q.pt"),
            str(tmp_path / "x.pt"),
            str(tmp_path / "y.pt"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt"), result.ir.gm(x))


def test_onnx_qdq_runs_int8_kernels_and_matches_pytorch_int8(tmp_path):
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    data = batches((4, 3, 64, 64), n=3)
    out = tmp_path / "r.onnx"
    graphopt.optimize(model, "quant(form=qdq)", example_inputs=(x,), data=data, output=str(out))
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "fused.onnx")
    session = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node}
    assert "QLinearConv" in fused and "Conv" not in fused  # int8 kernels, not float convs
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    int8 = quantize(model, x, data=data).ir.gm
    with torch.no_grad():
        ref, pt_int8 = model(x), int8(x)
    assert sqnr_db(pt_int8, got) > 20  # two int8 implementations, rounding apart
    assert abs(sqnr_db(ref, got) - sqnr_db(ref, pt_int8)) < 3


def test_cli_quantizes_with_a_data_file(tmp_path, capsys):
    torch.save(torch.randn(6, 3, 32, 32), tmp_path / "calib.pt")
    run = run_main(
        capsys,
        "optimize",
        "torchvision:resnet18",
        "--input-shape",
        "1,3,32,32",
        "--data",
        str(tmp_path / "calib.pt"),
        "--passes",
        "fold,quant",
        "-o",
        str(tmp_path / "r.pt"),
    )
    assert run.code == 0, run.stderr
    assert "layers quantized" in run.stdout and (tmp_path / "r.pt").exists()


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pipeline", "message"),
    [
        ("quant(percentile=30)", "percentile"),
        ("quant(batches=0)", "≥ 1"),
        ("quant(observer=kl)", "must be one of"),
        ("quant(form=fp8)", "must be one of"),
        ("quant(mode=dynamic,form=qdq)", "has the form"),
        ("quant(mode=dynamic)", "no Linear or LSTM"),
        ("quant(skip=[*])", "no conv, linear"),
    ],
)
def test_bad_options_are_one_sentence(pipeline, message):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(GraphoptError, match=message):
        quantize(model, x, pipeline, data=[(x,)])


def test_bad_data_and_double_quantization_are_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(GraphoptError, match="no usable batches"):
        quantize(model, x, data=[])
    with pytest.raises(GraphoptError, match="calibration batch"):
        quantize(model, x, data=[(torch.randn(1, 5, 8, 8),)])
    int8 = quantize(model, x, data=[(x,)]).ir.gm
    ctx = PassContext(probe_inputs=(x,), data=[(x,)])
    with pytest.raises(GraphoptError, match="already quantized"):
        Quant().run(GraphIR(int8, (x,)), ctx)


def test_input_model_is_not_mutated(block, block_input):
    before = {k: v.clone() for k, v in block.state_dict().items()}
    quantize(block, block_input[0], "quant(form=qat)", data=batches((4, 3, 8, 8)))
    after = block.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_qat_pipeline_with_distill(digits):
    model, x_train, x_test, y_test = digits
    labelled = [(x_train[i : i + 64], torch.arange(64) % 10) for i in range(0, 256, 64)]
    pipeline = "fold,quant(form=qat),distill(epochs=1),quant"
    result = quantize(model, x_test[:2], pipeline, data=labelled)
    steps = [e.step.split("(")[0] for e in result.ledger[1:]]
    assert steps == ["fold", "quant", "distill", "quant"]
    assert "quantized.conv2d_relu.new" in targets(result.ir.gm)
    assert not any(type(m).__name__ == "FakeQuant" for m in result.ir.gm.modules())
    assert accuracy(result.ir.gm, x_test, y_test) > 90


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_int8_form_to_export_formats_is_refused_cleanly(suffix, tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    out = tmp_path / f"m{suffix}"
    with pytest.raises(GraphoptError, match=r"only a \.pt file can hold"):
        graphopt.optimize(
            model, "quant(form=int8)", example_inputs=(x,), data=[(x,)], output=str(out)
        )
    assert not out.exists() and list(tmp_path.iterdir()) == []
    result = graphopt.optimize(model, "quant", example_inputs=(x,), data=[(x,)], output=str(out))
    assert out.exists() and quant_report(result.ir.gm).form == "qdq"


def test_default_range_does_not_overflow_avx2_kernels():
    """With 8-bit activations this conv overflows vpmaddubsw on CPUs without VNNI (fbgemm
    and onnxruntime fell to 16.6 dB here); the default 7-bit range must match simulation."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    int8 = quantize(model, x, data=[(x,)]).ir.gm
    sim = quantize(model, x, "quant(form=qdq)", data=[(x,)]).ir.gm
    with torch.no_grad():
        assert sqnr_db(sim(x), int8(x)) > 35
        assert sqnr_db(model(x), int8(x)) > 30


class Broadcasts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.shift = nn.Parameter(torch.randn(1, 8, 1, 1))

    def forward(self, x):
        y = self.conv(x) + self.shift  # broadcasting add: int8 add cannot
        return torch.relu(y) * (x.shape[1] + 1)  # an add of Python ints


def test_adds_int8_cannot_do_stay_float():
    torch.manual_seed(0)
    model, x = Broadcasts().eval(), torch.randn(2, 3, 8, 8)
    result = quantize(model, x, data=[(x,)])
    stats = dict(result.ledger[-1].stats)
    assert stats.pop("output SQNR dB") > 25 and stats == {"layers quantized": 1}
    assert out_sqnr(model, result.ir.gm, x) > 30


def test_sensitivity_is_not_fooled_by_in_place_activations():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.SiLU(inplace=True),
        nn.Conv2d(8, 8, 3),
        nn.Hardswish(inplace=True),
        nn.Conv2d(8, 8, 3),
        nn.ReLU6(),  # the layer is quantized over [0, 6]: compared after the clamp
    ).eval()
    x = torch.randn(2, 3, 12, 12)
    report = quant_report(quantize(model, x, data=[(x,)]).ir.gm)
    assert report is not None and len(report.sensitivity) == 3
    assert all(row.sqnr_db > 25 for row in report.sensitivity), report.sensitivity
