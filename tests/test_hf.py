"""Hugging Face transformers as a model source: the eight families load from ``hf:TYPE``
(small configurations, random weights) and from a ``save_pretrained`` folder, are captured
through torch.export, and the raised graph computes what the eager model computes, in
graphopt's vocabulary; token models lower to ONNX and a reloadable ``.pt``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import graphopt
import graphopt.lowering
from graphopt.ir import GraphIR
from graphopt.loading import example_inputs, load_model

pytestmark = pytest.mark.usefixtures("one_thread")

_LAYERS = "num_hidden_layers=2&hidden_size=64&num_attention_heads=4"
_TEXT = f"vocab_size=1000&{_LAYERS}"
#: each family's small configuration, as options of its hf:TYPE spec
FAMILIES = {
    "bert": f"{_TEXT}&intermediate_size=128",
    "roberta": f"{_TEXT}&intermediate_size=128",
    "distilbert": "vocab_size=1000&n_layers=2&dim=64&n_heads=4&hidden_dim=128",
    "gpt2": "vocab_size=1000&n_layer=2&n_embd=64&n_head=4",
    "llama": f"{_TEXT}&num_key_value_heads=2&intermediate_size=128",
    "qwen2": f"{_TEXT}&num_key_value_heads=2&intermediate_size=128",
    "vit": f"{_LAYERS}&intermediate_size=128&image_size=32&patch_size=8",
    "convnext": "hidden_sizes=[16,32,64,128]&depths=[1,1,1,1]&image_size=64",
}
TOKENS = (1, 16)
aten = torch.ops.aten
#: ATen layer ops that must have been raised to a module call or a torch function
LAYER_OPS = {
    aten.conv1d,
    aten.conv2d,
    aten.conv3d,
    aten.convolution,
    aten.linear,
    aten.layer_norm,
    aten.embedding,
    aten.batch_norm,
    aten.group_norm,
    aten.scaled_dot_product_attention,
}
LAYERS = (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm)


def spec_of(family: str) -> str:
    return f"hf:{family}?{FAMILIES[family]}"


def capture(spec: str) -> tuple[nn.Module, GraphIR, list[str]]:
    """The eager model and its capture (as graphopt.load does, keeping the model)."""
    loaded = load_model(spec)
    shapes = [TOKENS] if loaded.input_names and loaded.input_names[0] == "input_ids" else []
    inputs = example_inputs(loaded, shapes)
    assert loaded.module is not None and loaded.input_names is not None
    ir = GraphIR.trace(loaded.module, inputs, input_names=loaded.input_names, source=spec)
    return loaded.module, ir, loaded.input_names


def assert_runs_like(model: nn.Module, ir: GraphIR, names: list[str], inputs: tuple) -> None:
    with torch.no_grad():
        want = model(**dict(zip(names, inputs, strict=True)))
        got = ir.gm(*inputs)
    assert type(got) is type(want)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)


def assert_vocabulary(ir: GraphIR, model: nn.Module) -> None:
    """No ATen layer op is left, and every torch.nn layer of the model is called as itself."""
    left = [
        n.name
        for n in ir.graph.nodes
        if isinstance(n.target, torch._ops.OpOverload) and n.target.overloadpacket in LAYER_OPS
    ]
    assert not left, left
    called = {str(n.target) for n in ir.graph.nodes if n.op == "call_module"}
    layers = {name for name, m in model.named_modules() if type(m) in LAYERS}
    assert layers and layers <= called, layers - called
    for node in ir.nodes(op="call_module"):
        called, own = ir.module(node), model.get_submodule(str(node.target))
        if type(own).__name__ == "Conv1D":  # raised to the Linear it is (graphopt.idioms)
            assert type(called) is nn.Linear and called.bias is own.bias
            assert torch.equal(called.weight, own.weight.t())
        else:
            assert called is own


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_loads_from_its_type_and_folder_and_runs_like_eager_through_export(family, tmp_path):
    """hf:TYPE builds the family with random weights; save_pretrained and hf:DIR give the
    same model back, which export captures and whose raised graph computes what it does."""
    model = load_model(spec_of(family)).module
    assert model is not None
    model.save_pretrained(tmp_path / family)
    again, ir, names = capture(f"hf:{tmp_path / family}")
    assert type(again) is type(model) and ir.capture == "export"
    inputs = ir.example_inputs
    assert_runs_like(model, ir, names, inputs)  # the folder held the same weights
    if names[0] == "input_ids":
        assert names == ["input_ids", "attention_mask"]
        ids, mask = inputs
        assert ids.dtype == torch.int64 and int(ids.max()) < 1000 and bool((mask == 1).all())
        padded = mask.clone()
        padded[:, -5:] = 0  # the raised graph follows the mask, not the example's values
        assert_runs_like(model, ir, names, (ids, padded))
    assert_vocabulary(ir, again)
    result = graphopt.optimize(ir, "cleanup,fold")
    assert max(e.rel_err for e in result.ledger) < 1e-6
    assert not any("exact pass changed" in note for e in result.ledger for note in e.notes)


def test_top1_and_primary_output_of_a_model_output():
    """The ledger reads the logits out of a ModelOutput for its top-1 agreement."""
    _, ir, _ = capture(spec_of("bert"))
    result = graphopt.optimize(ir, "cleanup")
    assert result.ledger[0].top1 == 1.0 and result.ledger[-1].top1 == 1.0
    out = ir.gm(*ir.example_inputs)
    assert graphopt.primary_output(out) is out.logits


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_token_models_lower_to_onnx_and_a_reloadable_pt(family, tmp_path):
    one_layer = spec_of(family).replace("num_hidden_layers=2", "num_hidden_layers=1")
    model, ir, names = capture(one_layer)
    for suffix in (".onnx", ".pt"):
        out = tmp_path / f"{family}{suffix}"
        graphopt.optimize(ir, "cleanup", output=out)
        assert out.exists()
    # the capture leaves batch and sequence free, and so does the ONNX artifact: it runs at
    # a size neither the example (1, 16) nor the export saw, as the eager model does
    meta = graphopt.read_metadata(tmp_path / f"{family}.onnx")
    assert meta is not None and meta["dynamic_dims"]["0"] == {"0": "batch", "1": "sequence"}
    ids = torch.randint(0, 1000, (3, 21), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, 21, dtype=torch.int64)
    mask[1, 15:] = 0  # one padded row
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / f"{family}.onnx"))
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), (ids, mask), strict=True)}
    got = torch.from_numpy(session.run(None, feeds)[0])
    with torch.no_grad():
        want = model(**dict(zip(names, (ids, mask), strict=True)))
    torch.testing.assert_close(got, want.logits, rtol=1e-4, atol=1e-4)
    if family != "llama":
        return
    # in a fresh process the pickled graph rebuilds the model's own output type, at any size
    code = (
        "import sys, torch; m = torch.load(sys.argv[1], weights_only=False); "
        "out = m(torch.randint(0, 1000, (2, 9)), torch.ones(2, 9, dtype=torch.int64)); "
        "print(type(out).__name__, tuple(out.logits.shape))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / f"{family}.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[0] == "CausalLMOutputWithPast"
    assert run.stdout.split()[1:3] == ["(2,", "9,"]


def test_hf_spec_errors_are_one_sentence(tmp_path):
    cases = {
        "hf:bertt": "did you mean bert",
        "hf:google/vit-base-patch16-224": "never downloads",
        "hf:bert?num_hiden_layers=2": "did you mean num_hidden_layers",
        "hf:bert?architectures=BertForNothing": "does not have",
        f"hf:{tmp_path}": "has no config.json",
        f"hf:{tmp_path / 'missing'}": "does not exist",
    }
    for spec, fragment in cases.items():
        with pytest.raises(graphopt.GraphoptError, match=fragment) as info:
            load_model(spec)
        assert "\n" not in str(info.value)


def test_forcing_fx_on_a_transformers_model_points_to_export():
    with pytest.raises(graphopt.GraphoptError) as info:
        graphopt.load(spec_of("distilbert"), capture="fx")
    assert str(info.value).startswith("cannot trace the model with torch.fx: ")
    assert str(info.value).endswith("; try --capture export")


def test_task_head_comes_from_the_configuration(tmp_path):
    masked = load_model("hf:bert?architectures=BertForMaskedLM&" + FAMILIES["bert"]).module
    assert type(masked).__name__ == "BertForMaskedLM"
    masked.save_pretrained(tmp_path / "mlm")
    assert type(load_model(f"hf:{tmp_path / 'mlm'}").module).__name__ == "BertForMaskedLM"
    decoder = load_model(spec_of("gpt2")).module
    assert type(decoder).__name__ == "GPT2LMHeadModel" and not decoder.config.use_cache
