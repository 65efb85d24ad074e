"""prune on Hugging Face transformers (random weights, one-layer configurations): whole
attention heads with their key/value groups, FFN width (SwiGLU's gate and up as one),
hidden size through LayerNorm/RMSNorm, tied embeddings, GPT-2's Conv1D, and the pruned
models lowered to ONNX and run by onnxruntime with token inputs."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.ir import GraphIR
from graphopt.loading import example_inputs, load_model

pytestmark = pytest.mark.usefixtures("one_thread")

_CORE = "num_hidden_layers=1&hidden_size=64&intermediate_size=128&num_attention_heads=4"
#: family -> (spec options, FFN weight, a hidden-size norm weight, query weight or None)
FAMILIES = {
    "bert": (
        f"vocab_size=500&{_CORE}",
        "bert.encoder.layer.0.intermediate.dense.weight",
        "bert.embeddings.LayerNorm.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
    ),
    "roberta": (
        f"vocab_size=500&{_CORE}",
        "roberta.encoder.layer.0.intermediate.dense.weight",
        "roberta.embeddings.LayerNorm.weight",
        "roberta.encoder.layer.0.attention.self.query.weight",
    ),
    "distilbert": (
        "vocab_size=500&n_layers=1&dim=64&n_heads=4&hidden_dim=128",
        "distilbert.transformer.layer.0.ffn.lin1.weight",
        "distilbert.embeddings.LayerNorm.weight",
        "distilbert.transformer.layer.0.attention.q_lin.weight",
    ),
    "gpt2": (
        "vocab_size=500&n_layer=1&n_embd=64&n_head=4",
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.ln_f.weight",
        None,  # q, k and v come from one c_attn
    ),
    "llama": (
        f"vocab_size=500&{_CORE}&num_key_value_heads=2",
        "model.layers.0.mlp.gate_proj.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.q_proj.weight",
    ),
    "qwen2": (
        f"vocab_size=500&{_CORE}&num_key_value_heads=2",
        "model.layers.0.mlp.gate_proj.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.q_proj.weight",
    ),
    "vit": (
        f"{_CORE}&image_size=32&patch_size=8",
        "vit.layers.0.mlp.fc1.weight",
        "vit.layers.0.layernorm_before.weight",
        "vit.layers.0.attention.q_proj.weight",
    ),
    "convnext": (
        "hidden_sizes=[16,32,64,128]&depths=[1,1,1,1]&image_size=32",
        "convnext.encoder.stages.0.layers.0.pwconv1.weight",
        "convnext.encoder.stages.0.layers.0.layernorm.weight",
        None,
    ),
}
TOKENS = (1, 16)
HEAD_DIM = 16


def capture(family: str, extra: str = "") -> tuple[nn.Module, GraphIR]:
    spec = f"hf:{family}?{FAMILIES[family][0]}{extra}"
    loaded = load_model(spec)
    assert loaded.module is not None and loaded.input_names is not None
    shapes = [TOKENS] if loaded.input_names[0] == "input_ids" else []
    inputs = example_inputs(loaded, shapes)
    ir = GraphIR.trace(loaded.module, inputs, input_names=loaded.input_names, source=spec)
    return loaded.module, ir


def attention_shapes(ir: GraphIR) -> dict[str, tuple[int, ...]]:
    """The query shape (batch, heads, tokens, head size) of every scaled dot-product."""
    return {
        n.name: tuple(ir.shape(n.args[0]) or ())  # type: ignore[arg-type]
        for n in ir.graph.nodes
        if n.op == "call_function" and n.target is F.scaled_dot_product_attention
    }


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prune_removes_heads_ffn_and_hidden_and_the_model_still_runs(family):
    model, ir = capture(family)
    _, ffn, hidden, query = FAMILIES[family]
    own = {n: p.clone() for n, p in model.named_parameters()}
    before = {n: p.shape for n, p in ir.gm.named_parameters()}
    heads_before = attention_shapes(ir)
    result = graphopt.optimize(ir, "prune(ratio=0.5)")
    pruned = result.ir
    after = {n: p.shape for n, p in pruned.gm.named_parameters()}
    assert after[ffn][0] == before[ffn][0] // 2  # FFN width
    assert after[hidden][0] == before[hidden][0] // 2  # residual stream, through its norms
    if query is not None:
        assert after[query][0] == before[query][0] // 2
    heads_after = attention_shapes(pruned)
    assert heads_after.keys() == heads_before.keys()
    for name, shape in heads_before.items():  # whole heads go; each keeps its size
        assert heads_after[name][-1] == shape[-1] == HEAD_DIM
        assert heads_after[name][1] == shape[1] // 2
    assert result.ledger[-1].macs < 0.45 * result.ledger[0].macs
    with torch.no_grad():
        want = graphopt.primary_output(graphopt.run_model(ir.gm, ir.example_inputs))
        got = graphopt.primary_output(graphopt.run_model(pruned.gm, ir.example_inputs))
    assert got.shape == want.shape and torch.isfinite(got).all()
    for n, p in model.named_parameters():  # the input model is never changed
        assert torch.equal(p, own[n]), n


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_grouped_query_attention_keeps_its_groups(family):
    """Four query heads share two key/value heads: a key/value head goes with its two
    query heads, so every layer keeps queries = 2 × key/value heads."""
    _, ir = capture(family)
    gm = graphopt.optimize(ir, "prune(ratio=0.5)").ir.gm
    attn = gm.get_submodule("model.layers.0.self_attn")
    q, k, v, o = (getattr(attn, f"{p}_proj") for p in "qkvo")
    assert k.out_features == v.out_features == HEAD_DIM  # one key/value head left
    assert q.out_features == 2 * k.out_features == o.in_features
    assert "rms_norm" in gm.code and "rsqrt" not in gm.code  # RMSNorm raised, then pruned


def test_heads_false_prunes_positions_of_every_head_in_step_with_rotary():
    _, ir = capture("llama")
    pruned = graphopt.optimize(ir, "prune(ratio=0.5,heads=false)").ir
    shapes = attention_shapes(pruned)
    assert shapes and all(s[1] == 4 and s[-1] == HEAD_DIM // 2 for s in shapes.values())
    with torch.no_grad():
        out = graphopt.primary_output(graphopt.run_model(pruned.gm, ir.example_inputs))
    assert out.shape == (1, TOKENS[1], 500)


def test_tied_embeddings_stay_tied():
    """GPT-2's head is its token embedding: both lose the same hidden channels and remain
    one tensor; its Conv1D layers were raised to nn.Linear at capture."""
    model, ir = capture("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert isinstance(ir.gm.get_submodule("transformer.h.0.attn.c_attn"), nn.Linear)
    assert "addmm" not in ir.gm.code
    gm = graphopt.optimize(ir, "prune(ratio=0.5)").ir.gm
    head, wte = gm.get_submodule("lm_head"), gm.get_submodule("transformer.wte")
    assert head.weight is wte.weight and head.weight.shape == (500, 32)
    assert model.lm_head.weight.shape == (500, 64)  # the input model is untouched


@pytest.mark.parametrize(
    ("family", "pipeline"), [("bert", "prune(ratio=0.5),quant"), ("llama", "prune(ratio=0.5)")]
)
def test_pruned_token_model_runs_in_onnxruntime(family, pipeline, tmp_path):
    """The pruned (and int8) model as .onnx, run by onnxruntime with int64 token ids and a
    padded attention mask, computes what the in-memory model computes."""
    _, ir = capture(family)
    out = tmp_path / f"{family}.onnx"
    result = graphopt.optimize(ir, pipeline, output=out)
    ids, mask = ir.example_inputs
    mask = mask.clone()
    mask[:, -4:] = 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.type for i in session.get_inputs()] == ["tensor(int64)"] * 2
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = graphopt.primary_output(graphopt.run_model(result.ir.gm, (ids, mask)))
    assert got.shape == tuple(want.shape)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-3, atol=1e-3)


class _Written(nn.Module):
    """A Conv1D and an RMSNorm written out as GPT-2 and Llama write them, plus a mean over
    channels that is not a norm (its square is used twice)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.proj = Conv1D(12, 8)
        self.weight = nn.Parameter(torch.rand(12) + 0.5)

    def forward(self, x):
        h = self.proj(x).float()
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        square = x.pow(2)
        return self.weight * normed.to(h.dtype), square.mean(-1, keepdim=True) + square


def test_idioms_are_raised_exactly_at_capture():
    model = _Written().eval()
    x = torch.randn(2, 5, 8)
    ir = GraphIR.trace(model, (x,), capture="export")
    assert isinstance(ir.gm.get_submodule("proj"), nn.Linear)
    assert model.proj.weight.shape == (8, 12)  # the model's own Conv1D is left as it was
    norms = [n for n in ir.graph.nodes if n.target is F.rms_norm]
    assert len(norms) == 1 and norms[0].args[1] == [12]
    assert "rsqrt" not in ir.gm.code and "addmm" not in ir.gm.code
    with torch.no_grad():
        for got, want in zip(ir.gm(x), model(x), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
