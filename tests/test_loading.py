"""Loading every MODEL form, with weights and inputs, and the default input shapes."""

from __future__ import annotations

import pytest
import torch
import torchvision

import graphopt
from graphopt.loading import default_input_shapes, load_data, load_model, parse_shape


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("resnet18", (1, 3, 224, 224)),
        ("inception_v3", (1, 3, 299, 299)),
        ("vit_b_16", (1, 3, 224, 224)),
        ("r3d_18", (1, 3, 16, 112, 112)),
    ],
)
def test_torchvision_default_shapes_come_from_weight_presets(name, shape):
    loaded = load_model(f"torchvision:{name}")
    assert loaded.input_shapes == [shape]
    assert not loaded.module.training


def test_first_layer_heuristic():
    assert default_input_shapes(torch.nn.Sequential(torch.nn.Conv1d(5, 2, 3))) == [(1, 5, 128)]
    assert default_input_shapes(torch.nn.Linear(7, 2)) == [(1, 7)]
    assert default_input_shapes(torch.nn.Embedding(10, 3)) is None


def test_weights_are_applied(tmp_path):
    source = torchvision.models.resnet18(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    for file in ("w.pt", "ckpt.pt"):
        loaded = load_model("torchvision:resnet18", weights=str(tmp_path / file))
        for (k, a), b in zip(
            source.state_dict().items(), loaded.module.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), k


def test_factory_from_a_python_file(tmp_path):
    (tmp_path / "net.py").write_text(
        "import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(3, 2))\n"
    )
    ir = graphopt.load(f"{tmp_path / 'net.py'}:build")
    assert ir.example_inputs[0].shape == (1, 3) and ir.total_params() == 8


def test_pt2_archive_brings_its_example_inputs(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(2, 3, 10, 10)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    ir = graphopt.load(str(tmp_path / "m.pt2"))
    assert ir.example_inputs[0].shape == (2, 3, 10, 10)
    torch.testing.assert_close(ir.gm(x), model(x))
    result = graphopt.optimize(ir, "cleanup", output=str(tmp_path / "again.pt2"))
    assert result.ledger[-1].rel_err == 0.0


def test_input_shapes_and_dtypes():
    assert parse_shape("1,3,224,224") == (1, 3, 224, 224) == parse_shape("1x3x224x224")
    ir = graphopt.load(
        "torchvision:resnet18", input_shapes=[(2, 3, 64, 64)], input_dtypes=["float32"]
    )
    assert ir.example_inputs[0].shape == (2, 3, 64, 64)
    with pytest.raises(graphopt.GraphoptError, match="unknown input dtype"):
        graphopt.load("torchvision:resnet18", input_shapes=[(1, 3, 8, 8)], input_dtypes=["f33"])


def test_multiple_inputs_and_count_mismatch():
    class Two(torch.nn.Module):
        def forward(self, a, b):
            return a + b.float()

    ir = graphopt.GraphIR.trace(Two(), (torch.randn(2, 3), torch.ones(2, 3, dtype=torch.int64)))
    assert ir.shape(next(iter(ir.graph.nodes))) == (2, 3)
    with pytest.raises(graphopt.GraphoptError, match="takes 2 input"):
        graphopt.GraphIR.trace(Two(), (torch.randn(2, 3),)).analysis("shapes")


def test_data_file(tmp_path):
    torch.save(torch.randn(5, 3, 8, 8), tmp_path / "calib.pt")
    batches = load_data(str(tmp_path / "calib.pt"))
    assert len(batches) == 5 and batches[0][0].shape == (1, 3, 8, 8)


def test_random_models_load_the_same_weights_every_time_without_touching_the_caller_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = load_model("torchvision:mobilenet_v3_small").module.state_dict()
    assert torch.equal(torch.rand(3), expected_next)  # the caller's stream is unchanged
    second = load_model("torchvision:mobilenet_v3_small").module.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    a = load_model("models_for_cli:small_cnn").module.state_dict()
    b = load_model("models_for_cli:small_cnn").module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_input_too_large_for_memory_is_refused_before_allocating(capsys):
    from conftest import run_main

    run = run_main(
        capsys,
        "inspect",
        "torchvision:resnet18",
        "--input-shape",
        "4096,3,4096,4096",
    )
    assert run.code == 2
    assert "needs 824.6 GB" in run.stderr and "give a smaller --input-shape" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr


def test_files_that_are_not_pytorch_models_say_what_graphopt_loads(tmp_path):
    noise = bytes(range(256)) * 8
    for name, fragment in [
        ("r.onnx", "is named as an ONNX model, which graphopt cannot read"),
        ("r.tflite", "TensorFlow Lite"),
        ("r.pt", "is not a PyTorch file (it is neither a zip archive"),
        ("r.bin", "is not a PyTorch file"),
        ("weights.safetensors", "holds weights only"),
    ]:
        (tmp_path / name).write_bytes(noise)
        with pytest.raises(graphopt.GraphoptError) as info:
            load_model(str(tmp_path / name))
        message = str(info.value)
        assert fragment in message and "holds a pickled" not in message, message
        if "weights only" not in message:
            assert "torchvision:NAME, timm:NAME, hf:TYPE" in message


def test_model_spec_carries_every_loading_option(tmp_path):
    from safetensors.torch import save_file

    source = torchvision.models.squeezenet1_1(num_classes=10)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    spec = graphopt.ModelSpec(
        "torchvision:squeezenet1_1?num_classes=10",
        weights=str(tmp_path / "w.safetensors"),
        input_shapes=[(2, 3, 32, 32)],
        capture="export",
    )
    ir = graphopt.load(spec)
    assert ir.capture == "export" and ir.example_inputs[0].shape == (2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ir.gm(*ir.example_inputs), source.eval()(*ir.example_inputs))
    same = graphopt.load(
        "torchvision:squeezenet1_1?num_classes=10",
        weights=str(tmp_path / "w.safetensors"),
        input_shapes=[(2, 3, 32, 32)],
        capture="fx",
    )
    assert same.capture == "fx"
    with torch.no_grad():
        torch.testing.assert_close(same.gm(*ir.example_inputs), ir.gm(*ir.example_inputs))


def test_zoo_options_after_the_question_mark():
    from graphopt.sources import split_options

    assert split_options("bert?num_hidden_layers=2&act=gelu&sizes=[1,2]&flag=true") == (
        "bert",
        {"num_hidden_layers": 2, "act": "gelu", "sizes": [1, 2], "flag": True},
    )
    with pytest.raises(graphopt.GraphoptError, match="is not KEY=VALUE"):
        split_options("resnet18?num_classes")
    loaded = load_model("torchvision:resnet18?num_classes=7")
    assert loaded.module.fc.out_features == 7
    with pytest.raises(graphopt.GraphoptError, match=r"did you mean resnet18"):
        load_model("torchvision:resnet_18")
