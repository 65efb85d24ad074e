"""The prune pass: dependency analysis and physical removal on every pattern, exactly.

Pattern tests zero the channels the plan will remove (their producing rows, biases and
norm parameters, never the consuming columns, so a wrong index mapping shows), run the
model, prune, and check the pruned model computes the same thing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import randomize_bn
from graphopt.passes.prune import OpRule, Prune, analyse
from graphopt.passes.prune.ops import BUILTIN_RULES
from graphopt.passes.prune.plan import Selector
from graphopt.passes.prune.pruner import apply_removal, keep_masks
from graphopt.passes.prune.report import frozen_report
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import graphopt
from graphopt import GraphIR, GraphoptError
from graphopt.fxutil import arg, int_arg, node_arg, set_arg

pytestmark = pytest.mark.usefixtures("one_thread")


def plan(model: nn.Module, x: torch.Tensor, ratio=0.5, seed=0, ignore=(), leaf_modules=(), **kw):
    """Trace, analyse and choose a random removal of ``ratio`` of every group."""
    ir = GraphIR.trace(model, (x,), leaf_modules=leaf_modules)
    g = analyse(ir, ignore, **kw)
    scores = np.random.default_rng(seed).random(len(g.prunable))
    sel = Selector(g, scores, round_to=1, max_layer_ratio=0.9, global_rank=False)
    return ir, g, sel.removal(ratio)


def zero_removed(g, removed: np.ndarray) -> None:
    """Zero what produces the channels to be removed (not the layers that read them)."""
    for key, keep in keep_masks(g, removed).items():
        if key[0] != "p" or key in g.consumers:
            continue
        t = g.tensor(key[1])
        with torch.no_grad():
            t.index_fill_(key[2], torch.from_numpy(np.flatnonzero(~keep)), 0.0)


def assert_exact(
    model: nn.Module,
    x: torch.Tensor,
    shrinks: list[str],
    *,
    ratio: float = 0.5,
    seed: int = 0,
    atol: float = 1e-5,
    **kw: Any,
) -> GraphIR:
    """Zero then prune ``model``; the output is unchanged and every layer in ``shrinks``
    lost output channels. Returns the pruned IR."""
    model = model.eval()
    ir, g, removed = plan(model, x, ratio, seed, **kw)
    assert removed.any(), frozen_report(g)
    zero_removed(g, removed)
    with torch.no_grad():
        want = ir.gm(x)
    pruned = ir.copy()
    apply_removal(pruned, g, removed)
    with torch.no_grad():
        got = pruned.gm(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-5)
    for name in shrinks:
        before = ir.gm.get_submodule(name).weight.shape
        after = pruned.gm.get_submodule(name).weight.shape
        assert after[0] < before[0] or (after != before and before[0] == 1), name
    return pruned


def cbr(cin: int, cout: int, **kw) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, **kw), nn.BatchNorm2d(cout), nn.ReLU())


# -- patterns -------------------------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.a = cbr(16, 24)
        self.b = nn.Conv2d(24, 16, 3, padding=1)
        self.sub = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.b(self.a(x)) + x
        y = y - self.sub(y)
        return self.head(y.mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = cbr(3, 16)
        self.fc1 = nn.Conv2d(16, 8, 1)
        self.fc2 = nn.Conv2d(8, 16, 1)
        self.out = nn.Conv2d(16, 6, 1)

    def forward(self, x):
        x = self.conv(x)
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return self.out(x * s)


class ConcatSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 8)
        self.b = cbr(3, 16)
        self.c = nn.Conv2d(24, 16, 1)
        self.d = nn.Conv2d(8, 8, 1)
        self.e = nn.Conv2d(8, 8, 1)
        self.f = nn.Conv2d(16, 4, 1)
        self.g = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        y = self.c(y)
        p, q = torch.split(y, [8, 8], dim=1)
        r, s = q.chunk(2, dim=1)
        z = torch.cat([self.d(p), self.e(p)], 1)
        return self.f(torch.cat([z[:, :8], s, r], dim=1)) + self.g(y[:, 12:])


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


class Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 16)
        self.b = cbr(8, 8)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.a(x)
        left, right = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat([left, self.b(right)], 1), 2)
        b, _, h, w = x.shape
        return self.c(x.reshape(b, 2, 8, h, w).flatten(1, 2))


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 16)
        self.g = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.bn = nn.BatchNorm2d(32)
        self.pw = nn.Conv2d(32, 6, 1)

    def forward(self, x):
        return self.pw(F.relu(self.bn(self.dw(self.g(self.a(x))))))


class FlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 8)
        self.fc = nn.Linear(8 * 4 * 4, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        x = F.max_pool2d(self.a(x), 2)
        return self.head(F.relu(self.fc(torch.flatten(x, 1))))


class Norms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(16, affine=True)
        self.act = nn.PReLU(16)
        self.c = nn.Conv1d(16, 8, 1)
        self.bn1 = nn.BatchNorm1d(8)
        self.out = nn.Conv1d(8, 3, 1)

    def forward(self, x):
        x = self.act(self.inorm(self.b(self.gn(self.a(x)))))
        return self.out(self.bn1(self.c(x.flatten(2))))


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.mlp(x)
        return self.head(x[:, 0])


class HandAttention(nn.Module):
    """Hand-written multi-head attention: fused qkv, heads by reshape, matmul and softmax."""

    def __init__(self, sdpa: bool = False) -> None:
        super().__init__()
        self.heads, self.sdpa = 4, sdpa
        self.embed = nn.Linear(8, 32)
        self.qkv = nn.Linear(32, 96)
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        x = self.embed(x)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * (1 / math.sqrt(c // self.heads))
            y = attn.softmax(dim=-1) @ v
        y = y.transpose(1, 2).reshape(b, n, c)
        return self.head(x + self.proj(y))


class ChannelsLast(nn.Module):
    """A ConvNeXt-style block without its LayerNorm: depthwise conv, permute to channels
    last, an MLP, a layer-scale parameter, permute back, residual."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, stride=2)
        self.dw = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.pw1 = nn.Linear(16, 64)
        self.pw2 = nn.Linear(64, 16)
        self.gamma = nn.Parameter(torch.rand(16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pw2(F.gelu(self.pw1(y)))
        x = x + y.permute(0, 3, 1, 2)
        return self.head(x.mean((-2, -1)))


class Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.table = nn.Parameter(torch.randn(20, 16))
        self.fc = nn.Linear(16, 4)

    def forward(self, idx):
        return self.fc(self.emb(idx) + F.embedding(idx, self.table))


class Functional(nn.Module):
    """Parameters used directly in functional calls."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(16))
        self.scale = nn.Parameter(torch.rand(1, 16, 1, 1))
        self.w2 = nn.Parameter(torch.randn(24, 16) * 0.3)
        self.b2 = nn.Parameter(torch.randn(24))
        self.w3 = nn.Parameter(torch.randn(5, 24) * 0.3)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, self.b1, padding=1)) * self.scale
        x = F.linear(x.mean((2, 3)), self.w2, self.b2)
        return F.linear(F.relu(x), self.w3)


class Decoder(nn.Module):
    """A U-Net-style decoder: strided convs down, transposed convs up (grouped, depthwise,
    and a functional grouped one), a skip concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.down1 = cbr(3, 16, stride=2)  # 8 -> 4
        self.down2 = cbr(16, 32, stride=2)  # 4 -> 2
        self.up1 = nn.ConvTranspose2d(32, 16, 2, stride=2, groups=4)  # 2 -> 4
        self.fuse = cbr(32, 16)  # cat(up1, down1)
        self.up2 = nn.ConvTranspose2d(16, 16, 4, stride=2, padding=1, groups=16)  # 4 -> 8
        self.w = nn.Parameter(torch.randn(16, 2, 3, 3) * 0.3)  # (in, out / groups, k, k)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        d1 = self.down1(x)
        u = self.fuse(torch.cat([self.up1(self.down2(d1)), d1], 1))
        u = F.relu(self.up2(u))
        u = F.relu(F.conv_transpose2d(u, self.w, padding=1, groups=8))
        return self.head(u)


def image(n: int = 2, c: int = 3, s: int = 8) -> torch.Tensor:
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(1))


def tokens(n: int = 2, t: int = 5, c: int = 8) -> torch.Tensor:
    return torch.randn(n, t, c, generator=torch.Generator().manual_seed(1))


PATTERNS = {
    "residual add/sub": (Residual, image, ["stem.0", "a.0", "b", "sub"]),
    "squeeze-excite gating": (SqueezeExcite, image, ["conv.0", "fc1", "fc2"]),
    "concat/split/chunk/slice": (ConcatSplit, image, ["a.0", "b.0", "c", "d", "e"]),
    "channel shuffle": (Shuffle, image, ["a.0", "b.0"]),
    "grouped and depthwise": (Grouped, image, ["a.0", "g", "dw"]),
    "flatten into linear": (FlattenLinear, image, ["a.0", "fc"]),
    "group/instance/batch norm, prelu": (Norms, image, ["a", "b", "c"]),
    "nn.MultiheadAttention": (MHA, tokens, ["embed", "mlp.0", "attn.out_proj"]),
    "hand-written attention": (HandAttention, tokens, ["embed", "qkv", "proj"]),
    "attention via sdpa": (lambda: HandAttention(sdpa=True), tokens, ["embed", "qkv"]),
    "channels last": (ChannelsLast, image, ["stem", "dw", "pw1", "pw2"]),
    "functional parameters": (Functional, image, []),
    "transposed convs (decoder)": (Decoder, image, ["down1.0", "down2.0", "up1", "fuse.0", "up2"]),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_pattern_exact(pattern: str, seed: int) -> None:
    factory, inputs, shrinks = PATTERNS[pattern]
    torch.manual_seed(seed)
    model = randomize_bn(factory(), seed)
    assert_exact(model, inputs(), shrinks, seed=seed)


def test_functional_parameters_are_sliced() -> None:
    torch.manual_seed(0)
    pruned = assert_exact(Functional(), image(), [])
    assert pruned.gm.w1.shape[0] < 16 and pruned.gm.scale.shape[1] == pruned.gm.w1.shape[0]
    assert pruned.gm.w2.shape == (pruned.gm.w2.shape[0], pruned.gm.w1.shape[0])
    assert pruned.gm.w3.shape[1] == pruned.gm.w2.shape[0] < 24


def test_embeddings() -> None:
    torch.manual_seed(0)
    idx = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(0))
    pruned = assert_exact(Embeddings(), idx, [])
    assert pruned.gm.emb.weight.shape[1] < 16
    assert pruned.gm.emb.embedding_dim == pruned.gm.table.shape[1] == pruned.gm.fc.in_features


def test_block_from_conftest(block: nn.Module, block_input: tuple[torch.Tensor, ...]) -> None:
    pruned = assert_exact(block, block_input[0], ["stem", "grouped", "depthwise", "shared"])
    attn = pruned.gm.get_submodule("attn")
    assert attn.embed_dim == attn.in_proj_weight.shape[1] == attn.num_heads * attn.head_dim
    assert attn.embed_dim < 32


@pytest.mark.parametrize("seed", [0, 1])
def test_whole_heads_exact(seed: int) -> None:
    """heads=True removes whole heads of nn.MultiheadAttention: fewer heads of the same size,
    exact when the removed heads' rows (and the channels tied to them) were zero."""
    torch.manual_seed(seed)
    pruned = assert_exact(MHA(), tokens(), ["embed", "attn.out_proj"], seed=seed, whole_heads=True)
    attn = pruned.gm.get_submodule("attn")
    assert attn.head_dim == 8 and attn.num_heads == 2
    assert attn.embed_dim == attn.in_proj_weight.shape[1] == 16 == attn.out_proj.in_features


def test_whole_heads_on_vit() -> None:
    """The pass option on torchvision's ViT: every encoder layer keeps half its heads, each
    of the original 64 channels, and the model still runs with its output shape."""
    model = torchvision.models.vit_b_16(weights=None, image_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    result = graphopt.optimize(model, "prune(ratio=0.5,heads=true)", example_inputs=(x,))
    gm = result.ir.gm
    layers = [m for m in gm.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(layers) == 12
    assert all(m.num_heads == 6 and m.head_dim == 64 and m.embed_dim == 384 for m in layers)
    with torch.no_grad():
        assert gm(x).shape == (1, 1000)


def test_module_attributes_follow() -> None:
    torch.manual_seed(0)
    pruned = assert_exact(Norms(), image(), ["a"])
    gm = pruned.gm
    assert gm.gn.num_channels == gm.a.out_channels == gm.b.in_channels
    assert (
        gm.gn.num_channels % gm.gn.num_groups == 0 and gm.gn.num_channels // gm.gn.num_groups == 4
    )
    assert gm.act.num_parameters == gm.inorm.num_features == gm.b.out_channels
    assert gm.bn1.num_features == gm.c.out_channels == gm.out.in_channels
    pruned = assert_exact(Grouped(), image(), ["g"])
    gm = pruned.gm
    # a grouped conv loses whole groups; a depthwise conv stays depthwise
    assert gm.g.groups < 4 and gm.g.out_channels == 8 * gm.g.groups
    assert gm.g.in_channels == gm.get_submodule("a.0").out_channels == 4 * gm.g.groups
    assert gm.dw.groups == gm.dw.out_channels == gm.g.out_channels == gm.bn.num_features


def test_layer_norm_renormalises_over_kept_channels() -> None:
    """LayerNorm over pruned channels is not exact (its statistics change): the pruned model
    must compute LayerNorm over the kept channels with the kept affine parameters."""
    torch.manual_seed(0)

    class LN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 32)
            self.ln = nn.LayerNorm(32)
            self.b = nn.Linear(32, 3)

        def forward(self, x):
            return self.b(self.ln(self.a(x)))

    model = LN().eval()
    x = tokens()
    ir, g, removed = plan(model, x)
    pruned = ir.copy()
    apply_removal(pruned, g, removed)
    kept = [
        i for i in range(32) if any(torch.equal(model.a.weight[i], r) for r in pruned.gm.a.weight)
    ]
    assert len(kept) == pruned.gm.ln.normalized_shape[0] < 32
    h = F.layer_norm(
        model.a(x)[..., kept], (len(kept),), model.ln.weight[kept], model.ln.bias[kept]
    )
    want = F.linear(h, model.b.weight[:, kept], model.b.bias)
    torch.testing.assert_close(pruned.gm(x), want, atol=1e-5, rtol=1e-5)


# -- the pass ---------------------------------------------------------------------------------


def test_pass_through_optimize_ratio_and_docstring() -> None:
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 16, 3))
    result = graphopt.optimize(model.eval(), "prune(ratio=0.5)", example_inputs=(image(s=16),))
    gm = result.ir.gm
    assert gm.get_submodule("0").out_channels == 16 == gm.get_submodule("3").in_channels
    assert gm.get_submodule("3").out_channels == 16  # the model output is protected
    assert result.ledger[-1].stats["MACs kept %"] == pytest.approx(50, abs=1)


