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
