"""Quantize a small CNN trained on scikit-learn's digits to int8, with an accuracy target.

python examples/quant_digits.py [OUT_DIR]

Trains a two-conv network for a few seconds and writes it three ways:

* ``digits_int8.pt``: plain ``quant`` (calibrated on 640 training images, the default
  output-SQNR target), PyTorch's fbgemm int8 kernels, loadable with only torch installed;
* ``digits_int8.onnx``: the same pipeline to ONNX, where plain ``quant`` picks the QDQ
  form onnxruntime runs with its int8 kernels;
* ``digits_acc.pt``: ``quant(max_drop=0.5)`` on labelled batches: the fewest ops stay
  float so that accuracy on those batches falls by at most half a point.
"""

from __future__ import annotations

import argparse
import os

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


def digits_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (N×1×8×8 in [0, 1]), labels, and a seeded train/test split (1400/397)."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x, y, order[:1400], order[1400:]


def train(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> DigitsNet:
    """A DigitsNet trained for 12 epochs on ``idx`` (a few seconds on a CPU)."""
    torch.manual_seed(0)
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(12):
        for i in range(0, len(idx), 64):
            batch = idx[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="out", help="where the artifacts go")
    out_dir = parser.parse_args().out_dir
    os.makedirs(out_dir, exist_ok=True)
    x, y, train_idx, test_idx = digits_data()
    model = train(x, y, train_idx)

    # Calibration batches: any iterable of input tensors (a DataLoader works too).
    calib = [(x[train_idx[i : i + 64]],) for i in range(0, 640, 64)]
    example = (x[test_idx[:1]],)
    pt_path = os.path.join(out_dir, "digits_int8.pt")
    result = graphopt.optimize(
        model, "fold,quant", example_inputs=example, data=calib, output=pt_path
    )
    onnx_path = os.path.join(out_dir, "digits_int8.onnx")
    graphopt.optimize(model, "fold,quant", example_inputs=example, data=calib, output=onnx_path)

    # With (inputs, labels) batches, max_drop bounds the accuracy lost on them.
    labelled = [(x[train_idx[i : i + 64]], y[train_idx[i : i + 64]]) for i in range(0, 640, 64)]
    acc_path = os.path.join(out_dir, "digits_acc.pt")
    graphopt.optimize(
        model, "fold,quant(max_drop=0.5)", example_inputs=example, data=labelled, output=acc_path
    )

    test_x, test_y = x[test_idx], y[test_idx]
    print(f"float accuracy {accuracy(model, test_x, test_y):.1f} %")
    for path in (pt_path, acc_path):
        int8 = torch.load(path, weights_only=False)  # needs only torch
        print(f"int8 accuracy {accuracy(int8, test_x, test_y):.1f} % ({os.path.basename(path)})")

    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: test_x.numpy()[:1]})[0]
    print(f"onnxruntime int8 predicts {int(logits.argmax())} for a {int(test_y[0])}")

    report = quant_report(result.ir.gm)
    assert report is not None
    print(f"target: {report.target}; reached {report.sqnr_db:.1f} dB")
    print("per-layer SQNR, worst first:")
    for row in report.sensitivity:
        print(f"  {row.node:10} {row.op:14} {row.sqnr_db:5.1f} dB")


if __name__ == "__main__":
    main()
