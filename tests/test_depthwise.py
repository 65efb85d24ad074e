"""Tests of the ``depthwise`` pass: exactness at full rank, per-channel optimality, the three
rules that choose T, what it leaves alone, and accuracy recovery on real data."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import randomize_bn
from graphopt.passes.depthwise import Depthwise, depthwise_factors
from sklearn.datasets import load_digits
from torch import nn

import graphopt

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(model: nn.Module, pipeline: str, x: torch.Tensor) -> graphopt.Result:
    return graphopt.PassManager(pipeline, reproducer=False).run(graphopt.trace(model.eval(), (x,)))


def _pairs(gm: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    """The depthwise/pointwise pairs the pass inserted, keyed by the replaced module path."""
    mods = dict(gm.named_modules())
    return {
        path[: -len("_dw")]: (mods[path], mods[path[: -len("_dw")] + "_pw"])
        for path in mods
        if path.endswith("_dw")
    }


def _effective_weight(dw: nn.Module, pw: nn.Module) -> torch.Tensor:
    """The N×C×k… weight of one convolution that computes what the pair computes."""
    c = dw.in_channels
    t = dw.out_channels // c
    kernels = dw.weight.detach().double().reshape(c, t, -1)  # C×T×k²
    mix = pw.weight.detach().double().reshape(pw.out_channels, c, t)  # N×C×T
    out = torch.einsum("nct,ctk->nck", mix, kernels)
    return out.reshape(pw.out_channels, c, *dw.kernel_size)


def _slice_singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Per input channel, the singular values of its N×k² slice (C×min(N, k²))."""
    n, c = weight.shape[:2]
    return torch.linalg.svdvals(weight.detach().double().reshape(n, c, -1).transpose(0, 1))


def _relative_weight_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    ref = weight.detach().double()
    return float((ref - approx).norm() / ref.norm())


# -- exactness and optimality ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv2d(8, 16, 3, padding=1), (2, 8, 12, 12)),
        (nn.Conv2d(6, 20, (3, 5), stride=2, padding=(2, 1), dilation=2), (2, 6, 17, 15)),
        (nn.Conv2d(5, 7, 4, padding="same", padding_mode="reflect", bias=False), (1, 5, 9, 9)),
        (nn.Conv2d(4, 32, 7, stride=3, padding=3, padding_mode="circular"), (1, 4, 20, 20)),
        (nn.Conv1d(3, 12, 5, stride=2, dilation=3, padding=4), (2, 3, 40)),
        (nn.Conv3d(4, 10, 3, stride=(1, 2, 2), padding=1), (1, 4, 6, 8, 8)),
    ],
    ids=["3x3", "3x5-stride-dilation", "same-reflect-nobias", "7x7-circular", "conv1d", "conv3d"],
)
def test_full_rank_is_exact_and_keeps_shapes(conv: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape)
    model = nn.Sequential(conv).eval()
    with torch.no_grad():
        ref = model(x)
    result = _run(model, "depthwise(rank=1000,only_if_saves=false)", x)
    with torch.no_grad():
        out = result.ir.gm(x)
    assert out.shape == ref.shape
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5  # max relative error
    (dw, pw), *_ = _pairs(result.ir.gm).values()
    full = min(conv.out_channels, math.prod(conv.kernel_size))
    assert (dw.groups, dw.out_channels, dw.stride, dw.dilation) == (
        conv.in_channels,
        conv.in_channels * full,
        conv.stride,
        conv.dilation,
    )
    assert math.prod(pw.kernel_size) == 1 and pw.groups == 1
    assert (pw.bias is None) == (conv.bias is None)
    assert f"T={full}/{full}" in " ".join(result.ledger[-1].notes)


@pytest.mark.parametrize("out_channels", [12, 4], ids=["N>k2", "N<k2"])
def test_each_channel_gets_its_best_rank_t_approximation(out_channels: int) -> None:
    """Eckart–Young: per input channel, the rank-T slice error is the tail of its singular
    values, and no other rank-T factorisation of the slice does better."""
    g = torch.Generator().manual_seed(0)
    n = out_channels
    weight = torch.randn(n, 5, 3, 3, generator=g, dtype=torch.float64)
    weight[:, 0] *= 1e-3  # channels of very different scale
    sigma = _slice_singular_values(weight)
    for rank in range(1, min(n, 9) + 1):
        dw, pw = depthwise_factors(weight, rank)
        conv_dw = nn.Conv2d(5, 5 * rank, 3, groups=5, bias=False, dtype=torch.float64)
        conv_pw = nn.Conv2d(5 * rank, n, 1, bias=False, dtype=torch.float64)
        conv_dw.weight.data, conv_pw.weight.data = dw, pw
        approx = _effective_weight(conv_dw, conv_pw)
        err2 = (weight - approx).pow(2).sum(dim=(0, 2, 3))  # per input channel
        torch.testing.assert_close(err2, sigma[:, rank:].pow(2).sum(1), atol=1e-12, rtol=1e-8)
        # √S on each side: the depthwise and pointwise factors have the same norm per channel
        torch.testing.assert_close(
            dw.reshape(5, -1).norm(dim=1), pw.reshape(n, 5, -1).norm(dim=(0, 2)), rtol=1e-9, atol=0
        )
        for _ in range(20):  # the best fit onto a random rank-T row space is never better
            basis = torch.linalg.qr(torch.randn(5, 9, rank, generator=g, dtype=torch.float64))[0]
            slices = weight.reshape(n, 5, 9).transpose(0, 1)
            rival = slices @ basis @ basis.transpose(1, 2)
            assert bool(((slices - rival).pow(2).sum((1, 2)) >= err2 - 1e-9).all())


