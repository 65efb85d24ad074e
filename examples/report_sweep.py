"""Accuracy against MACs across pruning ratios, per-layer sensitivity, and channels per layer,
as PNG charts, for a small CNN trained on scikit-learn's handwritten digits.

    python examples/report_sweep.py [OUT_DIR] [--quick]

Needs matplotlib (``pip install 'graphopt[plot]'``) and scikit-learn. Takes about a minute
on two CPU cores (``--quick``: fewer epochs and ratios, for the test suite).
"""

from __future__ import annotations

import argparse
import os

import torch
from sklearn.datasets import load_digits
from torch import nn

import graphopt
from graphopt.plots import plot_channels, plot_sensitivity, plot_tradeoff
from graphopt.profiling import torch_threads


def build() -> nn.Module:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


@torch.no_grad()
def masked(
    model: nn.Module, conv: nn.Conv2d, norm: nn.BatchNorm2d, x: torch.Tensor, y: torch.Tensor
) -> float:
    """Accuracy with the 75% of ``conv``'s channels of smallest L1 norm silenced (their
    BatchNorm scale and shift set to zero, so the next layer sees exactly what it would if
    they were pruned), all other layers untouched; the model is restored afterwards."""
    scores = conv.weight.abs().sum(dim=(1, 2, 3))
    drop = scores.argsort()[: int(0.75 * len(scores))]
    saved = norm.weight.clone(), norm.bias.clone()
    norm.weight[drop], norm.bias[drop] = 0.0, 0.0
    try:
        return accuracy(model, x, y)
    finally:
        norm.weight.copy_(saved[0])
        norm.bias.copy_(saved[1])


def main(out: str, quick: bool) -> None:
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(labels)
    x_train, y_train, x_test, y_test = x[:1300], y[:1300], x[1300:], y[1300:]
    epochs, tune = (4, 1) if quick else (12, 3)
    model = train(build(), x_train, y_train, epochs)
    ir = graphopt.trace(model, (x_test[:1],))
    base_acc, base_macs = accuracy(model, x_test, y_test), ir.total_macs()
    print(f"trained: test accuracy {base_acc:.3f}, {base_macs:,} MACs per image")

    points = [(float(base_macs), base_acc, "original")]
    ratios = (0.5, 0.75) if quick else (0.25, 0.5, 0.75, 0.875)
    half = None
    for ratio in ratios:
        result = graphopt.optimize(ir, f"prune(ratio={ratio}),fold")
        pruned = train(result.ir.gm, x_train, y_train, tune)  # a short fine-tune
        acc = accuracy(pruned, x_test, y_test)
        points.append((float(result.ir.total_macs()), acc, f"ratio {ratio}"))
        print(f"prune(ratio={ratio}): {result.ir.total_macs():,} MACs, accuracy {acc:.3f}")
        if ratio == 0.5:
            half = result.ir
    plot_tradeoff(
        points,
        os.path.join(out, "accuracy_vs_macs.png"),
        xlabel="MACs per image",
        ylabel="test accuracy",
        title=f"digits CNN: pruning ratio sweep, {tune} fine-tuning epoch(s) each",
    )
    if half is not None:
        plot_channels(ir, half, os.path.join(out, "channels.png"))

    drops = []
    for conv, norm in [(model[i], model[i + 1]) for i in (0, 3, 7)]:
        drops.append(
            (
                f"conv {conv.in_channels}→{conv.out_channels}",
                base_acc - masked(model, conv, norm, x_test, y_test),
            )
        )
        print(f"{drops[-1][0]} alone loses 75% of its channels: accuracy drop {drops[-1][1]:+.3f}")
    plot_sensitivity(
        drops,
        os.path.join(out, "sensitivity.png"),
        title="accuracy drop when one conv alone loses 75% of its channels",
    )
    print(f"wrote accuracy_vs_macs.png, channels.png and sensitivity.png to {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="plots", help="where the PNGs go")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and ratios")
    options = parser.parse_args()
    with torch_threads(1):  # a tiny model: one thread is faster on a busy machine
        main(options.out_dir, options.quick)
