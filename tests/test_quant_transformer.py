"""quant on transformers: torch.nn layers expanded exactly, int8 attention projections,
token models (dynamic by default), weight-only int8/int4, SmoothQuant, timm ECA convs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from graphopt.passes.quant import quant_report
from graphopt.passes.quant.expand import expand_composites
from graphopt.passes.quant.forms import is_token_model
from graphopt.passes.quant.linear import int4_codes
from graphopt.passes.quant.smooth import smooth
from quant_helpers import batches, out_sqnr, targets
from quant_helpers import quantize as run
from torch import nn

import graphopt
from graphopt import GraphIR, GraphoptError

pytestmark = pytest.mark.usefixtures("one_thread")


def images(shape, n=2, seed=1):
    return batches(shape, n, seed)


def small_vit() -> nn.Module:
    """torchvision's VisionTransformer in a small configuration (4 layers, width 64)."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128
    )
    nn.init.normal_(model.heads.head.weight, std=0.125)  # torchvision starts it at zero
    return model.eval()


# -- expansion of torch.nn layers: exact ------------------------------------------------------


class Attend(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, **kw)

    def forward(self, q, kv, mask, pad):
        out, weights = self.attn(q, kv, kv, attn_mask=mask, key_padding_mask=pad)
        return out, weights


class SelfAttend(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, **kw)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class Encode(nn.Module):
    def __init__(self, norm_first: bool, activation: str, nested: bool = True) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            16, 4, 32, batch_first=True, norm_first=norm_first, activation=activation
        )
        self.enc = nn.TransformerEncoder(
            layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=nested
        )

    def forward(self, x, pad):
        return self.enc(x, src_key_padding_mask=pad)


PAD = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])


@pytest.mark.parametrize(
    ("model", "inputs"),
    [
        (SelfAttend(batch_first=True), (torch.randn(3, 5, 16),)),
        (SelfAttend(), (torch.randn(5, 3, 16),)),  # sequence first
        (SelfAttend(batch_first=True), (torch.randn(5, 16),)),  # unbatched
        (
            Attend(batch_first=True, kdim=8, vdim=8),
            (
                torch.randn(3, 5, 16),
                torch.randn(3, 7, 8),
                torch.randn(5, 7),
                PAD[:, :1].expand(3, 7),
            ),
        ),
        (
            Attend(batch_first=True),
            (
                torch.randn(3, 5, 16),
                torch.randn(3, 5, 16),
                torch.triu(torch.ones(5, 5), 1) > 0,
                PAD,
            ),
        ),
        (Encode(False, "relu"), (torch.randn(3, 5, 16), PAD)),  # nested-tensor fast path
        (Encode(True, "gelu"), (torch.randn(3, 5, 16), PAD)),
        (Encode(False, "gelu", nested=False), (torch.randn(3, 5, 16), PAD.float() * -1e9)),
    ],
    ids=[
        "self",
        "seq-first",
        "unbatched",
        "cross-kdim-weights",
        "masks",
        "enc",
        "pre-norm",
        "float-pad",
    ],
)
def test_expansion_is_exact(model, inputs):
    model.eval()
    ir = GraphIR.trace(model, inputs)
    with torch.no_grad():
        ref = model(*inputs)
    done = expand_composites(ir)
    assert done.expanded and not done.kept
    assert not any(
        isinstance(m, nn.MultiheadAttention | nn.TransformerEncoderLayer) for m in ir.gm.modules()
    )
    # only torch classes remain: the pickled model needs no graphopt
    assert all(type(m).__module__.startswith("torch.") for m in ir.gm.modules())
    with torch.no_grad():
        got = ir.gm(*inputs)
    for a, b in zip(
        ref if isinstance(ref, tuple) else (ref,),
        got if isinstance(got, tuple) else (got,),
        strict=True,
    ):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_options_not_expanded_stay_whole_with_a_reason():
    model = SelfAttend(batch_first=True, add_bias_kv=True).eval()
    ir = GraphIR.trace(model, (torch.randn(2, 5, 16),))
    done = expand_composites(ir)
    assert not done.expanded and "add_bias_kv" in done.kept[0]
    assert isinstance(ir.gm.get_submodule("attn"), nn.MultiheadAttention)


