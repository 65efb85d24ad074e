"""How graphopt's core cost grows with graph size.

Builds generated networks of about 1k, 4k and 16k fx nodes (residual blocks of small convs,
BatchNorm, activations, dropout and a functional op, on tiny tensors so that compute does
not hide the framework's own cost), then times each stage: trace, shape propagation (fake
tensors), the ``cleanup`` pass through the pass manager (copies, probe runs, ledger), and
lowering to each format with its reload check. Target: 4x the nodes costs at most 4.5x the
time.

    python benchmarks/scale.py            # 1k, 4k, 16k nodes, lowering to .pt2
    python benchmarks/scale.py --format pt --sizes 1000,4000
    python benchmarks/scale.py --repeat 3 --sizes 1000,4000   # each stage's best of 3

On a shared machine a single run can be off by 20 %; ``--repeat`` keeps each stage's
fastest time.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

import graphopt
from graphopt import GraphIR, PassManager
from graphopt.lowering import lower
from graphopt.plugins import get_registry

NODES_PER_BLOCK = 7  # conv, bn, relu, dropout, conv, add, mul (see Block.forward)


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.bn = nn.BatchNorm2d(channels)
        self.drop = nn.Dropout(0.1)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.drop(F.relu(self.bn(self.conv1(x)))))
        return (x + y) * 0.5


def build(nodes: int, channels: int = 4) -> nn.Module:
    return nn.Sequential(*[Block(channels) for _ in range(max(1, nodes // NODES_PER_BLOCK))]).eval()


def measure(nodes: int, fmt: str, workdir: Path) -> dict[str, float]:
    times: dict[str, float] = {}
    model = build(nodes)
    x = (torch.randn(1, 4, 4, 4),)
    start = time.perf_counter()
    ir = GraphIR.trace(model, x)
    times["trace"] = time.perf_counter() - start
    start = time.perf_counter()
    ir.analysis("costs")
    times["shapes"] = time.perf_counter() - start
    start = time.perf_counter()
    result = PassManager("cleanup", reproducer=False).run(ir)
    times["cleanup"] = time.perf_counter() - start
    start = time.perf_counter()
    out = workdir / (f"m{nodes}.{fmt}" if fmt != "folder" else f"m{nodes}")
    lower(
        result.ir.gm,
        result.ir.example_inputs,
        str(out),
        result.metadata(),
        get_registry().exporters,
    )
    times["lower"] = time.perf_counter() - start
    times["total"] = sum(times.values())
    times["nodes"] = len(ir.graph.nodes)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,4000,16000")
    parser.add_argument("--format", default="pt2", choices=["pt2", "pt", "onnx", "folder"])
    parser.add_argument("--repeat", type=int, default=1, help="keep each stage's best of N")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    console = Console()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        measure(200, args.format, Path(tmp))  # warm-up: imports and first-call caches
        for n in sizes:
            runs = [measure(n, args.format, Path(tmp)) for _ in range(max(1, args.repeat))]
            best = {key: min(run[key] for run in runs) for key in runs[0]}
            best["total"] = sum(best[s] for s in ("trace", "shapes", "cleanup", "lower"))
            rows.append(best)
            console.print(f"{int(rows[-1]['nodes'])} nodes: {rows[-1]['total']:.2f}s")
    stages = ["trace", "shapes", "cleanup", "lower", "total"]
    table = Table(
        title=f"graphopt {graphopt.__version__} core cost vs graph size (-> .{args.format})"
    )
    table.add_column("nodes", justify="right")
    for stage in stages:
        table.add_column(f"{stage} s", justify="right")
    table.add_column("x time / x nodes", justify="right")
    for i, row in enumerate(rows):
        ratio = ""
        if i:
            growth = row["total"] / rows[i - 1]["total"]
            ratio = f"{growth:.2f} / {row['nodes'] / rows[i - 1]['nodes']:.2f}"
        table.add_row(str(int(row["nodes"])), *[f"{row[s]:.2f}" for s in stages], ratio)
    console.print(table)
    worst = (
        max(
            (b["total"] / a["total"]) / (b["nodes"] / a["nodes"]) * 4
            for a, b in itertools.pairwise(rows)
        )
        if len(rows) > 1
        else 0
    )
    verdict = "meets" if worst <= 4.5 else "MISSES"
    console.print(f"worst growth normalised to 4x nodes: {worst:.2f}x ({verdict} the 4.5x target)")


if __name__ == "__main__":
    main()
