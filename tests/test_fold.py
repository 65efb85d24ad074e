"""The fold pass: exact BatchNorm folding, and every case it must refuse, named in its report."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn
from graphopt.passes.fold import Fold
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import graphopt
from graphopt import GraphIR, GraphoptError, PassContext, PassManager, deviation

LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
BN = nn.modules.batchnorm._BatchNorm


pytestmark = pytest.mark.usefixtures("one_thread")


def fold(model: nn.Module, x: torch.Tensor, pipeline: str = "fold", **trace):
    """Run the pipeline through the pass manager; return the result and its last ledger row."""
    ir = GraphIR.trace(model, (x,), **trace)
    result = PassManager(pipeline, reproducer=False).run(ir)
    return result, result.ledger[-1]


def rel_err(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return deviation(a(x), b(x)).rel_err


def bn_after_layer(ir: GraphIR) -> list[str]:
    """BatchNorm modules still fed directly by a conv or linear module (what fold removes)."""
    return [
        n.name
        for n in ir.nodes(module_type=BN)
        if n.args[0].op == "call_module" and isinstance(ir.module(n.args[0]), LAYERS)
    ]


# -- torchvision models ---------------------------------------------------------------------

MODELS = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "densenet121",
    "regnet_y_400mf",
    "shufflenet_v2_x1_0",
    "convnext_tiny",
    "googlenet",
    "inception_v3",
    "vgg11_bn",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_torchvision_models_fold_exactly(name):
    ir = graphopt.load(f"torchvision:{name}")  # eval mode, input at the model's default size
    randomize_bn(ir.gm, seed=len(name))
    before = len(ir.nodes(module_type=BN))
    result = PassManager("fold", reproducer=False).run(ir)
    entry = result.ledger[-1]
    after = len(result.ir.nodes(module_type=BN))
    assert entry.rel_err <= 1e-5, entry
    assert bn_after_layer(result.ir) == []
    assert entry.stats.get("BN folded", 0) == before - after
    # every BatchNorm left has no conv or linear before it; none is kept for another reason
    assert all("no conv or linear before it" in note for note in entry.notes), entry.notes
    if name == "convnext_tiny":  # LayerNorm only: nothing to fold, nothing changed
        assert before == 0 and entry.max_abs_err == 0.0
    elif name == "densenet121":  # pre-activation: BN after concat/ReLU cannot fold backwards
        assert 0 < after < before
    else:
        assert before > 0 and after == 0
    assert entry.params <= result.ledger[0].params


# -- property tests -------------------------------------------------------------------------

_CONV = {
    (1, False): nn.Conv1d,
    (2, False): nn.Conv2d,
    (3, False): nn.Conv3d,
    (1, True): nn.ConvTranspose1d,
    (2, True): nn.ConvTranspose2d,
    (3, True): nn.ConvTranspose3d,
}
_BN_ND = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@st.composite
def conv_configs(draw, transposed=st.booleans()):
    dims = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 4]))
    return {
        "dims": dims,
        "transposed": draw(transposed),
        "in_channels": groups * draw(st.integers(1, 2)),
        "out_channels": groups * draw(st.integers(1, 3)),
        "kernel_size": draw(st.integers(1, 3)),
        "stride": draw(st.integers(1, 2)),
        "padding": draw(st.integers(0, 2)),
        "dilation": draw(st.integers(1, 2)),
        "groups": groups,
        "bias": draw(st.booleans()),
        "affine": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def _conv_input(cfg: dict) -> torch.Tensor:
    size = {1: 9, 2: 7, 3: 5}[cfg["dims"]]
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    return torch.randn(2, cfg["in_channels"], *[size] * cfg["dims"], generator=gen)


def _conv(cfg: dict, **overrides) -> nn.Module:
    keys = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")
    kwargs = {k: cfg[k] for k in keys}
    kwargs.update(groups=cfg["groups"], bias=cfg["bias"], **overrides)
    return _CONV[cfg["dims"], cfg["transposed"]](**kwargs)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs())
def test_conv_then_bn_folds_exactly(cfg):
    torch.manual_seed(cfg["seed"])
    bn = _BN_ND[cfg["dims"]](cfg["out_channels"], affine=cfg["affine"], eps=1e-3)
    model = randomize_bn(nn.Sequential(_conv(cfg), bn), seed=cfg["seed"]).eval()
    x = _conv_input(cfg)
    result, entry = fold(model, x)
    assert entry.stats == {"BN folded": 1}
    assert not result.ir.nodes(module_type=BN)
    assert rel_err(result.ir.gm, model, x) <= 1e-6
    assert result.ir.gm.get_submodule("0").bias is not None  # created when the conv had none


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    conv_configs(transposed=st.just(False)),
    st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
)
def test_bn_then_conv_folds_only_where_exact(cfg, padding_mode):
    torch.manual_seed(cfg["seed"])
    conv = _conv(cfg, padding_mode=padding_mode)
    bn = _BN_ND[cfg["dims"]](cfg["in_channels"], affine=cfg["affine"])
    model = randomize_bn(nn.Sequential(bn, conv), seed=cfg["seed"]).eval()
    x = _conv_input(cfg)
    result, entry = fold(model, x, "fold(into_next=true)")
    exact = padding_mode != "zeros" or cfg["padding"] == 0
    assert rel_err(result.ir.gm, model, x) <= 1e-6
    if exact:
        assert entry.stats == {"BN folded into next layer": 1}
        assert not result.ir.nodes(module_type=BN)
    else:
        assert entry.stats == {}
        assert any("pads with zeros" in note for note in entry.notes), entry.notes


# -- BatchNorm after a concatenation ----------------------------------------------------------


class CatThenBN(nn.Module):
    """Layers of every kind concatenated along the channels, then one BatchNorm: each
    part's slice of the BatchNorm folds into its layer."""

    def __init__(self, dims: int, parts: list[tuple[str, int, bool]]) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        conv_t = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
        self.parts = nn.ModuleList()
        for kind, out, bias in parts:
            groups = 2 if kind.startswith("grouped") else 1
            cls = conv_t if kind.endswith("transposed") else conv
            self.parts.append(cls(4, out * groups, 3, padding=1, groups=groups, bias=bias))
        width = sum(out * (2 if kind.startswith("grouped") else 1) for kind, out, _ in parts)
        self.bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](width)

    def forward(self, x):
        return self.bn(torch.cat([p(x) for p in self.parts], 1))


