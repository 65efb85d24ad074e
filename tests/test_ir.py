"""GraphIR: tracing, fake-tensor shapes, costs, provenance, queries and views."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
import torchvision
from torch import nn

import graphopt
from graphopt import GraphIR


def test_shapes_come_from_fake_tensors_and_match_real_run(block, block_input):
    ir = GraphIR.trace(block, block_input)
    assert not ir.has_analysis("shapes")
    ir.analysis("shapes")
    assert ir.has_analysis("shapes")
    ir.invalidate(keep=["costs"])
    assert not ir.has_analysis("shapes")
    ir.analysis("shapes")
    real = {}
    hooks = [
        m.register_forward_hook(lambda mod, i, o, name=name: real.setdefault(name, o))
        for name, m in block.named_modules()
        if name in ("stem", "grouped", "head")
    ]
    block(*block_input)
    for h in hooks:
        h.remove()
    for node in ir.nodes(op="call_module"):
        if node.target in real:
            assert ir.shape(node) == tuple(real[node.target].shape)
            assert ir.dtype(node) == torch.float32
    for node in ir.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            assert type(val).__name__ == "FakeTensor"  # no real memory held in the IR


@pytest.mark.parametrize(
    ("name", "gmacs", "mparams"),
    [
        ("resnet18", 1.814, 11.690),
        ("resnet50", 4.089, 25.557),
        ("mobilenet_v2", 0.301, 3.505),
        ("vit_b_16", 17.564, 86.568),  # attention takes torch's fused fast path in eval
    ],
)
def test_macs_and_params_match_published_figures(name, gmacs, mparams):
    ir = graphopt.load(f"torchvision:{name}")
    # torchvision's model cards list GFLOPS as multiply-accumulates (1.81 for resnet18)
    assert ir.total_macs() / 1e9 == pytest.approx(gmacs, abs=0.01)
    assert ir.total_params() / 1e6 == pytest.approx(mparams, abs=0.01)


def test_macs_count_functional_calls_and_attention():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(32, 16))
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            y = torch.nn.functional.linear(x, self.w)  # 5*32*16 MACs per batch row
            a, _ = self.attn(x, x, x)
            return y.sum() + a.sum()

    ir = GraphIR.trace(Functional(), (torch.randn(1, 5, 16),))
    costs = ir.costs()
    linear = ir.nodes(target=torch.nn.functional.linear)[0]
    assert costs[linear.name].macs == 5 * 32 * 16
    attn = ir.nodes(module_type=nn.MultiheadAttention)[0]
    # in-proj 3·L·E², scores and values 2·L²·E, out-proj L·E²  (L=5, E=16)
    assert costs[attn.name].macs == 3 * 5 * 16 * 16 + 2 * 5 * 5 * 16 + 5 * 16 * 16
    assert costs["w"].params == 32 * 16  # the get_attr node owns the functional weight


@pytest.mark.parametrize("training", [True, False])
def test_attention_macs_on_both_paths(training):
    """nn.MultiheadAttention and TransformerEncoderLayer run fused kernels in eval mode."""
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, batch_first=True)
    for p in layer.parameters():
        p.requires_grad_(training)
    layer.train(training)
    model = nn.Sequential(layer).train(training)
    ir = GraphIR.trace(model, (torch.randn(3, 5, 16),), leaf_modules=["TransformerEncoderLayer"])
    attention = 3 * (4 * 5 * 16 * 16 + 2 * 5 * 5 * 16)
    feed_forward = 3 * 5 * (16 * 24 * 2)
    assert ir.total_macs() == attention + feed_forward


def test_shared_module_params_are_counted_once(block, block_input):
    ir = GraphIR.trace(block, block_input)
    shared = ir.nodes(op="call_module", name="shared*")
    assert len(shared) == 2
    per_node = [ir.costs()[n.name].params for n in shared]
    assert sorted(per_node) == [0, sum(p.numel() for p in block.shared.parameters())]
    assert sum(c.params for c in ir.costs().values()) == ir.total_params()


def test_queries(block, block_input):
    ir = GraphIR.trace(block, block_input)
    convs = ir.nodes(module_type=nn.Conv2d)
    assert [n.target for n in convs] == ["stem", "grouped", "depthwise", "shared", "shared"]
    assert [n.name for n in ir.nodes(op="call_function", target=torch.cat)] == ["cat", "cat_1"]
    assert [n.name for n in ir.nodes(name="shared*")] == ["shared", "shared_1"]
    assert ir.nodes(where=lambda n: n.op == "output")[0].name == "output"


def test_provenance_follows_replacements(block, block_input):
    ir = GraphIR.trace(block, block_input)
    assert all(n.meta[graphopt.ORIGIN] == n.name for n in ir.graph.nodes)
    bn = ir.nodes(name="bn")[0]
    with ir.graph.inserting_after(bn):
        clone = ir.graph.call_function(torch.clone, (bn.args[0],))
    ir.replace(bn, clone)  # the clone now stands for the original bn node
    assert clone.meta[graphopt.ORIGIN] == "bn"
    ir.recompile()
    copied = ir.copy()
    assert {n.meta[graphopt.ORIGIN] for n in copied.graph.nodes} == {
        n.meta[graphopt.ORIGIN] for n in ir.graph.nodes
    }


def test_networkx_view(block, block_input):
    ir = GraphIR.trace(block, block_input)
    g = ir.to_networkx()
    assert isinstance(g, nx.DiGraph)
    assert nx.is_directed_acyclic_graph(g)
    assert g.number_of_nodes() == len(ir.graph.nodes)
    assert g.has_edge("stem", "bn")
    assert g.nodes["head"]["shape"] == [2, 10]
    assert g.nodes["head"]["params"] == 32 * 10 + 10


def test_summary_and_html(block, block_input):
    from rich.console import Console

    ir = GraphIR.trace(block, block_input)
    console = Console(record=True, width=200)
    console.print(ir.summary())
    text = console.export_text()
    assert "stem" in text and "2×16×8×8" in text and f"{ir.total_params():,} params" in text
    page = ir._repr_html_()
    assert (
        page.startswith("<table>")
        and "<td>stem</td>" in page
        and page.count("<tr>") == len(ir.graph.nodes) + 1
    )


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.gate(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: untraceable
            return x
        return -x


def test_untraceable_model_names_line_and_suggests_leaf():
    with pytest.raises(graphopt.GraphoptError) as info:
        GraphIR.trace(Branchy(), (torch.randn(1, 4),))
    message = str(info.value)
    assert "test_ir.py:" in message and "Gate.forward" in message
    assert "--leaf-module Gate" in message
    ir = GraphIR.trace(Branchy(), (torch.randn(1, 4),), leaf_modules=["Gate"])
    assert [n.op for n in ir.graph.nodes] == ["placeholder", "call_module", "call_module", "output"]


def test_concrete_args_remove_a_branch():
    class Flag(nn.Module):
        def forward(self, x, double=False):
            return x * 2 if double else x

    ir = GraphIR.trace(Flag(), (torch.randn(2),), concrete_args={"double": True})
    x = torch.randn(2)
    assert torch.equal(ir.gm(x), x * 2)
    assert [n.op for n in ir.graph.nodes] == ["placeholder", "call_function", "output"]


def test_input_that_does_not_fit_is_one_sentence():
    ir = GraphIR.trace(torchvision.models.resnet18(), (torch.randn(1, 4, 32, 32),))
    with pytest.raises(graphopt.GraphoptError) as info:
        ir.analysis("shapes")
    message = str(info.value)
    assert "does not fit" in message and "conv1" in message and "--input-shape" in message
    assert "\n" not in message


def test_fetch_free_name_and_store_tensor_follow_dotted_paths() -> None:
    """The helpers every pass uses to read attributes, name new ones and replace tensors:
    a new name avoids submodules, parameters, buffers and plain attributes alike, and a
    replaced tensor keeps its kind."""
    from graphopt.ir import fetch, free_name, store_tensor

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    model.get_submodule("0").weight.requires_grad_(False)
    ir = GraphIR.trace(model, (torch.randn(1, 3, 8, 8),))
    assert ir.fetch("1.running_mean") is ir.gm.get_submodule("1").running_mean
    assert ir.free_name("0") == "0_1" and ir.free_name("0.weight") == "0.weight_1"
    assert ir.free_name("1.running_var") == "1.running_var_1" and ir.free_name("new") == "new"
    ir.gm.register_buffer("new", torch.zeros(1))
    ir.gm.new_1 = torch.zeros(1)
    assert free_name(ir.gm, "new") == "new_2"
    w = store_tensor(ir.gm, "0.weight", torch.zeros(4, 3, 3, 3))
    assert isinstance(w, torch.nn.Parameter) and not w.requires_grad
    assert fetch(ir.gm, "0.weight") is w and "weight" in ir.gm.get_submodule("0")._parameters
    b = store_tensor(ir.gm, "1.running_mean", torch.full((4,), 2.0))
    assert "running_mean" in ir.gm.get_submodule("1")._buffers and b.eq(2).all()
    assert "running_mean" in dict(ir.gm.get_submodule("1").named_buffers())
    plain = store_tensor(ir.gm, "new_1", torch.ones(3))
    assert not isinstance(plain, torch.nn.Parameter) and "new_1" not in ir.gm._buffers


def test_replace_calls_chains_new_modules_at_every_call() -> None:
    """A Linear called twice becomes the same two-module chain at both calls: outputs equal
    when the chain computes the same map, new nodes keep the old provenance, and a taken
    path is not reused."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 4)
            self.fc_a = nn.ReLU()  # holds the first choice of path

        def forward(self, x):
            return self.fc_a(self.fc(x) + self.fc(x.flip(-1)))

    torch.manual_seed(0)
    model = Twice().eval()
    x = torch.randn(3, 6)
    ir = GraphIR.trace(model, (x,))
    calls = ir.nodes(target="fc")
    first, second = nn.Linear(6, 6, bias=False), nn.Linear(6, 4)
    with torch.no_grad():
        first.weight.copy_(torch.eye(6))
        second.load_state_dict(model.fc.state_dict())
    paths = ir.replace_calls(calls, [("a", first), ("b", second)])
    ir.recompile()
    assert paths == ["fc_a_1", "fc_b"]
    assert [n.target for n in ir.nodes(op="call_module")].count("fc_a_1") == 2
    assert {n.meta[graphopt.ORIGIN] for n in ir.nodes(target="fc_b")} == {c.name for c in calls}
    with torch.no_grad():
        torch.testing.assert_close(ir.gm(x), model(x))


