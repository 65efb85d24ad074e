"""The failure classes ``benchmarks/zoo.py`` found on a seeded sample of timm, one real timm
model each (small inputs, shallow configurations): each prunes for real and correctly.

* weight-standardised convolutions (``ScaledStdConv2d``/``StdConv2d``: the weight is
  computed in the graph from a parameter) prune that parameter's channels;
* Res2Net's ``split`` → per-piece convs → ``cat`` with the last piece taken as ``x[-1]``
  prunes every piece alike;
* BatchNorm after a layer whose output's ``ndim`` is also read (timm's ``BatchNormAct2d``)
  folds;
* ECA's gate (a Conv1d slid over the pooled channels) prunes with the channels it gates;
* ``adaptive_max_pool2d`` captured by torch.export is raised to the function prune knows;
* ``roll`` (Swin), ``tile`` (Hiera) and ``repeat_interleave`` (GCViT) pass channels through.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphopt
from graphopt.fxutil import arg

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")


def _prune(spec: str, side: int) -> tuple[graphopt.Result, torch.Tensor]:
    ir = graphopt.load(spec, input_shapes=[(1, 3, side, side)])
    return graphopt.optimize(ir, "prune(ratio=0.5)"), ir.example_inputs[0]


def _runs_with_same_output_shape(spec: str, result: graphopt.Result, x: torch.Tensor) -> None:
    original = graphopt.load(spec, input_shapes=[tuple(x.shape)]).gm
    with torch.no_grad():
        assert result.ir.gm(x).shape == original(x).shape


def _halved(cls: type[nn.Module]) -> tuple[nn.Module, torch.Tensor, torch.fx.GraphModule, list]:
    """A seeded ``cls()`` whose ``conv1`` makes 32 channels, a 2×3×8×8 input, the model
    pruned by half, and the indices of the channels ``conv1`` kept (told by its rows)."""
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(2, 3, 8, 8)
    result = graphopt.optimize(model, "prune(ratio=0.5)", example_inputs=(x,))
    gm = result.ir.gm
    rows = gm.get_parameter("conv1.weight")
    assert rows.shape[0] == 16, result.ledger[-1].notes
    original = model.get_parameter("conv1.weight")
    kept = [int((original == row).all((1, 2, 3)).nonzero()) for row in rows]
    assert kept == sorted(kept)
    return model, x, gm, kept


def test_weight_standardised_convs_prune_their_parameter():
    from timm.layers import ScaledStdConv2d

    torch.manual_seed(0)
    model = timm.create_model("nf_regnet_b0", pretrained=False, num_classes=10).eval()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, ScaledStdConv2d)}
    assert len(convs) > 20
    for m in convs.values():  # distinct gains, so that the kept rows can be told apart
        m.gain.data = torch.rand_like(m.gain) + 0.5
    x = torch.randn(1, 3, 32, 32)
    result = graphopt.optimize(model, "prune(ratio=0.5)", example_inputs=(x,))
    first, last = result.ledger[0], result.ledger[-1]
    assert last.macs <= 0.35 * first.macs, last.notes
    pruned = result.ir.gm
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    narrower = 0
    for name, m in convs.items():
        w, gain = pruned.get_parameter(f"{name}.weight"), pruned.get_parameter(f"{name}.gain")
        assert w.shape[0] == gain.shape[0]
        narrower += w.shape[0] < m.out_channels
        # the kept gains are some of the original ones, in order, and the raw weight keeps
        # the same rows (and some of their columns)
        kept = (gain.flatten()[:, None] == m.gain.flatten()[None, :]).nonzero()[:, 1]
        assert len(kept) == gain.numel() and bool((kept.diff() > 0).all())
        rows = m.weight[kept].detach()
        # each kept column is one of the original columns of those rows
        old_cols = rows.transpose(0, 1).flatten(1)
        new_cols = w.detach().transpose(0, 1).flatten(1)
        distance, cols = torch.cdist(
            new_cols, old_cols, compute_mode="donot_use_mm_for_euclid_dist"
        ).min(1)
        assert bool((distance == 0).all())
        assert torch.equal(rows[:, cols], w)
    assert narrower > len(convs) // 2


def test_res2net_split_pieces_prune_alike_including_the_last():
    spec = "timm:res2net50_26w_4s?layers=[1,1,1,1]&num_classes=10"
    result, x = _prune(spec, 32)
    first, last = result.ledger[0], result.ledger[-1]
    assert last.macs <= 0.35 * first.macs, last.notes
    _runs_with_same_output_shape(spec, result, x)
    gm = result.ir.gm
    convs = [gm.get_submodule(f"layer1.0.convs.{i}") for i in range(3)]
    width = convs[0].in_channels
    assert width < 26
    # every piece (the pooled last one too) has the split's width; conv3 reads all four
    assert gm.get_submodule("layer1.0.conv1").out_channels == 4 * width
    in3 = gm.get_submodule("layer1.0.conv3").in_channels
    assert in3 == sum(c.out_channels for c in convs) + width


def test_batchnorm_after_a_layer_whose_rank_is_asserted_folds_exactly():
    ir = graphopt.load("timm:regnety_002?num_classes=10", input_shapes=[(1, 3, 32, 32)])
    norms = sum(n.target is nn.functional.batch_norm for n in ir.graph.nodes)
    assert norms > 10
    result = graphopt.optimize(ir, "fold")
    entry = result.ledger[-1]
    assert entry.stats["BN folded"] == norms, entry.notes
    assert not any(n.target is nn.functional.batch_norm for n in result.ir.graph.nodes)
    x = ir.example_inputs[0]
    with torch.no_grad():
        torch.testing.assert_close(result.ir.gm(x), ir.gm(x), rtol=1e-4, atol=1e-4)


def test_one_group_groupnorm_prunes_channels_like_layernorm():
    """PoolFormer's GroupNorm1 normalises over channels and space; its residual stream
    used to be one atom (one group kept whole), now its channels prune one by one."""
    spec = "timm:poolformerv2_s12?num_classes=10"
    result, x = _prune(spec, 32)
    first, last = result.ledger[0], result.ledger[-1]
    assert last.macs <= 0.35 * first.macs, last.notes
    _runs_with_same_output_shape(spec, result, x)
    norms = [n for n in result.ir.graph.nodes if n.target is nn.functional.group_norm]
    assert len(norms) > 10
    widths = []
    for node in norms:
        weight = result.ir.gm.get_parameter(str(arg(node, 2, "weight").target))
        assert arg(node, 1, "num_groups") == 1
        widths.append(weight.shape[0])
    assert widths[0] < 64  # 64 in the unpruned model
    with torch.no_grad():
        result.ir.gm(x)  # each one-group norm's weight fits its narrower input


def test_eca_gate_slides_over_the_kept_channels():
    """ECA's gate is a Conv1d run over the pooled channels as its sequence. Its positions
    now go with the channels they gate (before, the stream it gates was kept whole): the
    pruned gate is the same kernel slid over the kept channels' means."""
    from timm.layers import EcaModule

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
            self.eca = EcaModule(kernel_size=5)
            self.conv2 = nn.Conv2d(32, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv2(self.eca(torch.relu(self.conv1(x))))

    model, x, gm, kept = _halved(Gated)
    torch.testing.assert_close(gm.get_parameter("eca.conv.weight"), model.eca.conv.weight)
    with torch.no_grad():
        h = torch.relu(model.conv1(x))[:, kept]
        gate = torch.sigmoid(model.eca.conv(h.mean((2, 3))[:, None]))[:, 0, :, None, None]
        expected = nn.functional.conv2d(h * gate, model.conv2.weight[:, kept], model.conv2.bias)
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)


