"""Prune a digits CNN to 40 % of its MACs, then recover its accuracy by distillation.

Trains a small CNN on scikit-learn's 8×8 digits (the teacher), prunes whole channels until
40 % of its multiply-accumulates are left, and distils the teacher into the pruned model
in the same pipeline. For comparison it also fine-tunes the pruned model on the labels
alone (``alpha=0, beta=0, gamma=1``), quantizes the pruned model to int8 with and without
quantization-aware training (distilled from the float teacher), and runs the gradual
schedule (``prune_targets=[0.7,0.4]``). Accuracies are on a held-out test split; the validation
split only drives early stopping.

    python examples/distill_digits.py [--epochs 15]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from graphopt.passes.distill import TrainVal
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import graphopt


class DigitsNet(nn.Module):
    """Three conv-bn-relu stages (the blocks distill pairs by default) and a linear head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def stage(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
            conv = nn.Conv2d(c_in, c_out, 3, padding=1, stride=stride, bias=False)
            return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU())

        w = width
        self.features = nn.Sequential(stage(1, w), stage(w, 2 * w, 2), stage(2 * w, 2 * w))
        self.head = nn.Linear(2 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def splits() -> tuple[DataLoader, list, list]:
    """1100 training images (shuffled batches of 50), 300 validation, 397 test."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    train = DataLoader(TensorDataset(x[:1100], y[:1100]), batch_size=50, shuffle=True)
    return train, [(x[1100:1400], y[1100:1400])], [(x[1400:], y[1400:])]


def accuracy(model: nn.Module, batches: list) -> float:
    model.eval()
    with torch.no_grad():
        return sum(int((model(x).argmax(1) == y).sum()) for x, y in batches) / sum(
            len(y) for _, y in batches
        )


def train_teacher(train: DataLoader, epochs: int = 10) -> nn.Module:
    model = DigitsNet(32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        model.train()
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        sched.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="distillation epochs")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the layers are tiny: more threads only add overhead
    torch.manual_seed(0)
    train, val, test = splits()
    teacher = train_teacher(train)
    x = (test[0][0][:1],)
    data = TrainVal(train, val)  # quant calibrates on it as plain training batches
    prune = "prune(target=0.4,round_to=1)"
    train_opts = f"epochs={args.epochs},lr=3e-3,patience=5,progress=false"
    labels_only = f"{train_opts},alpha=0,beta=0,gamma=1"
    runs = {
        "pruned, no training": prune,
        "pruned + fine-tuned on labels only": f"{prune},distill({labels_only})",
        "pruned + distilled": f"{prune},distill({train_opts})",
        "pruned, int8, no training": f"{prune},fold,quant",
        "pruned + distilled, QAT int8 distilled": (
            f"{prune},distill({train_opts}),fold,quant(form=qat),"
            "distill(epochs=3,patience=0,progress=false),quant"
        ),
        "gradual: 70 % → 40 %, distilled each time": (
            f'distill(prune_targets=[0.7,0.4],prune="{prune}",'
            f"epochs={max(args.epochs // 2, 1)},lr=3e-3,patience=0,progress=false)"
        ),
    }
    print(f"{'model':<45} {'MACs':>8} {'test accuracy':>14} {'seconds':>8}")
    print(f"{'teacher':<45} {'100.0%':>8} {accuracy(teacher, test):>14.2%} {'':>8}")
    for label, pipeline in runs.items():
        start = time.perf_counter()
        result = graphopt.optimize(teacher, pipeline, example_inputs=x, data=data)
        seconds = time.perf_counter() - start
        macs = result.ledger[-1].macs / result.ledger[0].macs
        acc = accuracy(result.ir.gm, test)
        print(f"{label:<45} {macs:>8.1%} {acc:>14.2%} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