def test_copy_sharing_tensors_is_independent_but_for_the_tensors(block, block_input) -> None:
    """``copy(share_tensors=True)``: same outputs; replacing a tensor, a module attribute or
    the graph in the copy leaves the original alone; the tensors themselves are shared."""
    ir = GraphIR.trace(block, block_input)
    ir.analysis("shapes")
    twin = ir.copy(share_tensors=True)
    assert not twin.has_analysis("shapes")
    with torch.no_grad():
        torch.testing.assert_close(twin.gm(*block_input), ir.gm(*block_input), rtol=0, atol=0)
    originals = dict(ir.gm.named_parameters())
    assert all(p is originals[name] for name, p in twin.gm.named_parameters())
    assert all(a is not b for a, b in zip(twin.gm.modules(), ir.gm.modules(), strict=True))
    assert twin.graph is not ir.graph and type(twin.gm) is not type(ir.gm)

    conv = next(n for n in twin.nodes(op="call_module") if n.target == "stem")
    graphopt.ir.store_tensor(twin.gm, "stem.weight", torch.zeros_like(originals["stem.weight"]))
    twin.module(conv).out_channels = -1
    twin.module(conv).weight.requires_grad_(True)
    twin.module(conv).register_forward_hook(lambda *a: None)
    twin.module(conv).register_buffer("extra", torch.zeros(1), persistent=False)
    with twin.graph.inserting_after(conv):
        relu = twin.graph.call_function(torch.relu, (conv,))
    conv.replace_all_uses_with(relu, delete_user_cb=lambda user: user is not relu)
    twin.recompile()
    assert ir.gm.get_submodule("stem").weight is originals["stem.weight"]
    assert ir.gm.get_submodule("stem").out_channels != -1
    stem = ir.gm.get_submodule("stem")
    assert not stem._forward_hooks and not hasattr(stem, "extra")
    assert not stem._non_persistent_buffers_set
    assert len(ir.graph.nodes) == len(twin.graph.nodes) - 1
    assert "val" in next(n for n in ir.graph.nodes if n.name == conv.name).meta
    with torch.no_grad():
        torch.testing.assert_close(ir.gm(*block_input), block(*block_input))