_KINDS = ["conv", "transposed", "grouped conv", "grouped transposed"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dims=st.integers(1, 3),
    parts=st.lists(
        st.tuples(st.sampled_from(_KINDS), st.integers(1, 3), st.booleans()), min_size=1, max_size=3
    ),
    seed=st.integers(0, 2**16),
)
def test_bn_after_concat_of_layers_folds_exactly(dims, parts, seed):
    torch.manual_seed(seed)
    model = randomize_bn(CatThenBN(dims, parts), seed).eval()
    x = torch.randn(2, 4, *[5] * dims)
    result, entry = fold(model, x)
    assert entry.stats == {"BN folded": 1} and entry.notes == []
    assert not result.ir.nodes(module_type=BN)
    assert entry.rel_err <= 1e-6


class CatCases(nn.Module):
    """A BatchNorm after ``cat`` whose parts cannot all take their slice."""

    WIDTH = {"other user": 10, "cat reused": 10, "twice": 8, "height": 4, "pooled": 10}

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(self.WIDTH[case])

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.case == "other user":
            return self.bn(torch.cat([a, b], 1)) + b.mean()
        if self.case == "cat reused":
            y = torch.cat([a, b], 1)
            return self.bn(y) * y.sum()
        if self.case == "twice":
            return self.bn(torch.cat([a, a], 1))
        if self.case == "height":  # along the height: no channel slices
            return self.bn(torch.cat([a, self.a(x.flip(2))], 2))
        return self.bn(torch.cat([a, F.avg_pool2d(b, 3, 1, 1)], 1))  # pooled


