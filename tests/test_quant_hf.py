"""``quant`` on Hugging Face models (small configurations, random weights): BERT, GPT-2 and
Llama quantize by default to dynamic int8 with every Linear in int8 (GPT-2's ``Conv1D``
included), the ``.pt`` and ``.onnx`` artifacts run and keep an output SQNR budget, weight-only
int8/int4 runs on a decoder, and the ledger keeps counting the MACs of quantized Linears."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch
from graphopt.passes.quant import quant_report, sqnr_db
from graphopt.passes.quant.expand import linear_modules
from torch import nn

import graphopt
from graphopt.loading import example_inputs, load_model

pytestmark = pytest.mark.usefixtures("one_thread")

_SMALL = "vocab_size=500&max_position_embeddings=32"
#: BERT gets 128 labels: the SQNR of 2 logits a sequence is one draw of the weight rounding
#: (on it, onnxruntime's coarser per-tensor weights came out 2.6 dB ahead of the bounded pairs)
SPECS = {
    "bert": f"hf:bert?num_hidden_layers=2&hidden_size=64&num_attention_heads=2&"
    f"intermediate_size=128&num_labels=128&{_SMALL}",
    "gpt2": "hf:gpt2?n_layer=2&n_embd=64&n_head=2&vocab_size=500&n_positions=32",
    "llama": "hf:llama?num_hidden_layers=2&hidden_size=64&intermediate_size=128&"
    f"num_attention_heads=4&num_key_value_heads=2&{_SMALL}",
}
#: output SQNR the int8 artifacts keep on held-out token sequences (the pass's own target is
#: 25 dB on the sequences it measures on; held-out ones land a few dB either side of it)
BUDGET_DB = 20.0


def _tokens(spec: str, seed: int, n: int = 4) -> list[tuple[torch.Tensor, ...]]:
    """``n`` random (input_ids, attention_mask) pairs shaped like the spec's default input."""
    loaded = load_model(spec)
    ids, *rest = example_inputs(loaded, [])
    vocab = int(loaded.module.config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, vocab, ids.shape, generator=gen), *(torch.ones_like(r) for r in rest))
        for _ in range(n)
    ]


def _logits(out: object) -> torch.Tensor:
    while not isinstance(out, torch.Tensor):
        out = out[0] if isinstance(out, tuple | list) else next(iter(out.values()))  # type: ignore[attr-defined]
    return out


def _sqnr(reference: nn.Module, run: object, batches: list[tuple[torch.Tensor, ...]]) -> float:
    with torch.no_grad():
        ref = torch.cat([_logits(reference(*b)) for b in batches])  # type: ignore[operator]
        got = torch.cat([_logits(run(*b)) for b in batches])  # type: ignore[operator]
    return sqnr_db(ref, got)


@pytest.fixture(scope="module")
def loaded() -> dict[str, graphopt.GraphIR]:
    return {name: graphopt.load(spec) for name, spec in SPECS.items()}


@pytest.mark.parametrize("family", sorted(SPECS))
def test_dynamic_int8_pt_runs_within_budget(family, loaded, tmp_path):
    ir = loaded[family]
    path = tmp_path / "m.pt"
    result = graphopt.optimize(ir, "quant", output=path)
    report = quant_report(result.ir.gm)
    assert report is not None and report.mode == "dynamic"
    linears = [n for n in ir.graph.nodes if n.op == "call_module" and "Linear" in str(ir.module(n))]
    floats = {c.node for c in report.kept_float}
    assert len(report.quantized) + len(floats) >= len(linears) > 0
    artifact = torch.load(path, weights_only=False)
    held_out = _tokens(SPECS[family], seed=5)
    assert _sqnr(ir.gm, artifact, held_out) >= BUDGET_DB
    # the ledger counts the int8 Linears' MACs as it counted the float ones
    assert result.ledger[-1].macs == result.ledger[0].macs > 0