def test_input_model_not_mutated(block: nn.Module, block_input) -> None:
    before = {k: v.clone() for k, v in block.state_dict().items()}
    graphopt.optimize(block, "prune(ratio=0.5)", example_inputs=block_input)
    after = block.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "pipeline, message",
    [
        ("prune(criterion=nope)", "unknown pruning criterion 'nope'"),
        ("prune(ratio=1.5)", "ratio"),
        ("prune(criterion=taylor)", "needs data"),
    ],
)
def test_bad_options_are_one_sentence(block, block_input, pipeline: str, message: str) -> None:
    with pytest.raises(GraphoptError, match=message):
        graphopt.optimize(block, pipeline, example_inputs=block_input)


def test_nothing_prunable_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(GraphoptError, match="nothing in this model can be pruned"):
        graphopt.optimize(model.eval(), "prune", example_inputs=(image(),))


def test_pass_is_registered() -> None:
    assert graphopt.get_registry().pass_class("prune") is Prune


# -- op rules -------------------------------------------------------------------------------


class ChannelScale(nn.Module):
    """A plugin's own layer, kept opaque when traced: one learned scale per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1)


class ScaleRule(OpRule):
    """What the plugin tells prune about its layer."""

    modules = (ChannelScale,)

    def link(self, g, node):
        g.identity(node_arg(node), node)  # channels pass through in order
        g.link(g.key(node, 1), g.param_key(str(node.target), "weight", 0))

    def resize(self, node, sizes):
        sizes.module(node).channels = sizes.dim(node, 1)


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 16)
        self.s = ChannelScale(16)
        self.b = nn.Conv2d(16, 8, 3)

    def forward(self, x):
        return self.b(self.s(self.a(x)))


def test_plugin_rule_teaches_prune_a_new_module(monkeypatch) -> None:
    torch.manual_seed(0)
    model = randomize_bn(Scaled(), 0).eval()
    x = image()
    ir = GraphIR.trace(model, (x,), leaf_modules=["ChannelScale"])
    g = analyse(ir)
    assert not g.prunable.any()  # no rule for the layer: its channels (and a's) stay whole
    assert any("does not know how module ChannelScale" in line for line in frozen_report(g))

    class Plugin:
        @graphopt.hookimpl
        def graphopt_register_prune_rules(self, register):
            register(ScaleRule())

    registry = graphopt.load_registry(extra=[Plugin()])
    builtin = len(BUILTIN_RULES)
    with registry.in_effect():
        pruned = assert_exact(model, x, ["a.0"], leaf_modules=["ChannelScale"])
    assert len(BUILTIN_RULES) == builtin  # the plugin extended a copy
    kept = pruned.gm.get_submodule("a.0").out_channels
    assert kept == 8 and pruned.gm.s.channels == pruned.gm.s.weight.shape[0] == kept


def test_fxutil_reads_an_argument_given_by_position_or_keyword() -> None:
    """The accessor the op rules (and fold) read call arguments with."""

    def f(x, w):
        return F.conv2d(x, w, None, 1, 0, 1, 2) + F.conv2d(x, w, groups=2)

    gm = torch.fx.symbolic_trace(f)
    by_position, by_keyword = (n for n in gm.graph.nodes if n.target is F.conv2d)
    for node in (by_position, by_keyword):
        assert int_arg(node, 6, "groups") == 2 and arg(node, 2, "bias") is None
        assert node_arg(node, 0, "input").op == "placeholder"
        set_arg(node, 6, "groups", 1)
        assert int_arg(node, 6, "groups") == 1
    assert "groups" in by_keyword.kwargs and by_position.args[6] == 1  # written where it was
    assert arg(by_keyword, 3, "stride", 1) == 1  # absent: the default
    with pytest.raises(TypeError, match="argument 'bias' of conv2d is NoneType, not a node"):
        node_arg(by_position, 2, "bias")
    with pytest.raises(TypeError, match="not an int"):
        int_arg(by_position, 1, "weight")


def test_rule_sets_refuse_a_second_claim_unless_replacing() -> None:
    class Other(OpRule):
        functions = (torch.add,)

    with pytest.raises(GraphoptError, match=r"both claim torch\..*add; register the second"):
        BUILTIN_RULES.extended([Other()])
    replaced = BUILTIN_RULES.extended([Other()], replace=True)
    assert isinstance(replaced.for_function(torch.add), Other)
    assert not isinstance(BUILTIN_RULES.for_function(torch.add), Other)


# -- criteria ---------------------------------------------------------------------------------


class Plain(nn.Module):
    """conv-bn-relu ×2 and a head: the first conv's 16 channels are ranked by the criteria."""

    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 16)
        self.b = cbr(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.b(self.a(x)).mean((2, 3)))