# -- rules that choose T, on a real architecture ------------------------------------------------


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    return model, torch.randn(2, 3, 64, 64)


def _eligible_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.groups == 1 and math.prod(m.kernel_size) > 1
    }


def test_error_budget_picks_the_smallest_rank_within_it(resnet) -> None:
    model, x = resnet
    result = _run(model, "depthwise(max_error=0.6)", x)
    pairs = _pairs(result.ir.gm)
    assert set(pairs) == set(_eligible_convs(model))  # every 3×3/7×7 conv saves at this budget
    for path, (dw, pw) in pairs.items():
        weight = model.get_submodule(path).weight
        rank = dw.out_channels // dw.in_channels
        error = _relative_weight_error(weight, _effective_weight(dw, pw))
        assert error <= 0.6
        tail = _slice_singular_values(weight).pow(2)
        below = float((tail[:, rank - 1 :].sum() / tail.sum()).sqrt())
        assert rank == 1 or below > 0.6  # one rank less would break the budget
        assert f"relative weight error {error:.3g}" in " ".join(result.ledger[-1].notes)
    # the pass's own MAC accounting agrees with graphopt's FLOP-counter analysis
    entry = result.ledger[-1]
    assert result.ledger[0].macs - entry.macs == pytest.approx(entry.stats["MACs saved"], abs=20)
    assert any("follow it with distill" in note for note in entry.notes)
    assert not entry.exact


def test_macs_target_picks_the_largest_rank_within_it(resnet) -> None:
    model, x = resnet
    result = _run(model, "depthwise(macs_ratio=0.4)", x)
    before = graphopt.trace(model, (x,)).costs()
    after = result.ir.costs()
    pairs = _pairs(result.ir.gm)
    assert pairs
    for path, (dw, _) in pairs.items():
        conv = model.get_submodule(path)
        rank = dw.out_channels // dw.in_channels
        n, k2 = conv.out_channels, math.prod(conv.kernel_size)
        assert rank / n + rank / k2 <= 0.4 < (rank + 1) / n + (rank + 1) / k2
        node = path.replace(".", "_")
        pair_macs = after[node + "_dw"].macs + after[node + "_pw"].macs
        assert pair_macs == pytest.approx((rank / n + rank / k2) * before[node].macs, rel=1e-6)
    # conv1 (3 input channels, 64 outputs, 7×7) can reach 0.4; every layer is replaced
    assert set(pairs) == set(_eligible_convs(model))
    assert result.ledger[-1].macs < 0.45 * result.ledger[0].macs


def test_fixed_rank_ignore_and_unprofitable_layers(resnet) -> None:
    model, x = resnet
    result = _run(model, "depthwise(rank=4,ignore=[layer1.*,conv1])", x)
    pairs = _pairs(result.ir.gm)
    expected = {p for p in _eligible_convs(model) if not p.startswith("layer1.") and p != "conv1"}
    assert set(pairs) == expected
    assert all(dw.out_channels == 4 * dw.in_channels for dw, _ in pairs.values())
    notes = result.ledger[-1].notes
    assert "kept conv1: ignored" in notes and "kept layer1.0.conv1: ignored" in notes
    # a rank that costs more than the original is left alone and said so
    narrow = nn.Sequential(nn.Conv2d(4, 6, 3), nn.Conv2d(6, 6, 1), nn.Conv2d(6, 12, 3, groups=3))
    result = _run(narrow, "depthwise(rank=5)", torch.randn(1, 4, 9, 9))
    assert not _pairs(result.ir.gm)  # 5/6 + 5/9 > 1; 1×1 and grouped convs are not eligible
    assert any("kept 0: T=5" in n and "1.39× its MACs" in n for n in result.ledger[-1].notes)