def test_gpt2_conv1d_quantized(loaded):
    ir = loaded["gpt2"]
    result = graphopt.optimize(ir, "quant(min_sqnr=0)")
    gm = result.ir.gm
    assert not [n for n in gm.graph.nodes if n.target is torch.addmm]
    dynamic = [
        m for m in gm.modules() if type(m).__module__.endswith("quantized.dynamic.modules.linear")
    ]
    # per block: c_attn, attention c_proj, c_fc, MLP c_proj; and the LM head
    assert len(dynamic) == 2 * 4 + 1
    # the Conv1D layers reach quant as nn.Linear already: capture raised them (graphopt.idioms)
    linears = [m for m in ir.gm.modules() if type(m) is nn.Linear]
    assert len(linears) == 2 * 4 + 1
    assert not any(type(m).__name__ == "Conv1D" for m in ir.gm.modules())


def test_linear_modules_makes_conv1d_linear_exactly():
    module = load_model(SPECS["gpt2"]).module.eval()
    x = _tokens(SPECS["gpt2"], seed=1, n=1)[0][0]
    with torch.no_grad():
        before = module(x).logits
    paths = linear_modules(module)
    assert len(paths) == 2 * 4 and all(type(module.get_submodule(p)) is nn.Linear for p in paths)
    with torch.no_grad():
        torch.testing.assert_close(module(x).logits, before, rtol=1e-5, atol=1e-5)
    assert linear_modules(module) == []  # nothing Linear-like left


