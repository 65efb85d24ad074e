"""The built-in cleanup pass: exact, and it removes what it claims to."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt import GraphIR, PassManager


class Constants(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))
        self.scale = nn.Parameter(torch.rand(8))
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        weight = (self.w * self.scale.unsqueeze(1)).t().contiguous()  # parameters only
        y = F.dropout(x @ weight, 0.2, training=False)
        unused = torch.sigmoid(y)  # noqa: F841 - dead code the pass must drop
        return self.drop(y) + torch.arange(8.0)  # a constant with no inputs at all


def test_constants_folded_dropout_and_dead_code_removed():
    model = Constants().eval()
    x = torch.randn(4, 6)
    result = PassManager("cleanup").run(GraphIR.trace(model, (x,)))
    gm = result.ir.gm
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-6)
    ops = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert torch.sigmoid not in ops and F.dropout not in ops
    assert "t" not in ops and "unsqueeze" not in ops  # the parameter-only chain is gone
    assert not any(n.op == "call_module" for n in gm.graph.nodes)
    # the two source parameters are replaced by the one folded weight they produced
    assert [tuple(p.shape) for p in gm.parameters()] == [(6, 8)]
    assert result.ledger[-1].params == 48
    stats = result.ledger[-1].stats
    assert stats["dropout removed"] == 2
    assert stats["constant subgraphs folded"] >= 1
    assert stats["dead nodes removed"] >= 1


def test_random_ops_are_never_folded():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x + torch.rand_like(self.w)  # depends on a parameter only, yet random

    result = PassManager("cleanup").run(GraphIR.trace(Noisy(), (torch.zeros(3),)))
    assert any(n.target is torch.rand_like for n in result.ir.graph.nodes)


def test_training_mode_dropout_is_kept_with_a_note():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    result = PassManager("cleanup").run(GraphIR.trace(model, (torch.randn(2, 4),)))
    assert any(isinstance(m, nn.Dropout) for m in result.ir.gm.modules())
    assert any("training mode" in n for n in result.ledger[-1].notes)


def test_options_disable_parts():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Identity()).eval()
    result = PassManager("cleanup(dropout=false)").run(GraphIR.trace(model, (torch.randn(2, 4),)))
    kinds = {type(m) for m in result.ir.gm.modules()}
    assert nn.Dropout in kinds and nn.Identity not in kinds


@pytest.mark.parametrize("name", ["vit_b_16", "efficientnet_b0", "mobilenet_v3_small"])
def test_exact_on_torchvision_models_with_dropout(name):
    ir = graphopt.load(f"torchvision:{name}")
    result = PassManager("cleanup").run(ir)
    entry = result.ledger[-1]
    assert entry.rel_err <= 1e-6 and entry.top1 == 1.0
    assert entry.stats.get("dropout removed", 0) >= 1
    assert not any(isinstance(m, nn.Dropout) for m in result.ir.gm.modules())
    assert entry.params == result.ledger[0].params and entry.macs == result.ledger[0].macs