# -- vision transformers -------------------------------------------------------------------------


def test_vit_attention_linears_run_int8_and_default_target_holds():
    model = small_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    result = run(model, x, data=images((4, 3, 32, 32)))
    gm, report = result.ir.gm, quant_report(result.ir.gm)
    linears = 4 * 4 + 1  # in_proj, out_proj, 2 MLP per layer, head
    kept = [c for c in report.kept_float if c.op == "Linear"]
    assert targets(gm).count("quantized.linear.default") + len(kept) == linears
    assert any("in_proj" in name for name in report.quantized)
    assert "quantized.add.default" not in targets(gm)  # the residual stream stays float
    assert len(report.demoted) == 2 * 4 + 1  # both residual adds of each layer, class token
    assert report.target == "output SQNR ≥ 25 dB" and report.target_met and report.sqnr_db >= 25
    assert out_sqnr(model, gm, x) > 23  # held-out images, not those the target was judged on


def test_timm_deit_default_quant():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=3)

    class Images(nn.Module):  # timm's forward takes optional masks; feed it images only
        def __init__(self) -> None:
            super().__init__()
            self.deit = deit

        def forward(self, x):
            return self.deit(x)

    model = Images().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    result = run(model, x, data=images((4, 3, 32, 32)))
    report = quant_report(result.ir.gm)
    assert report.target_met and report.sqnr_db >= 25
    assert "quantized.linear.default" in targets(result.ir.gm)
    assert out_sqnr(model, result.ir.gm, x) > 23


def with_outliers(model: nn.Module, factor: float = 30.0) -> nn.Module:
    """Scale 3 channels of every LayerNorm feeding only Linears ×factor (in torchvision's
    ViT, the one before each MLP) and the Linears' columns ÷factor: the same function,
    with activation outliers like trained transformers'."""
    model = copy.deepcopy(model)
    gm = fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        norm = modules.get(str(node.target)) if node.op == "call_module" else None
        readers = [modules.get(str(u.target)) for u in node.users if u.op == "call_module"]
        if (
            isinstance(norm, nn.LayerNorm)
            and readers
            and all(type(r) is nn.Linear for r in readers)
        ):
            with torch.no_grad():
                norm.weight[:3] *= factor
                norm.bias[:3] *= factor
                for r in readers:
                    r.weight[:, :3] /= factor
    return gm


def test_smoothquant_folds_exactly_and_rescues_outliers():
    model = with_outliers(small_vit())
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    data = images((4, 3, 32, 32))
    ir = GraphIR.trace(copy.deepcopy(model), (x,))
    expand_composites(ir)
    before = dict(ir.gm.named_modules())["encoder.layers.encoder_layer_0.ln_2"].weight.clone()
    done = smooth(ir, data, 0.5, lambda n: False)
    # the four LayerNorms given outliers (before the MLPs) take 1/s; the attention ones,
    # without outliers, decline; out_proj, fc2 and the head have nothing to fold into
    assert len(done.folded) == 4 and all("ln_2" in f for f in done.folded)
    assert len(done.declined) == 4 and len(done.skipped) == 4 + 4 + 1
    after = dict(ir.gm.named_modules())["encoder.layers.encoder_layer_0.ln_2"].weight
    assert after[:3].abs().mean() < before[:3].abs().mean() / 3  # outliers moved out
    with torch.no_grad():
        assert torch.allclose(ir.gm(x), model(x), atol=1e-4, rtol=1e-4)  # same function
    plain = out_sqnr(model, run(model, x, "quant(min_sqnr=0,smooth=none)", data).ir.gm, x)
    smoothed = out_sqnr(model, run(model, x, "quant(min_sqnr=0)", data).ir.gm, x)  # α 0.5
    assert smoothed > plain + 10, (plain, smoothed)
    # the model without outliers: smoothing is declined, the result is the same
    base = small_vit()
    as_built = out_sqnr(base, run(base, x, "quant(min_sqnr=0,smooth=none)", data).ir.gm, x)
    assert out_sqnr(base, run(base, x, "quant(min_sqnr=0)", data).ir.gm, x) == as_built