def _ort_runner(path: str, optimized: str | None = None) -> tuple[ort.InferenceSession, object]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if optimized:
        opts.optimized_model_filepath = optimized
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}
        return torch.from_numpy(session.run(None, feeds)[0])

    return session, run


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_dynamic_int8_onnx_runs_integer_kernels_in_onnxruntime(family, loaded, tmp_path):
    """Plain quant → .onnx on a token model: dynamic int8 as ONNX integer ops (no float
    MatMul left for a Linear), which onnxruntime fuses into DynamicQuantizeMatMul and runs
    on int64 token inputs within the budget, as accurate as onnxruntime's own
    quantize_dynamic on the same model's fp32 export."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ir = loaded[family]
    path, fp32, theirs = (str(tmp_path / f) for f in ("m.onnx", "fp32.onnx", "ort.onnx"))
    result = graphopt.optimize(ir, "quant(reduce_range=false)", output=path)
    assert any("picked form=onnx" in n for n in result.ledger[-1].notes)
    assert result.ledger[-1].macs == result.ledger[0].macs  # int8 Linears' MACs still count
    ops = [n.op_type for n in onnx.load(path).graph.node]
    n_linears = len(quant_report(result.ir.gm).quantized)  # type: ignore[union-attr]
    # one DynamicQuantizeLinear per distinct input (BERT's query, key and value share one)
    assert ops.count("MatMulInteger") == n_linears >= ops.count("DynamicQuantizeLinear") > 0
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    session, run = _ort_runner(path, str(tmp_path / "fused.onnx"))
    fused = [n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node]
    int8_kernels = fused.count("DynamicQuantizeMatMul") + fused.count("MatMulIntegerToFloat")
    assert int8_kernels == n_linears and "MatMulInteger" not in fused
    assert all(i.type == "tensor(int64)" for i in session.get_inputs())
    # 16 sequences: on 4, onnxruntime's own figure moved by 4 dB between two exports of one
    # model (static and free dims: 38.4 and 42.8 dB); on 16 both give 39.2
    held_out = _tokens(SPECS[family], seed=5, n=16)
    ours = _sqnr(ir.gm, run, held_out)
    assert ours >= BUDGET_DB
    graphopt.optimize(ir, "cleanup", output=fp32)
    quantize_dynamic(fp32, theirs, weight_type=QuantType.QInt8)
    # per-channel weights against onnxruntime's per-tensor ones; measured: BERT 38.4 vs
    # 36.0 dB, GPT-2 37.8 vs 35.8
    assert ours >= _sqnr(ir.gm, _ort_runner(theirs)[1], held_out)


def test_dynamic_onnx_default_bounds_weight_pairs(loaded, tmp_path):
    """reduce_range (the default) bounds each adjacent pair of ONNX weight codes along the
    input dim to 128 in magnitude, so uint8 × int8 pair sums cannot saturate int16 on CPUs
    without VNNI, yet keeps codes beyond 7 bits; the artifact keeps the budget."""
    ir = loaded["bert"]
    path = str(tmp_path / "m.onnx")
    result = graphopt.optimize(ir, "quant", output=path)
    model = onnx.load(path)
    consumers = {i for n in model.graph.node if n.op_type == "MatMulInteger" for i in n.input}
    weights = [
        onnx.numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.name in consumers and len(t.dims) == 2
    ]
    assert len(weights) == len(quant_report(result.ir.gm).quantized) > 0  # type: ignore[union-attr]
    assert all(w.dtype == "int8" for w in weights)
    codes = [abs(w.astype(int)) for w in weights]  # K × N: pairs run down the rows
    assert all((c[0:-1:2] + c[1::2]).max() <= 128 for c in codes)  # K even here
    assert max(c.max() for c in codes) > 100  # not 7-bit weights
    assert _sqnr(ir.gm, _ort_runner(path)[1], _tokens(SPECS["bert"], seed=5)) >= BUDGET_DB


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_dynamic_onnx_default_at_least_as_accurate_as_onnxruntime_default(family, loaded, tmp_path):
    """The default .onnx (bounded weight pairs, safe on CPUs without VNNI) against
    onnxruntime's default quantize_dynamic (8-bit per-tensor weights) on the same fp32
    export."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ir = loaded[family]
    ours, fp32, theirs = (str(tmp_path / f) for f in ("m.onnx", "fp32.onnx", "ort.onnx"))
    graphopt.optimize(ir, "quant(min_sqnr=0)", output=ours)
    graphopt.optimize(ir, "cleanup", output=fp32)
    quantize_dynamic(fp32, theirs, weight_type=QuantType.QInt8)
    held_out = _tokens(SPECS[family], seed=5, n=16)
    mine, other = (_sqnr(ir.gm, _ort_runner(p)[1], held_out) for p in (ours, theirs))
    assert mine >= other  # measured: BERT 36.4 vs 36.0, GPT-2 36.5 vs 35.8, Llama 35.3 vs 33.8


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_llama(bits, loaded, tmp_path):
    ir = loaded["llama"]
    path = tmp_path / "m.pt"
    result = graphopt.optimize(
        ir, f"quant(mode=weight_only,bits={bits},group_size=32,min_sqnr=0)", output=path
    )
    kernel = "_weight_int4pack_mm_for_cpu" if bits == 4 else "_weight_int8pack_mm"
    assert any(kernel in str(n.target) for n in result.ir.graph.nodes)
    artifact = torch.load(path, weights_only=False)
    budget = BUDGET_DB if bits == 8 else 12.0  # int4 random weights: 4 bits, ~24 dB a layer
    assert _sqnr(ir.gm, artifact, _tokens(SPECS["llama"], seed=5)) >= budget
    assert result.ledger[-1].macs == result.ledger[0].macs


def test_8bit_dynamic_activations_more_accurate(loaded):
    ir = loaded["bert"]
    held_out = _tokens(SPECS["bert"], seed=5)
    seven = graphopt.optimize(ir, "quant(min_sqnr=0)").ir.gm
    eight = graphopt.optimize(ir, "quant(min_sqnr=0,reduce_range=false)")
    calls = [n for n in eight.ir.graph.nodes if "linear_dynamic" in str(n.target)]
    assert calls and all(n.args[2] is False for n in calls)
    assert _sqnr(ir.gm, eight.ir.gm, held_out) > _sqnr(ir.gm, seven, held_out) + 2
    recomputed = eight.ir.copy()
    recomputed.invalidate()
    assert recomputed.total_macs() == eight.ledger[0].macs