def kept_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    return [i for i in range(before.shape[0]) if any(torch.equal(before[i], r) for r in after)]


def prune_plain(model: Plain, options: str, data=None) -> GraphIR:
    result = graphopt.optimize(
        model.eval(), f"prune({options})", example_inputs=(image(),), data=data
    )
    return result.ir


WEAK = [1, 4, 6, 9, 10, 12, 13, 15]


def weak_model(kind: str) -> Plain:
    """A model whose channels WEAK of the first conv are the unimportant ones by ``kind``."""
    torch.manual_seed(0)
    model = randomize_bn(Plain())
    conv, bn = model.a[0], model.a[1]
    with torch.no_grad():
        if kind == "weights":
            conv.weight[WEAK] *= 0.01
            model.b[0].weight[:, WEAK] *= 0.01
        elif kind == "bn":
            bn.weight[WEAK] = 1e-3
        elif kind == "activation":
            bn.bias[WEAK] = -10.0  # always negative before the ReLU: dead channels
            bn.bias[[i for i in range(16) if i not in WEAK]] = 3.0
    return model


@pytest.mark.parametrize(
    "criterion, kind",
    [
        ("l1", "weights"),
        ("l2", "weights"),
        ("bn_scale", "bn"),
        ("activation", "activation"),
        ("apoz", "activation"),
        ("taylor", "activation"),
    ],
)
def test_criterion_removes_the_unimportant_channels(criterion: str, kind: str) -> None:
    model = weak_model(kind)
    data = [(image(8), torch.randint(0, 4, (8,))) for _ in range(2)]
    ir = prune_plain(model, f"criterion={criterion},round_to=1", data)
    kept = kept_rows(model.a[0].weight, ir.gm.get_submodule("a.0").weight)
    assert sorted(set(range(16)) - set(kept)) == WEAK