# -- token models ----------------------------------------------------------------------------------


class Tokens(nn.Module):
    """Embedding + nn.TransformerEncoder + head: a small BERT-like classifier."""

    def __init__(self, vocab: int = 100, d: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, batch_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids)).mean(1))


def token_batches(n=4, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 100, (8, 12), generator=gen),) for _ in range(n)]


def test_token_models_are_detected_generically():
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 12))
    ir = GraphIR.trace(Tokens().eval(), (ids,))
    assert is_token_model(ir)

    class Lookup(nn.Module):  # integers, but into an index_select, not an embedding
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(100, 8))
            self.fc = nn.Linear(8, 2)

        def forward(self, ids):
            return self.fc(self.table[ids])

    assert not is_token_model(GraphIR.trace(Lookup(), (ids,)))

    class Functional(nn.Module):  # F.embedding fed from the input through arithmetic
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(100, 8))

        def forward(self, ids):
            return F.embedding(ids.flatten() % 100, self.table)

    assert is_token_model(GraphIR.trace(Functional(), (ids,)))


def test_token_model_defaults_to_dynamic_int8_everywhere():
    torch.manual_seed(0)
    model = Tokens().eval()
    ids = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(5))
    result = run(model, ids, data=token_batches())
    notes = " ".join(result.ledger[-1].notes)
    assert "mode=dynamic" in notes and "token model" in notes
    kinds = [type(m).__name__ for m in result.ir.gm.modules() if "dynamic" in type(m).__module__]
    assert len(kinds) == 2 * 4 + 1 - len(quant_report(result.ir.gm).kept_float)
    assert out_sqnr(model, result.ir.gm, ids) > 30
    # torch.ao's quantize_dynamic leaves attention's projections float
    torch.backends.mha.set_fastpath_enabled(False)  # it breaks torch's fast path
    try:
        ao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear})
        ao_linears = sum("dynamic" in type(m).__module__ for m in ao.modules())
        assert ao_linears == 2 * 2 + 1 < len(kinds)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def test_dynamic_aten_form_is_per_row_int8_and_exports(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    x = torch.randn(3, 5, 16)
    out = tmp_path / "m.pt2"
    result = graphopt.optimize(
        model, "quant(mode=dynamic,min_sqnr=0)", example_inputs=(x,), output=str(out)
    )
    assert out.exists()  # exported with torch.export and verified against the model
    assert sum(n.target is torch._int_mm for n in result.ir.gm.graph.nodes) == 2

    # reference: each row of the input rounded to int8 with its own scale
    def reference(layer, h):
        w = layer.weight.detach()
        ws = w.abs().amax(1) / 127
        wq = torch.round(w / ws[:, None]).clamp(-127, 127) * ws[:, None]
        s = h.abs().amax(-1, keepdim=True) / 127
        return torch.round(h / s) * s @ wq.t() + layer.bias

    with torch.no_grad():
        expect = reference(model[2], F.gelu(reference(model[0], x)))
        assert torch.allclose(result.ir.gm(x), expect, atol=1e-5)


# -- weight-only int8 / int4 --------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "group"), [(8, 128), (4, 32), (4, 64)])
def test_weight_only_matches_the_dequantized_reference(bits, group, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    x = torch.randn(2, 3, 128)
    pipe = f"quant(mode=weight_only,bits={bits},group_size={group},min_sqnr=0)"
    out = tmp_path / "m.pt2"
    result = graphopt.optimize(model, pipe, example_inputs=(x,), output=str(out))
    assert out.exists()  # exported with torch.export and verified against the model
    gm = result.ir.gm
    assert not any(isinstance(m, nn.Linear) for m in gm.modules())

    def deq(layer, fits):
        w = layer.weight.detach()
        if bits == 4 and fits:
            q, scale, zero = int4_codes(w, group)
            g = q.float().reshape(w.shape[0], -1, group)
            return ((g - 8) * scale.float()[..., None] + zero.float()[..., None]).reshape(w.shape)
        s = (w.abs().amax(1) / 127).bfloat16().float()
        return torch.round(w / (w.abs().amax(1) / 127)[:, None]).clamp(-127, 127) * s[:, None]

    def layer_ref(layer, h, fits):
        y = h.bfloat16().float() @ deq(layer, fits).t()
        return y.bfloat16().float() + layer.bias

    with torch.no_grad():
        h = F.relu(layer_ref(model[0], x, True))
        expect = layer_ref(model[2], h, False)  # 10 outputs: not a multiple of 16, so int8
        got = gm(x)
    assert torch.allclose(got, expect, rtol=2e-2, atol=2e-2 * expect.abs().max())
    assert out_sqnr(model, gm, x) > (30 if bits == 8 else 15)
    stored = {k: v for k, v in gm.state_dict().items() if "weight" in k}
    assert {v.dtype for v in stored.values()} >= {torch.int8 if bits == 8 else torch.uint8}
    if bits == 4:  # two codes a byte: 128×64 weights in 4 KiB
        packed = [v for v in stored.values() if v.dtype == torch.uint8]
        assert packed[0].numel() == 64 * 128 // 2
        assert any("int8 weights for" in n for n in result.ledger[-1].notes)


def test_weight_only_and_aten_have_no_onnx_form_refused_before_work(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    x = torch.randn(2, 8)
    for pipe in ("quant(mode=weight_only)", "quant(form=aten)"):
        with pytest.raises(GraphoptError, match="no ONNX operator"):
            graphopt.optimize(model, pipe, example_inputs=(x,), output=str(tmp_path / "m.onnx"))
    for pipe, suffix in (("quant(form=onnx)", "m.pt"), ("quant(mode=dynamic,form=onnx)", "m.pt2")):
        with pytest.raises(GraphoptError, match=r"only a \.onnx file holds"):
            graphopt.optimize(model, pipe, example_inputs=(x,), output=str(tmp_path / suffix))
    with pytest.raises(GraphoptError, match="has the form"):  # a vision model: static mode
        graphopt.optimize(model, "quant(form=onnx)", example_inputs=(x,), data=[(x,)])
    assert list(tmp_path.iterdir()) == []


def test_dynamic_onnx_form_matches_its_onnx_artifact(tmp_path):
    """mode=dynamic → .onnx: the in-memory op and onnxruntime's integer kernels agree to
    float rounding on a Linear model with 3-D inputs, shared inputs and no bias."""
    import onnx

    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 32), nn.Linear(16, 8, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.a(x), torch.relu(self.b(x))], -1)

    model = Two().eval()
    x = torch.randn(2, 5, 16)
    out = tmp_path / "m.onnx"
    result = graphopt.optimize(model, "quant(mode=dynamic)", example_inputs=(x,), output=out)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "MatMul" not in ops
    with torch.no_grad():
        got = result.ir.gm(x)
    assert out_sqnr(model, result.ir.gm, x) > 30
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ran = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(ran, got, rtol=1e-4, atol=1e-4)


# -- timm ECA: Conv1d -----------------------------------------------------------------------------


def test_timm_eca_conv1d_quantizes():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    from conftest import randomize_bn

    model = timm.create_model("ecaresnet26t", pretrained=False, layers=[1, 1, 1, 1])
    model = randomize_bn(model).eval()  # a real ECA ResNet-26t, one block per stage
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    result = run(model, x, data=images((2, 3, 32, 32)))
    assert "quantized.conv1d.default" in targets(result.ir.gm)
    assert out_sqnr(model, result.ir.gm, x) > 25


def test_dynamic_onnx_says_lstm_stays_float(tmp_path):
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.head = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.lstm(x)[0])

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    result = graphopt.optimize(
        Tagger().eval(), "quant(mode=dynamic)", example_inputs=(x,), output=tmp_path / "m.onnx"
    )
    notes = result.ledger[-1].notes
    assert any("1 LSTM call(s) stay float in ONNX" in n for n in notes), notes
    assert quant_report(result.ir.gm).quantized == ["head"]  # type: ignore[union-attr]
