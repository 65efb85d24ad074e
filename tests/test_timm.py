"""timm as a model source: ``timm:NAME`` on a seeded random sample of the zoo (models taking
at most 256 px) and on the failure classes found in it: ViTs whose ``forward`` has optional
arguments (fx now fixes them to their defaults) and models with Python control flow on
shapes (captured by torch.export). Every capture runs like the eager model."""

from __future__ import annotations

import random

import pytest
import torch

from graphopt.ir import GraphIR
from graphopt.loading import example_inputs, load_model

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

#: largest input side of the sampled population, and the largest model the sample takes
MAX_SIDE = 256
MAX_PARAMS = 10_000_000
SAMPLE_SEED = 13
SAMPLE_SIZE = 3


def population() -> list[str]:
    """Every timm model whose default input is at most MAX_SIDE pixels, in timm's order."""
    from timm.models import get_pretrained_cfg

    found = []
    for name in timm.list_models():
        cfg = get_pretrained_cfg(name)
        if cfg is not None and cfg.input_size and max(cfg.input_size[1:]) <= MAX_SIDE:
            found.append(name)
    return found


def seeded_sample() -> list[str]:
    """The first SAMPLE_SIZE models of a seeded shuffle of the population with at most
    MAX_PARAMS parameters (counted on the meta device, nothing allocated)."""
    order = population()
    random.Random(SAMPLE_SEED).shuffle(order)
    chosen = []
    for name in order:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        if sum(p.numel() for p in model.parameters()) <= MAX_PARAMS:
            chosen.append(name)
        if len(chosen) == SAMPLE_SIZE:
            return chosen
    return chosen


def capture_like_eager(spec: str, shape: tuple[int, ...] | None = None) -> GraphIR:
    """Load ``spec``, capture it as graphopt.load does (fx, then export), and check the
    graph runs like the eager model."""
    loaded = load_model(spec)
    inputs = example_inputs(loaded, [shape] if shape else [])
    assert loaded.module is not None
    ir = GraphIR.trace(loaded.module, inputs, source=spec)
    ir.analysis("shapes")
    with torch.no_grad():
        torch.testing.assert_close(ir.gm(*inputs), loaded.module(*inputs), rtol=1e-4, atol=1e-4)
    return ir


def test_sample_of_the_zoo_loads_captures_and_runs_like_eager():
    sample = seeded_sample()
    assert len(sample) == SAMPLE_SIZE
    for name in sample:
        loaded = load_model(f"timm:{name}")
        cfg = loaded.module.pretrained_cfg  # type: ignore[union-attr]
        assert loaded.input_shapes == [(1, *cfg["input_size"])]
        ir = capture_like_eager(f"timm:{name}")
        assert ir.capture in ("fx", "export")


@pytest.mark.parametrize(
    "spec",
    [
        "timm:vit_small_patch16_rope_224?depth=2",
        "timm:deit_small_distilled_patch16_224?depth=2",
        "timm:beit3_base_patch16_224?depth=2",
    ],
)
def test_optional_forward_arguments_are_not_inputs(spec):
    """forward(x, attn_mask=None, is_causal=False): one input, traced by fx."""
    ir = capture_like_eager(spec)
    assert ir.capture == "fx"
    assert [n.name for n in ir.graph.nodes if n.op == "placeholder"] == ["x"]


@pytest.mark.parametrize(
    ("spec", "shape"),
    [
        ("timm:vgg19?mlp_ratio=0.0625&num_classes=10", (1, 3, 64, 64)),
        ("timm:tf_mobilenetv3_small_100", (1, 3, 64, 64)),
        ("timm:mobilevitv2_050", (1, 3, 64, 64)),
    ],
)
def test_control_flow_on_shapes_falls_back_to_export(spec, shape):
    ir = capture_like_eager(spec, shape)
    assert ir.capture == "export"
    # the layers are the model's own modules, called as fx would call them
    convs = [n for n in ir.nodes(module_type=torch.nn.Conv2d)]
    assert convs and all(n.op == "call_module" for n in convs)


def test_maxvit_rmlp_runs_like_eager():
    assert capture_like_eager("timm:maxvit_rmlp_nano_rw_256").capture in ("fx", "export")


def test_unknown_timm_name_suggests_close_ones():
    with pytest.raises(Exception, match=r"timm has no model 'resnet_18'.*did you mean.*resnet18"):
        load_model("timm:resnet_18")
    with pytest.raises(Exception, match=r"building 'timm:resnet18\?colour=3' failed"):
        load_model("timm:resnet18?colour=3")