def test_random_criterion_is_seeded() -> None:
    model = weak_model("weights")
    runs = []
    for seed in (0, 0, 1):
        ir = prune_plain(model, f"criterion=random,seed={seed},round_to=1")
        runs.append(kept_rows(model.a[0].weight, ir.gm.get_submodule("a.0").weight))
    assert runs[0] == runs[1] != runs[2] and len(runs[0]) == 8


def test_plugin_criterion_through_the_hook() -> None:
    from graphopt.passes.prune.importance import Saliency

    class Plugin:
        @graphopt.hookimpl
        def graphopt_register_prune_criteria(self, register):
            # keep the channels with the *smallest* weights: the opposite of l1
            register(
                "inverse",
                lambda ci: Saliency(params={k: 1 / (p.abs() + 1e-6) for k, p in ci.params.items()}),
            )

    registry = graphopt.load_registry(extra=[Plugin()])
    model = weak_model("weights")
    manager = graphopt.PassManager("prune(criterion=inverse,round_to=1)", registry=registry)
    ir = manager.run(graphopt.trace(model.eval(), (image(),))).ir
    assert kept_rows(model.a[0].weight, ir.gm.get_submodule("a.0").weight) == WEAK
    with pytest.raises(GraphoptError, match="unknown pruning criterion 'inverse'"):
        prune_plain(model, "criterion=inverse,round_to=1")  # not in the default registry