class KeepingTracer(torch.fx.Tracer):
    """A tracer a pickled GraphModule must be rebuilt with (as one keeping an output type)."""


def test_a_copy_sharing_tensors_pickles_like_the_original(block, block_input, tmp_path) -> None:
    gm = torch.fx.GraphModule(block, KeepingTracer().trace(block))
    assert gm._tracer_cls is KeepingTracer
    twin = GraphIR(gm, block_input).copy(share_tensors=True).gm
    assert twin._tracer_cls is KeepingTracer and twin._tracer_extras == gm._tracer_extras
    torch.save(twin, tmp_path / "twin.pt")
    back = torch.load(tmp_path / "twin.pt", weights_only=False)
    assert back._tracer_cls is KeepingTracer
    with torch.no_grad():
        torch.testing.assert_close(back(*block_input), block(*block_input), rtol=0, atol=0)


def test_outputs_analysis_is_the_model_run_on_its_example_inputs(block, block_input) -> None:
    ir = GraphIR.trace(block, block_input)
    out = ir.analysis("outputs")
    with torch.no_grad():
        torch.testing.assert_close(out, block.eval()(*block_input), rtol=0, atol=0)
    assert ir.analysis("outputs") is out  # cached until the graph changes
    ir.invalidate()
    assert ir.analysis("outputs") is not out