def test_eca_resnet_prunes_its_gated_residual_stream():
    spec = "timm:ecaresnetlight?layers=[1,1,1,1]&num_classes=10"
    result, x = _prune(spec, 32)
    first, last = result.ledger[0], result.ledger[-1]
    assert last.macs <= 0.35 * first.macs, last.notes  # 0.52 with the stream kept whole
    _runs_with_same_output_shape(spec, result, x)
    gm = result.ir.gm
    assert gm.get_submodule("layer1.0.conv3").out_channels < 256


def test_exported_adaptive_max_pool_is_raised_and_prunes():
    """timm's bilinear attention (BAT) max-pools with ``F.adaptive_max_pool2d``, which
    torch.export records as an ATen op returning (values, indices); it is raised to the
    function, whose channels the prune rules know, instead of freezing every channel it
    reads."""
    from timm.layers.non_local_attn import BatNonLocalAttn

    class Bat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 32, 3, padding=1)
            self.bat = BatNonLocalAttn(32, block_size=4, groups=2, rd_channels=16)
            self.head = nn.Conv2d(32, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.bat(self.stem(x)))

    torch.manual_seed(0)
    model = Bat().eval()
    x = torch.randn(1, 3, 8, 8)
    ir = graphopt.trace(model, (x,), capture="export")
    pools = [n for n in ir.graph.nodes if n.target is nn.functional.adaptive_max_pool2d]
    assert len(pools) == 2
    assert not any(isinstance(n.target, torch._ops.OpOverload) for n in ir.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(ir.gm(x), model(x))
    result = graphopt.optimize(ir, "prune(ratio=0.5)")
    notes = " ".join(result.ledger[-1].notes)
    assert "adaptive_max_pool2d" not in notes, notes
    gm = result.ir.gm
    # the residual stream prunes; BAT's own width stays, for a reason of its own (its
    # gates are expanded over groups of channels: a regrouping reshape)
    assert gm.get_submodule("stem").out_channels == 16, notes
    assert result.ledger[-1].macs < 0.7 * result.ledger[0].macs
    with torch.no_grad():
        assert gm(x).shape == model(x).shape


def test_roll_tile_and_repeat_interleave_keep_channels_apart():
    """Swin's shifted windows roll the spatial dims (``torch.roll``), Hiera tiles its
    window position embedding (``Tensor.tile``) and GCViT repeats its global queries over
    the batch (``repeat_interleave``); before, each froze every channel it touched, and
    with them the residual stream. Now the channels pass through (rolled
    dims stay whole) and the pruned model is the original on the kept channels."""

    class RollTile(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
            self.pos = nn.Parameter(torch.randn(1, 32, 2, 2))
            self.conv2 = nn.Conv2d(32, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.roll(torch.relu(self.conv1(x)), shifts=(1, -2), dims=(2, 3))
            spread = self.pos.repeat_interleave(4, dim=2).repeat_interleave(4, 3)
            spread = spread.repeat_interleave(x.shape[0], dim=0)  # GCViT's global queries
            return self.conv2(h.roll(3, 2) + self.pos.tile(1, 1, 4, 4) + spread)

    model, x, gm, kept = _halved(RollTile)
    with torch.no_grad():
        h = torch.roll(torch.relu(model.conv1(x))[:, kept], shifts=(1, -2), dims=(2, 3))
        pos = model.pos[:, kept]
        spread = pos.repeat_interleave(4, dim=2).repeat_interleave(4, 3).expand(2, -1, -1, -1)
        h = h.roll(3, 2) + pos.tile(1, 1, 4, 4) + spread
        expected = nn.functional.conv2d(h, model.conv2.weight[:, kept], model.conv2.bias)
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)


def test_swin_prunes_across_its_shifted_windows():
    spec = "timm:swin_tiny_patch4_window7_224?img_size=56&depths=[2,2]&num_heads=[3,6]"
    spec += "&embed_dim=48&num_classes=10"
    result, x = _prune(spec, 56)
    first, last = result.ledger[0], result.ledger[-1]
    assert last.macs <= 0.35 * first.macs, last.notes
    assert not any("roll" in note for note in last.notes), last.notes
    _runs_with_same_output_shape(spec, result, x)


class _BiasedHeads(nn.Module):
    """Attention whose per-head bias (a parameter, as MaxViT's and Swin's relative position
    tables) is given to SDPA as its mask."""

    def __init__(self, dim: int = 32, heads: int = 4, tokens: int = 6) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.randn(heads, tokens, tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, c)) + x


def test_a_per_head_attention_bias_is_pruned_with_its_heads():
    """The bias goes with the heads it is added to: the pruned block computes what the
    original computes with the removed heads' output columns zeroed (MaxViT broke at 12
    against 6 heads before)."""
    torch.manual_seed(0)
    model = _BiasedHeads().eval()
    x = torch.randn(2, 6, 32)
    result = graphopt.optimize(model, "prune(ratio=0.5)", example_inputs=(x,))
    gm = result.ir.gm
    bias = gm.get_parameter("bias")
    assert bias.shape == (2, 6, 6), result.ledger[-1].notes
    kept = [int((model.bias == row).all((1, 2)).nonzero()) for row in bias]
    reference = _BiasedHeads().eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for head in set(range(4)) - set(kept):
            reference.proj.weight[:, head * 8 : (head + 1) * 8] = 0
        torch.testing.assert_close(gm(x), reference(x), rtol=1e-5, atol=1e-5)