def test_taylor_needs_data_activations_fall_back_on_probe_inputs() -> None:
    with pytest.raises(GraphoptError, match="criterion 'taylor' needs data"):
        prune_plain(weak_model("weights"), "criterion=taylor")
    model = weak_model("activation")
    result = graphopt.optimize(model.eval(), "prune(criterion=apoz,round_to=1)",
                               example_inputs=(image(4),))  # fmt: skip
    kept = kept_rows(model.a[0].weight, result.ir.gm.get_submodule("a.0").weight)
    assert sorted(set(range(16)) - set(kept)) == WEAK
    assert any("probe inputs" in n for n in result.ledger[-1].notes)


# -- targets ----------------------------------------------------------------------------------


def widths(ir: GraphIR) -> dict[str, int]:
    return {
        n.name: ir.module(n).weight.shape[0]
        for n in ir.nodes(op="call_module")
        if isinstance(ir.module(n), nn.Conv2d | nn.Linear)
    }


@pytest.mark.parametrize("metric", ["macs", "params"])
def test_target_is_reached(metric: str) -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    result = graphopt.optimize(
        model, f"prune(target=0.4,metric={metric})", example_inputs=(image(1, 3, 32),)
    )
    before, after = result.ledger[0], result.ledger[-1]
    got = (after.macs / before.macs) if metric == "macs" else (after.params / before.params)
    assert got == pytest.approx(0.4, abs=0.02)
    assert after.stats[f"{'MACs' if metric == 'macs' else 'params'} kept %"] == pytest.approx(
        100 * got, abs=0.01
    )


def test_coarse_groups_miss_the_target_with_a_note(block, block_input) -> None:
    """In Block, the grouped conv (whole groups) and the attention heads (one position in
    every head) couple almost every channel into a few atoms: the target cannot be met
    closely, and the report says so."""
    result = graphopt.optimize(block, "prune(target=0.6,round_to=1)", example_inputs=block_input)
    notes = " ".join(result.ledger[-1].notes)
    assert "instead of the target 60%" in notes


def test_round_to_keeps_multiples() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(cbr(3, 48), cbr(48, 40), nn.Conv2d(40, 5, 1)).eval()
    for round_to, ratio in ((8, 0.3), (16, 0.5)):
        result = graphopt.optimize(model, f"prune(ratio={ratio},round_to={round_to})",
                                   example_inputs=(image(),))  # fmt: skip
        kept = widths(result.ir)
        assert kept["_0_0"] % round_to == 0 and kept["_1_0"] % round_to == 0, kept
        assert kept["_0_0"] <= 48 * (1 - ratio) + round_to


def test_global_rank_respects_the_layer_maximum() -> None:
    """Scores are normalised per layer, so global ranking follows each layer's spread: the
    second conv has 12 near-dead channels and 4 strong ones, the first a flat spread."""
    torch.manual_seed(0)
    model = randomize_bn(Plain())
    with torch.no_grad():
        model.b[0].weight[4:] *= 1e-3
        model.b[1].weight[4:] = 1e-3
        model.head.weight[:, 4:] *= 1e-3
    for max_ratio, a_kept, b_kept in ((0.75, 12, 4), (0.5, 12, 8)):
        result = graphopt.optimize(
            model.eval(),
            f"prune(ratio=0.5,global_rank=true,max_layer_ratio={max_ratio},round_to=1)",
            example_inputs=(image(),),
        )
        assert widths(result.ir) == {"a_0": a_kept, "b_0": b_kept, "head": 4}
    uniform = prune_plain(model, "ratio=0.5,round_to=1")
    assert widths(uniform) == {"a_0": 8, "b_0": 8, "head": 4}


def test_ignore_and_steps() -> None:
    torch.manual_seed(0)
    model = Plain().eval()
    ir = prune_plain(model, "ratio=0.5,ignore=[a_*],round_to=1")
    assert widths(ir)["a_0"] == 16 and widths(ir)["b_0"] == 8
    one = prune_plain(model, "ratio=0.75,round_to=1")
    three = prune_plain(model, "ratio=0.75,steps=3,round_to=1")
    assert widths(one) == widths(three) == {"a_0": 4, "b_0": 4, "head": 4}


def test_frozen_groups_are_reported() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 8, 1)
            self.c = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return self.c(self.b(y.cumsum(1)))  # no channel rule for cumsum: y stays whole

    result = graphopt.optimize(Odd().eval(), "prune", example_inputs=(image(),))
    notes = result.ledger[-1].notes
    assert any("a whole: at node 'cumsum'" in n and "does not know" in n for n in notes), notes
    assert widths(result.ir) == {"a": 8, "b": 4, "c": 4}


# -- accuracy on real data --------------------------------------------------------------------


