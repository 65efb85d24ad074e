"""Quantize a small CNN trained on scikit-learn's digits to int8, check accuracy, deploy.

python examples/quant_digits.py [OUT_DIR]

Trains a two-conv network for a few seconds, calibrates int8 on 640 training images, and
writes the int8 model twice: ``digits_int8.pt`` (PyTorch's fbgemm int8 kernels, loadable
with only torch installed) and ``digits_int8.onnx`` (QDQ, run by onnxruntime's int8 kernels).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from graphopt.passes.quant import quant_report
from sklearn.datasets import load_digits
from torch import nn

import graphopt


class DigitsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) * 100


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "out"
    os.makedirs(out_dir, exist_ok=True)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]

    torch.manual_seed(0)
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(12):
        for i in range(0, len(train), 64):
            idx = train[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()

    # Calibration batches: any iterable of input tensors (a DataLoader works too).
    calib = [(x[train[i : i + 64]],) for i in range(0, 640, 64)]
    example = (x[test[:1]],)
    result = graphopt.optimize(
        model,
        "fold,quant",
        example_inputs=example,
        data=calib,
        output=os.path.join(out_dir, "digits_int8.pt"),
    )
    onnx_path = os.path.join(out_dir, "digits_int8.onnx")
    graphopt.optimize(
        model, "fold,quant(form=qdq)", example_inputs=example, data=calib, output=onnx_path
    )

    int8 = torch.load(os.path.join(out_dir, "digits_int8.pt"), weights_only=False)
    print(f"float accuracy {accuracy(model, x[test], y[test]):.1f} %")
    print(f"int8 accuracy  {accuracy(int8, x[test], y[test]):.1f} %  (fbgemm kernels, .pt)")

    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x[test].numpy()[:1]})[0]
    print(f"onnxruntime int8 predicts {int(logits.argmax())} for a {int(y[test[0]])}")

    report = quant_report(result.ir.gm)
    assert report is not None
    print("per-layer SQNR, worst first:")
    for row in report.sensitivity:
        print(f"  {row.node:10} {row.op:14} {row.sqnr_db:5.1f} dB")


if __name__ == "__main__":
    main()
