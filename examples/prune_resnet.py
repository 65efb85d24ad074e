"""Prune a torchvision ResNet-18 to a fraction of its MACs and see what changed.

    python examples/prune_resnet.py            # keep 50% of the MACs
    python examples/prune_resnet.py 0.3 l2     # keep 30%, rank channels by L2 norm

The pruned model is an ordinary ``nn.Module`` with smaller layers: fine-tune it (or run the
``distill`` pass) before using it, since pruning alone loses accuracy.
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from torch import nn

import graphopt


def conv_widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="?", type=float, default=0.5, help="MACs to keep")
    parser.add_argument("criterion", nargs="?", default="l1", help="channel ranking (l1, l2…)")
    options = parser.parse_args()
    target, criterion = options.target, options.criterion
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    result = graphopt.optimize(
        model, f"prune(target={target},criterion={criterion})", example_inputs=(x,)
    )
    print(f"pipeline: {result.pipeline}")
    print("ledger:")
    for entry in result.ledger:
        print(f"  {entry.step:8s} params {entry.params:>10,d}  MACs {entry.macs:>13,d}")
    for note in result.ledger[-1].notes:
        print(f"  note: {note}")
    before, after = conv_widths(model), conv_widths(result.ir.gm)
    print("conv output channels (first six):")
    for name in list(before)[:6]:
        print(f"  {name:22s} {before[name]:4d} → {after[name]:4d}")
    with torch.no_grad():
        print(f"output shape kept: {tuple(result.ir.gm(x).shape) == tuple(model(x).shape)}")


if __name__ == "__main__":
    main()