@pytest.mark.parametrize(
    ("case", "note"),
    [
        ("other user", "kept bn: channels 4-9 come from b, which also feeds mean, which need"),
        ("cat reused", "kept bn: cat also feeds sum_1, which need it unnormalised"),
        ("twice", "kept bn: channels 4-7 come from a, which appears twice in the concatenation"),
        ("height", "kept bn: cat concatenates along dim 2, not the channels it normalises"),
    ],
)
def test_bn_after_concat_is_kept_when_a_part_cannot_take_its_slice(case, note):
    model = randomize_bn(CatCases(case)).eval()
    x = torch.randn(2, 3, 6, 6)
    result, entry = fold(model, x)
    assert entry.stats == {} and result.ir.nodes(module_type=BN)
    assert any(n.startswith(note) for n in entry.notes), entry.notes
    assert entry.max_abs_err == 0.0


def test_bn_after_concat_with_a_part_from_no_layer_is_left_whole():
    """A part that does not come from a conv or linear has nowhere to put its slice; the
    BatchNorm is left as it is (not split), like one with no layer before it."""
    model = randomize_bn(CatCases("pooled")).eval()
    result, entry = fold(model, torch.randn(2, 3, 6, 6))
    assert entry.stats == {} and len(result.ir.nodes(module_type=BN)) == 1
    assert entry.notes == [
        "kept 1 BatchNorm with no conv or linear before it: bn; fold(into_next=true) tries "
        "the next layer"
    ]


class CatShared(nn.Module):
    """One conv called twice, both outputs concatenated, then a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(torch.cat([self.conv(x), self.conv(x.flip(3))], 1))


def test_bn_after_concat_of_a_shared_conv_folds_only_into_clones():
    model = randomize_bn(CatShared()).eval()
    x = torch.randn(2, 3, 6, 6)
    result, entry = fold(model, x)
    assert entry.stats == {} and result.ir.nodes(module_type=BN)
    assert any("channels 0-3 come from conv, which is used at 2 call sites" in n
               for n in entry.notes), entry.notes  # fmt: skip
    result, entry = fold(model, x, "fold(clone_shared=true)")
    assert entry.stats == {"BN folded": 1, "shared layers cloned": 1}
    assert not result.ir.nodes(module_type=BN) and entry.rel_err <= 1e-6


@pytest.mark.slow
def test_timm_nasnet_bn_after_concat_folds():
    """timm's NASNet-A (the architecture of ``nasnetalarge``, narrowed to fit the test
    budget) ends each reduction path with ``final_path_bn(torch.cat([path_1, path_2], 1))``,
    both paths 1×1 convs: every BatchNorm folds, the output unchanged."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("nasnetalarge", pretrained=False, stem_size=16, num_features=384)
    model = randomize_bn(model, 0).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    # timm's 'same' padding branches on the input size: its layers stay opaque when traced
    leaves = ["Conv2dSame", "MaxPool2dSame", "AvgPool2dSame"]
    ir = GraphIR.trace(copy.deepcopy(model), (x,), leaf_modules=leaves)
    cat_bns = [
        n
        for n in ir.nodes(module_type=BN)
        if n.args[0].op == "call_function" and n.args[0].target is torch.cat
    ]
    assert len(cat_bns) == 4
    ctx = PassContext(probe_inputs=(x,))
    Fold(Fold.Options()).run(ir, ctx)
    ir.gm.recompile()
    assert not ir.nodes(module_type=BN)
    with torch.no_grad():
        assert deviation(ir.gm(x), want).rel_err <= 1e-5


# -- hand-built models ----------------------------------------------------------------------