def digits() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> None:
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_digits_accuracy_after_pruning_half_the_macs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        cbr(1, 32), cbr(32, 64), nn.MaxPool2d(2), cbr(64, 64), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip
    xtr, ytr, xte, yte = digits()
    train(model, xtr, ytr, epochs=8, lr=3e-3)
    base = accuracy(model, xte, yte)
    assert base > 0.95
    result = graphopt.optimize(
        model, "prune(target=0.5)", example_inputs=(xtr[:1],), data=[(xtr[:256], ytr[:256])]
    )
    assert result.ledger[-1].macs / result.ledger[0].macs == pytest.approx(0.5, abs=0.05)
    pruned = result.ir.gm
    train(pruned, xtr, ytr, epochs=3, lr=1e-3)
    assert accuracy(pruned, xte, yte) >= base - 0.02


# -- torchvision coverage ---------------------------------------------------------------------

#: a representative, affordable subset of torchvision's classifiers: one per structure the
#: analysis must see through (benchmarks/prune.py and docs/passes/prune.md cover all 80)
COVERAGE = {
    "resnet18": {},  # residual adds
    "mobilenet_v3_small": {},  # squeeze-excitation gating, hardswish
    "shufflenet_v2_x0_5": {},  # chunk, concat, channel shuffle
    "densenet121": {},  # dense concatenation
    "efficientnet_b0": {},  # SE, stochastic depth
    "regnet_y_400mf": {},  # grouped convs with SE
    "googlenet": {"aux_logits": False, "init_weights": False},  # inception concat
    "squeezenet1_1": {},  # fire modules (concat), conv classifier
    "convnext_tiny": {},  # channels-last, LayerNorm, layer scale
    "vit_b_16": {"image_size": 32},  # nn.MultiheadAttention, class token, position embedding
    "swin_t": {},  # window attention, patch merging, relative position bias
}