def test_provided_analysis_is_used_until_invalidated(block, block_input) -> None:
    ir = GraphIR.trace(block, block_input)
    ir.provide("shapes", True)  # nothing was run: costs then read no MACs from the nodes
    assert ir.total_macs() == 0
    ir.invalidate()
    assert ir.total_macs() > 0


@pytest.mark.parametrize(
    "name",
    ["mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "vit_b_32", "swin_t", "googlenet"],
)
@pytest.mark.parametrize("training", [False, True])
def test_shape_keeping_modules_get_the_shapes_a_real_run_gives(name: str, training: bool):
    """Norms, activations and linears are not run under fake tensors (their output is made
    from their input's shape): every node's shape and dtype still match a real run, in both
    modes, and the MACs match torch's FLOP counter on the real run."""
    from torch.utils.flop_counter import FlopCounterMode

    from graphopt.analyses import FUSED_FLOPS

    torch.manual_seed(0)
    kwargs = {"image_size": 32} if name.startswith("vit") else {}
    model = getattr(torchvision.models, name)(weights=None, **kwargs).train(training)
    x = torch.randn(2, 3, 32, 32)
    ir = GraphIR.trace(model, (x,))
    ir.analysis("shapes")
    real: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                real[n.name] = out
            return out

    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=FUSED_FLOPS) as counter:
        Recorder(ir.gm).run(x)
    assert len(real) > 100
    assert ir.total_macs() == counter.get_total_flops() // 2
    for node in ir.graph.nodes:
        if node.name in real:
            assert ir.shape(node) == tuple(real[node.name].shape), node.name
            assert ir.dtype(node) == real[node.name].dtype, node.name


class _Convs(nn.Module):
    """Convolutions of every shape rule case: asymmetric kernels, strides and padding,
    dilation, 'same' and 'valid', a reflect padding mode, groups, 1-d and 3-d."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, (1, 7), stride=(2, 1), padding=(0, 3))
        self.b = nn.Conv2d(8, 8, 3, dilation=2, padding="same", groups=4)
        self.c = nn.Conv2d(8, 6, (3, 2), padding="valid", padding_mode="reflect")
        self.d = nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect", groups=6, bias=False)
        self.e = nn.Conv1d(6, 4, 5, stride=3, padding=2)
        self.f = nn.Conv3d(1, 2, (2, 3, 1), stride=(1, 2, 2))

    def forward(self, x):
        y = self.d(self.c(self.b(self.a(x))))
        z = self.e(y.flatten(2))
        return self.f(z.unsqueeze(1).unsqueeze(-1)).sum() + z.mean()


def test_conv_shape_rule_matches_a_real_run():
    torch.manual_seed(0)
    model = _Convs().eval()
    x = torch.randn(2, 3, 17, 13)
    ir = GraphIR.trace(model, (x,))
    ir.analysis("shapes")
    real: dict[str, tuple[int, ...]] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            real[n.name] = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
            return out

    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        Recorder(ir.gm).run(x)
    for node in ir.nodes(op="call_module"):
        assert ir.shape(node) == real[node.name], node.name
    assert ir.total_macs() == counter.get_total_flops() // 2


@pytest.mark.parametrize(
    ("layer", "kind", "size"),
    [(nn.BatchNorm2d(16), "BatchNorm2d", "16"), (nn.LayerNorm([8, 6, 5]), "LayerNorm", "[8, 6, 5]"),
     (nn.Linear(7, 2), "Linear", "7"), (nn.Conv2d(4, 2, 1), "Conv2d", "4"),
     (nn.Conv2d(8, 2, 9), "Conv2d", "too small")],
)  # fmt: skip
def test_layer_that_does_not_fit_is_named(layer: nn.Module, kind: str, size: str):
    """A layer given its output by a shape rule still refuses an input it would refuse."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), layer, nn.ReLU()).eval()
    ir = GraphIR.trace(model, (torch.randn(1, 3, 8, 8),))
    with pytest.raises(graphopt.GraphoptError) as info:
        ir.analysis("shapes")
    message = str(info.value)
    assert "does not fit" in message and f"'_1' ({kind})" in message and size in message