class SharedConv(nn.Module):
    """One conv called twice, each call followed by its own BatchNorm."""

    def __init__(self, third_site: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.third_site = third_site

    def forward(self, x):
        y = self.bn2(self.conv(torch.relu(self.bn1(self.conv(x)))))
        return self.conv(y) if self.third_site else y


@pytest.mark.parametrize("third_site", [False, True])
def test_shared_conv_is_kept_unless_cloning_is_asked_for(third_site):
    model = randomize_bn(SharedConv(third_site)).eval()
    x = torch.randn(2, 4, 8, 8)
    result, entry = fold(model, x)
    assert entry.stats == {} and len(result.ir.nodes(module_type=BN)) == 2
    assert sum("call sites" in note for note in entry.notes) == 2, entry.notes

    result, entry = fold(model, x, "fold(clone_shared=true)")
    assert entry.stats["BN folded"] == 2 and not result.ir.nodes(module_type=BN)
    assert rel_err(result.ir.gm, model, x) <= 1e-6
    convs = {str(n.target) for n in result.ir.nodes(module_type=nn.Conv2d)}
    # the last site to be folded owns the original once the others have their copies
    assert len(convs) == 3 if third_site else len(convs) == 2
    assert entry.stats["shared layers cloned"] == (2 if third_site else 1)


class SharedWeight(nn.Module):
    """One stored weight read by two functional convs, each followed by F.batch_norm."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4, 1, 1))
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        y = F.conv2d(x, self.w)
        y = F.batch_norm(y, self.bn1.running_mean, self.bn1.running_var, self.bn1.weight)
        y = F.conv2d(torch.relu(y), self.w)
        return F.batch_norm(y, self.bn2.running_mean, self.bn2.running_var, None, self.bn2.bias)


def test_shared_functional_weight_is_kept_unless_cloning_is_asked_for():
    model = randomize_bn(SharedWeight()).eval()
    x = torch.randn(2, 4, 5, 5)
    _, entry = fold(model, x)
    assert entry.stats == {} and sum("2 call sites" in note for note in entry.notes) == 2
    result, entry = fold(model, x, "fold(clone_shared=true)")
    assert entry.stats == {"BN folded": 2, "shared layers cloned": 1}
    assert not [n for n in result.ir.graph.nodes if n.target is F.batch_norm]
    assert rel_err(result.ir.gm, model, x) <= 1e-6
    # one private copy of the weight, the original reused, two new biases; no BN tensors left
    assert entry.params == 2 * 16 + 2 * 4


def test_conv_with_two_users_keeps_its_bn():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + torch.relu(y)

    model = randomize_bn(TwoUsers()).eval()
    result, entry = fold(model, torch.randn(1, 3, 8, 8))
    assert entry.stats == {} and result.ir.nodes(module_type=nn.BatchNorm2d)
    assert entry.notes == ["kept bn: conv also feeds relu, which need its unnormalised output"]


class Functional(nn.Module):
    """F.conv2d + F.batch_norm and F.linear + F.batch_norm on parameters owned by the model."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.fc = nn.Parameter(torch.randn(5, 8) * 0.3)
        for name, n in (("c", 8), ("f", 5)):
            self.register_buffer(f"{name}_mean", torch.randn(n) * 0.2)
            self.register_buffer(f"{name}_var", torch.rand(n) + 0.5)
            setattr(self, f"{name}_gamma", nn.Parameter(torch.rand(n) + 0.5))
            setattr(self, f"{name}_beta", nn.Parameter(torch.randn(n) * 0.2))

    def forward(self, x):
        y = F.conv2d(x, self.w, None, 1, 1)
        y = F.batch_norm(y, self.c_mean, self.c_var, self.c_gamma, self.c_beta, False, 0.1, 1e-3)
        y = F.linear(torch.relu(y).mean((2, 3)), self.fc)
        return F.batch_norm(y, self.f_mean, self.f_var, self.f_gamma, self.f_beta, eps=1e-5)


def test_functional_conv_linear_and_batch_norm_fold():
    model = Functional().eval()
    x = torch.randn(4, 3, 10, 10)
    result, entry = fold(model, x)
    gm = result.ir.gm
    assert entry.stats == {"BN folded": 2}
    assert not [n for n in gm.graph.nodes if n.target is F.batch_norm]
    assert rel_err(gm, model, x) <= 1e-6
    # the statistics and BN affine parameters are gone; the layers gained a bias each
    assert {name for name, _ in gm.named_parameters()} == {"w", "fc", *_new_biases(gm)}
    assert not list(gm.buffers())
    assert entry.params == 8 * 27 + 5 * 8 + 8 + 5


def _new_biases(gm: nn.Module) -> list[str]:
    return [name for name, _ in gm.named_parameters() if name.endswith("_folded_bias")]


def test_transposed_grouped_conv_scales_its_output_axis():
    conv = nn.ConvTranspose2d(6, 9, 3, stride=2, padding=1, groups=3, bias=False)
    model = randomize_bn(nn.Sequential(conv, nn.BatchNorm2d(9))).eval()
    x = torch.randn(2, 6, 5, 5)
    result, entry = fold(model, x)
    assert entry.stats == {"BN folded": 1}
    assert rel_err(result.ir.gm, model, x) <= 1e-6


def test_bn_before_conv_needs_into_next():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU())
    model = randomize_bn(model).eval()
    x = torch.randn(2, 4, 9, 9)
    result, entry = fold(model, x)
    assert entry.stats == {"BN folded": 1}
    assert entry.notes == [
        "kept 1 BatchNorm with no conv or linear before it: 0; fold(into_next=true) tries "
        "the next layer"
    ]
    result, entry = fold(model, x, "fold(into_next=true)")
    assert entry.stats == {"BN folded": 1, "BN folded into next layer": 1}
    assert not result.ir.nodes(module_type=BN) and entry.notes == []
    assert rel_err(result.ir.gm, model, x) <= 1e-6