def maxvit_small() -> nn.Module:
    """torchvision's MaxViT architecture at a size that fits the test budget (maxvit_t
    itself needs 224×224 inputs; benchmarks/prune.py prunes it)."""
    from torchvision.models.maxvit import MaxVit

    return MaxVit(
        input_size=(32, 32), stem_channels=16, partition_size=4, block_channels=[32, 64],
        block_layers=[1, 1], head_dim=16, stochastic_depth_prob=0.0, num_classes=1000,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", [*COVERAGE, "maxvit"])
def test_torchvision_half_the_macs(name: str) -> None:
    torch.manual_seed(0)
    if name == "maxvit":
        model, size = maxvit_small(), 32
    else:
        model = getattr(torchvision.models, name)(weights=None, **COVERAGE[name])
        size = 32 if name == "vit_b_16" else 64
    x = image(1, 3, size)
    result = graphopt.optimize(model.eval(), "prune(target=0.5)", example_inputs=(x,))
    before, after = result.ledger[0], result.ledger[-1]
    assert after.macs / before.macs == pytest.approx(0.5, abs=0.05)
    assert after.params < before.params
    with torch.no_grad():
        assert result.ir.gm(x).shape == model(x).shape == (1, 1000)


@pytest.mark.slow
@pytest.mark.parametrize("fused", [True, False])
def test_timm_lowformer_transposed_convs(fused: bool) -> None:
    """timm's LowFormer upsamples its strided attention with a ConvTranspose2d (plain in its
    released configuration, depthwise with ``fused_conv=False``) and crops the result to
    sizes read from its input (``o[..., :H, :W]``). Zeroed channels removed leave the output
    unchanged (its classifier's LayerNorm and the residual stream's one-group GroupNorms,
    which renormalise over the kept channels, ignored), and prune(target=0.5) keeps half the
    MACs."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("lowformer_b0", pretrained=False, fused_conv=fused)
    model = randomize_bn(model, 0).eval()
    x = image(1, 3, 64)
    assert_exact(model, x, ["stem.0.conv"], atol=1e-4, ignore=["pre_classifier_1", "group_norm*"])
    result = graphopt.optimize(model, "prune(target=0.5)", example_inputs=(x,))
    before, after = result.ledger[0], result.ledger[-1]
    assert after.macs / before.macs == pytest.approx(0.5, abs=0.05)
    assert not any("transposed" in line for line in after.notes), after.notes
    ups = [n for n, m in model.named_modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(ups) == 7
    for name in ups:
        old, new = model.get_submodule(name), result.ir.gm.get_submodule(name)
        if fused:  # its input is the attention's inner width, which halves
            assert new.in_channels < old.in_channels and new.out_channels == new.weight.shape[1]
        else:  # depthwise on the residual stream, which loses channels through GroupNorm1
            assert new.groups == new.in_channels == new.out_channels < old.groups
    with torch.no_grad():
        assert result.ir.gm(x).shape == model(x).shape == (1, 1000)


# -- random architectures ---------------------------------------------------------------------

KINDS = (
    "conv",
    "depthwise",
    "residual",
    "concat",
    "split",
    "chunk",
    "shuffle",
    "gate",
    "transposed",
)


class RandomNet(nn.Module):
    """A chain of blocks drawn from KINDS; channel counts stay multiples of 4."""

    def __init__(self, blocks: list[tuple[str, int, int]]) -> None:
        super().__init__()
        self.kinds = [kind for kind, _, _ in blocks]
        self.layers = nn.ModuleList()
        c = 8
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        for kind, width, groups in blocks:
            layer = nn.ModuleDict()
            if kind == "conv":
                g = groups if c % groups == 0 and width % groups == 0 else 1
                layer["a"] = cbr(c, width, groups=g)
                c = width
            elif kind == "depthwise":
                layer["a"] = cbr(c, c, groups=c)
            elif kind == "transposed":
                g = groups if c % groups == 0 and width % groups == 0 else 1
                up = nn.ConvTranspose2d(c, width, 3, padding=1, groups=g)
                layer["a"] = nn.Sequential(up, nn.BatchNorm2d(width), nn.ReLU())
                c = width
            elif kind == "residual":
                layer["a"], layer["b"] = cbr(c, width), nn.Conv2d(width, c, 1)
            elif kind == "concat":
                layer["a"], layer["b"] = cbr(c, width), nn.Conv2d(c, 4, 1)
                c = width + 4
            elif kind in ("split", "chunk"):
                layer["a"] = nn.Conv2d(c // 2, c // 2, 1)
            elif kind == "gate":
                layer["a"], layer["b"] = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)
            self.layers.append(layer)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        for kind, layer in zip(self.kinds, self.layers, strict=True):
            if kind in ("conv", "depthwise", "transposed"):
                x = layer["a"](x)
            elif kind == "residual":
                x = x + layer["b"](layer["a"](x))
            elif kind == "concat":
                x = torch.cat([layer["a"](x), layer["b"](x)], 1)
            elif kind == "split":
                a, b = torch.split(x, x.shape[1] // 2, dim=1)
                x = torch.cat([layer["a"](a), b], 1)
            elif kind == "chunk":
                a, b = x.chunk(2, dim=1)
                x = torch.cat([b, layer["a"](a)], 1)
            elif kind == "shuffle":
                x = channel_shuffle(x, 2)
            elif kind == "gate":
                s = torch.sigmoid(layer["b"](F.relu(layer["a"](x.mean((2, 3), keepdim=True)))))
                x = x * s
        return self.head(x.mean((2, 3)))


blocks = st.lists(
    st.tuples(st.sampled_from(KINDS), st.sampled_from([4, 8, 12, 16]), st.sampled_from([1, 2, 4])),
    min_size=1,
    max_size=5,
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=blocks, ratio=st.sampled_from([0.25, 0.5, 0.75]), seed=st.integers(0, 3))
def test_random_architectures_prune_exactly_or_refuse(spec, ratio: float, seed: int) -> None:
    """Every random chain either prunes with the zeroed channels changing nothing, or, when
    no group can go, the pass refuses with one sentence."""
    torch.manual_seed(seed)
    model = randomize_bn(RandomNet(spec), seed).eval()
    x = image(2, 3, 8)
    _, g, removed = plan(model, x, ratio, seed)
    if not g.prunable.any():
        with pytest.raises(GraphoptError, match="nothing in this model can be pruned"):
            graphopt.optimize(model, f"prune(ratio={ratio})", example_inputs=(x,))
        return
    if not removed.any():
        return  # groups too small for this ratio: nothing to check
    assert_exact(model, x, [], ratio=ratio, seed=seed)
    result = graphopt.optimize(model, f"prune(ratio={ratio},round_to=1)", example_inputs=(x,))
    with torch.no_grad():
        assert result.ir.gm(x).shape == (2, 5)
    assert result.ledger[-1].params < result.ledger[0].params


# -- command line -----------------------------------------------------------------------------


def test_cli_prunes_and_refuses_bad_options(capsys, tmp_path) -> None:
    from conftest import run_main

    out = tmp_path / "small.pt2"
    run = run_main(
        capsys, "optimize", "torchvision:resnet18", "--input-shape", "1,3,32,32",
        "--passes", "prune(target=0.5,criterion=l2)", "-o", str(out),
    )  # fmt: skip
    assert run.code == 0, run.stderr
    assert out.exists()
    bad = tmp_path / "bad.pt2"
    run = run_main(
        capsys, "optimize", "torchvision:resnet18", "--input-shape", "1,3,32,32",
        "--passes", "prune(criterion=magic)", "-o", str(bad),
    )  # fmt: skip
    assert run.code == 2 and "unknown pruning criterion 'magic'" in run.stderr
    assert "Traceback" not in run.stderr and not bad.exists()


# -- block pruning ----------------------------------------------------------------------------


def test_blocks_drop_the_branch_that_adds_nothing() -> None:
    """resnet18 with one residual branch silenced (its last BatchNorm zeroed): blocks=1
    drops exactly that branch, and the output does not change."""
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    with torch.no_grad():
        model.layer2[1].bn2.weight.zero_()
        model.layer2[1].bn2.bias.zero_()
    x = image(1, 3, 64)
    result = graphopt.optimize(model, "prune(blocks=1,ratio=0)", example_inputs=(x,))
    gm = result.ir.gm
    assert result.ledger[-1].stats["blocks dropped"] == 1
    names = {n for n, _ in gm.named_modules()}
    assert "layer2.1.conv1" not in names and "layer2.0.conv1" in names
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


def test_blocks_with_channels_and_attention() -> None:
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, image_size=32).eval()
    x = image(1, 3, 32)
    result = graphopt.optimize(model, "prune(blocks=6,target=0.5)", example_inputs=(x,))
    last = result.ledger[-1]
    assert last.stats["blocks dropped"] == 6
    assert last.macs / result.ledger[0].macs == pytest.approx(0.5, abs=0.05)
    with torch.no_grad():
        assert result.ir.gm(x).shape == (1, 1000)


@pytest.mark.parametrize(
    ("name", "side"),
    [("resnet18", 32), ("mobilenet_v3_small", 32), ("regnet_y_400mf", 32), ("vit_b_32", 32)],
)
def test_observed_macs_match_the_shapes_analysis(name: str, side: int) -> None:
    """The pass's checking run counts each node's MACs as the ``shapes`` analysis does (torch's
    FLOP counter on fake tensors): plain convs and linears from their output shapes, the
    rest under the counter; with attention's fused fast path, SE gating, grouped and
    depthwise convs, and linears on 3-d inputs."""
    from graphopt.passes.prune.pruner import observe

    from graphopt.analyses import MACS

    kwargs = {"image_size": side} if name.startswith("vit") else {}
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    ir = GraphIR.trace(model, (torch.randn(1, 3, side, side),))
    ir.analysis("shapes")
    expected = {n.name: n.meta[MACS] for n in ir.graph.nodes if n.op != "output"}
    seen = observe(ir)
    assert {k: seen[k] for k in expected} == expected and sum(expected.values()) > 0
    assert ir.has_analysis("shapes") and ir.total_macs() == sum(expected.values())


def _canonical(g) -> tuple[dict, list]:
    """Each space's component labels (renumbered by first appearance over the spaces in a
    fixed order) and frozen flags, and every freeze as (node, reason, space, indices): equal
    exactly when two analyses group and freeze alike, whatever order they numbered
    elements in."""
    relabel: dict[int, int] = {}
    out = {}
    for key in sorted(g.spaces, key=str):
        start, size = g.spaces[key]
        comps = g.comp[start : start + size]
        labels = tuple(relabel.setdefault(int(c), len(relabel)) for c in comps)
        out[key] = (labels, tuple(g.frozen[comps]))
    owner = {}
    for key, (start, size) in g.spaces.items():
        for i in range(size):
            owner[start + i] = (key, i)
    freezes = sorted(
        (f.node, f.reason, str(owner[int(e)][0]), owner[int(e)][1])
        for f in g.freezes
        for e in f.elements
    )
    return out, freezes


class _Moves(nn.Module):
    def __init__(self, channels: int, ops: list[tuple[str, tuple]]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.ops = ops

    def forward(self, x):
        x = self.conv(x)
        for name, args in self.ops:
            x = getattr(x, name)(*args)
        return x.sum()


@st.composite
def _move_chains(draw) -> tuple[list[int], list[tuple[str, tuple]]]:
    shape = [1, draw(st.sampled_from([4, 6, 12])), *draw(st.sampled_from([[2, 3], [4, 1], [6, 2]]))]
    start = list(shape)
    ops: list[tuple[str, tuple]] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["permute", "transpose", "merge", "split", "unsqueeze",
                                     "squeeze", "movedim"]))  # fmt: skip
        rank = len(shape)
        if kind == "permute":
            perm = draw(st.permutations(range(rank)))
            ops.append(("permute", tuple(perm)))
            shape = [shape[p] for p in perm]
        elif kind in ("transpose", "movedim") and rank > 1:
            a, b = draw(st.integers(0, rank - 1)), draw(st.integers(0, rank - 1))
            ops.append((kind, (a, b)))
            if kind == "transpose":
                shape[a], shape[b] = shape[b], shape[a]
            else:
                shape.insert(b, shape.pop(a))
        elif kind == "merge" and rank > 1:
            i = draw(st.integers(0, rank - 2))
            shape = [*shape[:i], shape[i] * shape[i + 1], *shape[i + 2 :]]
            ops.append(("reshape", tuple(shape)))
        elif kind == "split":
            i = draw(st.integers(0, rank - 1))
            factors = [f for f in (2, 3) if shape[i] % f == 0 and shape[i] > f]
            if factors:
                f = draw(st.sampled_from(factors))
                shape = [*shape[:i], f, shape[i] // f, *shape[i + 1 :]]
                ops.append(("view", tuple(shape)))
        elif kind == "unsqueeze":
            i = draw(st.integers(0, rank))
            ops.append(("unsqueeze", (i,)))
            shape.insert(i, 1)
        elif kind == "squeeze" and 1 in shape and rank > 1:
            i = shape.index(1)
            ops.append(("squeeze", (i,)))
            shape.pop(i)
    return start, ops


def _both_ways(model: nn.Module, x: torch.Tensor) -> tuple:
    """The analysis of ``model`` with moves mapped from shapes, and by coordinates only."""
    from graphopt.passes.prune.ops import movement

    ir = GraphIR.trace(model, (x,))
    ir.analysis("shapes")
    by_shape = analyse(ir)
    original = movement.link_by_shape
    movement.link_by_shape = lambda g, node, **kw: False  # type: ignore[assignment]
    try:
        by_coordinates = analyse(ir)
    finally:
        movement.link_by_shape = original
    return _canonical(by_shape), _canonical(by_coordinates)


@settings(max_examples=40, deadline=None)
@given(chain=_move_chains())
def test_moves_mapped_from_shapes_agree_with_coordinates(chain) -> None:
    """Permutations and reshapes are linked from their shapes alone; running each op on
    coordinate tensors (the general method) groups and freezes every element alike."""
    start, ops = chain
    by_shape, by_coordinates = _both_ways(_Moves(start[1], ops), torch.randn(*start))
    assert by_shape == by_coordinates


def test_flatten_modules_mapped_from_shapes_agree_with_coordinates() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 12, 1), nn.Unflatten(1, (3, 4)), nn.Flatten(1, 2), nn.Flatten(2),
        nn.Unflatten(2, (2, 8)), nn.Flatten(), nn.Linear(12 * 16, 5),
    )  # fmt: skip
    from graphopt.passes.prune.ops import movement

    handled = []
    original = movement.link_by_shape

    def spy(g, node, **kw):
        handled.append((node.op, original(g, node, **kw)))
        return handled[-1][1]

    movement.link_by_shape = spy  # type: ignore[assignment]
    try:
        by_shape, by_coordinates = _both_ways(model, torch.randn(1, 3, 4, 4))
    finally:
        movement.link_by_shape = original
    assert handled.count(("call_module", True)) == 5
    assert by_shape == by_coordinates