def test_block_model_exact_at_full_rank_and_lossy_below(block, block_input) -> None:
    """On the shared Block (residual add, split, concat, grouped and depthwise convs, attention,
    a shared 1×1 conv) only the stem is a standard k×k conv; everything else is untouched."""
    (x,) = block_input
    before = {k: v.clone() for k, v in block.state_dict().items()}
    with torch.no_grad():
        ref = block(x)
    exact = _run(block, "depthwise(rank=9,only_if_saves=false)", x)
    assert list(_pairs(exact.ir.gm)) == ["stem"]
    mods = dict(exact.ir.gm.named_modules())
    for path in ("grouped", "depthwise", "shared"):
        assert mods[path].weight is not block.get_submodule(path).weight  # the pass's copy
        torch.testing.assert_close(mods[path].weight, block.get_submodule(path).weight)
    with torch.no_grad():
        out = exact.ir.gm(x)
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert exact.ledger[-1].rel_err <= 1e-5

    lossy = _run(block, "depthwise(rank=1)", x)
    dw, pw = _pairs(lossy.ir.gm)["stem"]
    assert (dw.out_channels, pw.in_channels) == (3, 3)
    with torch.no_grad():
        deviation = float((lossy.ir.gm(x) - ref).norm() / ref.norm())
    assert deviation > 1e-3  # rank 1 of a random 16×9 slice is far from exact …
    assert lossy.ledger[-1].rel_err > 1e-3  # … and the ledger says so
    assert lossy.ledger[-1].stats["layers replaced"] == 1
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in before.items())


def test_module_called_twice_is_replaced_once_and_shared() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(torch.relu(self.conv(x)))

    x = torch.randn(1, 8, 6, 6)
    model = Twice().eval()
    result = _run(model, "depthwise(rank=9,only_if_saves=false)", x)
    assert list(_pairs(result.ir.gm)) == ["conv"]
    assert len(result.ir.nodes(op="call_module")) == 4
    torch.testing.assert_close(result.ir.gm(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("pipeline", "message"),
    [
        ("depthwise(rank=2,macs_ratio=0.5)", "give only one of rank, macs_ratio or max_error"),
        ("depthwise(rank=2,max_error=0.3)", "give only one of rank, macs_ratio or max_error"),
        ("depthwise(max_error=0.1,rank=2)", "give only one of rank, macs_ratio or max_error"),
        ("depthwise(rank=0)", "expected a whole number ≥ 1"),
        ("depthwise(macs_ratio=1.5)", "expected a fraction in (0, 1]"),
        ("depthwise(max_error=1)", "expected a relative error in [0, 1)"),
        ("depthwise(ignore=[nosuchlayer])", "'nosuchlayer' matches no convolution"),
    ],
)
def test_bad_options_are_one_sentence_errors(pipeline: str, message: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(graphopt.GraphoptError, match=None) as info:
        _run(model, pipeline, x)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_registered_as_a_lossy_builtin() -> None:
    registry = graphopt.get_registry()
    assert registry.passes["depthwise"] is Depthwise
    assert registry.pass_owner["depthwise"] == "graphopt.passes"
    assert not Depthwise.exact


# -- accuracy on real data: substitution, then recovery against the original -------------------


class DigitsNet(nn.Module):
    """A small CNN for the 8×8 digits of scikit-learn."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1300], y[:1300], x[1300:], y[1300:]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    teacher: nn.Module | None = None,
) -> None:
    """Plain training, or knowledge distillation from ``teacher`` (soft targets + labels)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y), generator=g).split(64):
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            if teacher is not None:
                with torch.no_grad():
                    soft = F.softmax(teacher(x[idx]) / 2.0, dim=1)
                kd = F.kl_div(F.log_softmax(logits / 2.0, dim=1), soft, reduction="batchmean")
                loss = 0.5 * loss + 0.5 * 4.0 * kd
            opt.zero_grad()
            loss.backward()
            opt.step()


def test_digits_cnn_within_two_points_after_depthwise_and_distill() -> None:
    """The issue's accuracy check: substitute at 40 % of the MACs, then the pipeline's own
    recovery passes (BatchNorm recalibration, knowledge distillation) on real data."""
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = _digits()
    teacher = DigitsNet()
    _fit(teacher, x_train, y_train, epochs=8, lr=1e-2)
    original = _accuracy(teacher, x_test, y_test)
    assert original > 0.95

    substituted = _run(teacher, "depthwise(macs_ratio=0.4)", x_test[:8])
    assert len(_pairs(substituted.ir.gm)) == 3
    assert substituted.ledger[-1].macs < 0.4 * substituted.ledger[0].macs
    lossy = _accuracy(substituted.ir.gm, x_test, y_test)
    assert lossy < original - 0.2  # far off without recovery at this target

    # training batches only (no validation split: distill keeps the last epoch); the 497
    # test images are only used to measure
    train = [(x_train[i : i + 64], y_train[i : i + 64]) for i in range(0, len(y_train), 64)]
    pipeline = "depthwise(macs_ratio=0.4),bnrecal,distill(epochs=8,lr=0.003,progress=false)"
    manager = graphopt.PassManager(pipeline, reproducer=False)
    result = manager.run(graphopt.trace(teacher.eval(), (x_test[:8],)), data=train)
    recovered = _accuracy(result.ir.gm, x_test, y_test)
    assert [e.step.split("(")[0] for e in result.ledger[1:]] == ["depthwise", "bnrecal", "distill"]
    print(
        f"digits accuracy: original {original:.4f}, after depthwise {lossy:.4f}, after "
        f"bnrecal + distill {recovered:.4f}"
    )
    assert recovered >= original - 0.02