def test_bn_before_padded_or_transposed_conv_is_kept():
    padded = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))
    transposed = nn.Sequential(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 4, 3))
    x = torch.randn(1, 4, 6, 6)
    for model, why in ((padded, "pads with zeros"), (transposed, "transposed conv")):
        model = randomize_bn(model).eval()
        result, entry = fold(model, x, "fold(into_next=true)")
        assert entry.stats == {} and why in entry.notes[0]
        assert rel_err(result.ir.gm, model, x) == 0.0


def test_linear_bn1d_folds_on_2d_input_only():
    model = randomize_bn(nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5))).eval()
    x = torch.randn(8, 6)
    result, entry = fold(model, x)
    assert entry.stats == {"BN folded": 1}
    assert rel_err(result.ir.gm, model, x) <= 1e-6
    # on a 3-D input BatchNorm1d normalises dim 1 (the sequence), not the linear's features
    model = randomize_bn(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(7))).eval()
    result, entry = fold(model, torch.randn(2, 7, 6))
    assert entry.stats == {}
    assert entry.notes == [
        "kept 1: 0 gives a 3-D output whose channels are not on the axis BatchNorm uses"
    ]


def test_bn_without_running_stats_is_kept():
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn).eval()
    result, entry = fold(model, torch.randn(2, 3, 4, 4))
    assert entry.stats == {} and result.ir.nodes(module_type=nn.BatchNorm2d)
    assert entry.notes[0].startswith("kept 1: it has no running statistics")


def test_training_mode_is_refused_unless_asked():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(GraphoptError, match=r"in training mode.*fold\(training=true\)"):
        fold(model, x)
    result, entry = fold(model, x, "fold(training=true)")
    assert entry.stats == {"BN folded": 1}
    assert rel_err(result.ir.gm.eval(), copy.deepcopy(model).eval(), x) <= 1e-6
    assert model.training and isinstance(model[1], nn.BatchNorm2d)  # caller's model untouched


