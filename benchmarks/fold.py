"""graphopt's ``fold`` against ``torch.fx.experimental.optimization.fuse``, in one run.

For each torchvision model (weights=None, eval mode, BatchNorm statistics randomised so
folding is not an identity) both tools get the same traced GraphModule. The table shows
how many BatchNorm layers each removed, the relative output error against the unfolded
model, the time the rewrite took, and eager CPU latency (batch 1, the model's default input
size; median of interleaved runs) as a ratio to the unfolded model: below 1 is faster.

    .venv/bin/python benchmarks/fold.py [--models resnet18,vgg11_bn] [--runs 15]

A ``timm:NAME`` model (``pretrained=False``, at ``--timm-size``) is traced with timm's
dynamic 'same'-padding layers kept opaque, as they branch on the input size:

    .venv/bin/python benchmarks/fold.py --models densenet121,timm:pnasnet5large,timm:nasnetalarge
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

import graphopt

MODELS = (
    "resnet18,resnet50,mobilenet_v2,mobilenet_v3_large,efficientnet_b0,densenet121,"
    "regnet_y_400mf,shufflenet_v2_x1_0,convnext_tiny,googlenet,inception_v3,vgg11_bn"
)
BN = nn.modules.batchnorm._BatchNorm
#: timm layers whose forward branches on the input's size (dynamic 'same' padding)
TIMM_LEAVES = ["Conv2dSame", "MaxPool2dSame", "AvgPool2dSame"]


def load(name: str, timm_size: int) -> graphopt.GraphIR:
    """A torchvision name (at its default input size) or ``timm:NAME``, traced."""
    if not name.startswith("timm:"):
        return graphopt.load(f"torchvision:{name}")
    import timm

    model = timm.create_model(name.removeprefix("timm:"), pretrained=False).eval()
    x = torch.randn(1, 3, timm_size, timm_size)
    return graphopt.GraphIR.trace(model, (x,), leaf_modules=TIMM_LEAVES)


def perturb_batchnorm(model: nn.Module, seed: int) -> None:
    """Replace the default identity-like BatchNorm statistics with random ones."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BN):
                m.running_mean.normal_(0.0, 0.2, generator=gen)
                m.running_var.uniform_(0.3, 2.0, generator=gen)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5, generator=gen)
                    m.bias.normal_(0.0, 0.2, generator=gen)


def count_bn(gm: torch.fx.GraphModule) -> int:
    return sum(
        1
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), BN)
    )


def latencies(models: dict[str, nn.Module], x: torch.Tensor, runs: int) -> dict[str, float]:
    """Median seconds per forward for each model, runs interleaved so drift hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():  # warm-up
            m(x)
            m(x)
        for _ in range(runs):
            for key, m in models.items():
                start = time.perf_counter()
                m(x)
                times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(name: str, runs: int, timm_size: int = 224) -> dict[str, Any]:
    ir = load(name, timm_size)
    perturb_batchnorm(ir.gm, seed=len(name))
    x = ir.example_inputs[0]
    with torch.no_grad():
        ref = ir.gm(x)

    result = graphopt.PassManager("fold", reproducer=False).run(ir)
    ours = result.ir.gm
    ours_seconds = result.ledger[-1].seconds  # the pass and the recompile after it

    theirs_input = copy.deepcopy(ir.gm)  # the same traced graph; fuse rewrites it in place
    theirs, theirs_seconds = timed(lambda: fuse(theirs_input, inplace=True, no_trace=True))

    with torch.no_grad():
        err_ours = graphopt.deviation(ours(x), ref).rel_err
        err_theirs = graphopt.deviation(theirs(x), ref).rel_err
    lat = latencies({"base": ir.gm, "ours": ours, "theirs": theirs}, x, runs)
    before = count_bn(ir.gm)
    return {
        "model": name,
        "BN": before,
        "graphopt folds": before - count_bn(ours),
        "fx folds": before - count_bn(theirs),
        "graphopt err": err_ours,
        "fx err": err_theirs,
        "graphopt ms": 1000 * ours_seconds,
        "fx ms": 1000 * theirs_seconds,
        "base latency ms": 1000 * lat["base"],
        "graphopt latency": lat["ours"] / lat["base"],
        "fx latency": lat["theirs"] / lat["base"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=MODELS, help="comma-separated torchvision names")
    parser.add_argument("--runs", type=int, default=15, help="timed forwards per model")
    parser.add_argument("--timm-size", type=int, default=224, help="input side of timm models")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in args.models.split(","):
        rows.append(measure(name, args.runs, args.timm_size))
        print_table(rows[-1:], header=len(rows) == 1)
    geo = {
        key: math.exp(statistics.fmean(math.log(r[key]) for r in rows))
        for key in ("graphopt latency", "fx latency")
    }
    ratio = sum(r["graphopt ms"] for r in rows) / sum(r["fx ms"] for r in rows)
    print(
        f"\ngeometric mean latency vs unfolded: graphopt {geo['graphopt latency']:.3f}, "
        f"fx fuse {geo['fx latency']:.3f}; graphopt/fx latency "
        f"{geo['graphopt latency'] / geo['fx latency']:.3f}"
    )
    print(f"total rewrite time graphopt/fx: {ratio:.2f}")
    print(
        f"BN removed: graphopt {sum(r['graphopt folds'] for r in rows)}, "
        f"fx fuse {sum(r['fx folds'] for r in rows)} of {sum(r['BN'] for r in rows)}"
    )


# column: format spec (the width is the header's)
COLUMNS = {
    "model": "<",
    "BN": "d",
    "graphopt folds": "d",
    "fx folds": "d",
    "graphopt err": ".1e",
    "fx err": ".1e",
    "graphopt ms": ".1f",
    "fx ms": ".1f",
    "base latency ms": ".1f",
    "graphopt latency": ".3f",
    "fx latency": ".3f",
}
WIDTHS = {k: max(len(k), 22 if k == "model" else 0) for k in COLUMNS}


def print_table(rows: list[dict[str, Any]], header: bool) -> None:
    if header:
        print(" | ".join(k.ljust(WIDTHS[k]) if k == "model" else k for k in COLUMNS))
    for row in rows:
        cells = []
        for key, spec in COLUMNS.items():
            if key == "model":
                cells.append(row[key].ljust(WIDTHS[key]))
            else:
                cells.append(format(row[key], spec).rjust(WIDTHS[key]))
        print(" | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