def test_sync_and_frozen_batch_norm():
    from torchvision.ops.misc import FrozenBatchNorm2d

    frozen = FrozenBatchNorm2d(4, eps=1e-3)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(frozen, name).copy_(torch.rand(4) + 0.5)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), frozen, nn.ReLU(), nn.Conv2d(4, 6, 1), nn.SyncBatchNorm(6)
    )
    model = randomize_bn(model).eval()
    x = torch.randn(2, 3, 8, 8)
    # traced through, FrozenBatchNorm2d becomes x * constant + constant
    result, entry = fold(model, x)
    assert entry.stats == {"BN folded": 1, "affine ops folded": 2}
    assert [type(m).__name__ for m in result.ir.gm.modules()][1:] == ["Conv2d", "ReLU", "Conv2d"]
    assert rel_err(result.ir.gm, model, x) <= 1e-6
    # kept as a leaf module, it is recognised as a BatchNorm
    result, entry = fold(model, x, leaf_modules=["FrozenBatchNorm2d"])
    assert entry.stats == {"BN folded": 2}
    assert rel_err(result.ir.gm, model, x) <= 1e-6


def test_per_channel_affine_ops_fold_and_others_do_not():
    class Affine(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 4)
            self.register_buffer("s", torch.rand(1, 4, 1, 1) + 0.5)
            self.register_buffer("spatial", torch.rand(1, 1, 6, 6))

        def forward(self, x):
            y = 2.0 - (self.conv(x) / self.s).sub(0.5)  # per channel: folds
            y = y * self.spatial  # varies over space: not per channel, kept
            return self.fc(y.mean((2, 3))) * self.s.flatten()  # last axis of a linear: folds

    model = Affine().eval()
    x = torch.randn(2, 3, 8, 8)
    result, entry = fold(model, x)
    assert entry.stats == {"affine ops folded": 4}
    assert rel_err(result.ir.gm, model, x) <= 1e-6
    assert any(n.target == "spatial" for n in result.ir.graph.nodes)
    result, entry = fold(model, x, "fold(elementwise=false)")
    assert entry.stats == {}


def test_hooked_conv_and_bad_options_are_refused():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    model[0].register_forward_hook(lambda m, i, o: o * 2)
    _, entry = fold(model, torch.randn(1, 3, 5, 5))
    assert entry.stats == {} and "hooks" in entry.notes[0]
    with pytest.raises(GraphoptError, match="must be true or false"):
        PassManager("fold(into_next=sometimes)")


def test_real_data_predictions_are_unchanged():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):  # real running statistics come from training
        order = torch.randperm(1400, generator=gen)
        for i in range(0, 1400, 50):
            batch = order[i : i + 50]
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    model.eval()
    test_x, test_y = x[1400:], y[1400:]
    result, entry = fold(model, test_x)
    assert entry.stats == {"BN folded": 3} and entry.top1 == 1.0
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean()
        folded = (result.ir.gm(test_x).argmax(1) == test_y).float().mean()
    assert accuracy > 0.8 and folded == accuracy
    assert entry.rel_err <= 1e-6


def test_run_directly_rewrites_the_ir_it_is_given():
    model = randomize_bn(nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3))).eval()
    x = torch.randn(2, 2, 7)
    ir = GraphIR.trace(copy.deepcopy(model), (x,))
    ctx = PassContext(probe_inputs=(x,))
    Fold().run(ir, ctx)
    ir.recompile()
    assert ctx.stats == {"BN folded": 1} and rel_err(ir.gm, model, x) <= 1e-6


def test_block_with_every_structure_folds_exactly(block, block_input):
    """Residual add, split, concat, a shared conv, grouped/depthwise convs and attention: the
    stem's BatchNorm folds, nothing else changes, and outputs agree to rounding."""
    before = copy.deepcopy(block.state_dict())
    ir = GraphIR.trace(block, block_input)
    result = PassManager("cleanup,fold", reproducer=False).run(ir)
    assert not result.ir.nodes(module_type=BN)
    assert result.ledger[-1].stats == {"BN folded": 1}
    with torch.no_grad():
        torch.testing.assert_close(result.ir.gm(*block_input), block(*block_input))
    for key, value in block.state_dict().items():  # the caller's model is untouched
        assert torch.equal(value, before[key]), key
