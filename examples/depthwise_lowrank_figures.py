"""MACs, parameters and output error of ``depthwise`` and ``lowrank`` on torchvision models.

Runs each pipeline through graphopt's pass manager and prints one row per (model, pipeline)
from the compression ledger: MACs and parameters relative to the original, the relative
output error and top-1 agreement on seeded random probe inputs, and the pass's own time.

    python examples/depthwise_lowrank_figures.py                       # resnet18, vgg11_bn
    python examples/depthwise_lowrank_figures.py --models resnet18 --size 64

The models are randomly initialised (``weights=None``: no pretrained weights here), whose
singular values decay far more slowly than a trained network's, so the output errors are
an upper bound on what the same settings do to a trained model. The ``lowrank`` pass comes
from the plugin in ``plugins/graphopt-lowrank`` (installed, or on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

import graphopt

PIPELINES = (
    "depthwise(rank=1)",
    "depthwise(macs_ratio=0.5)",
    "lowrank(macs_ratio=0.5)",
    "lowrank(energy=0.9)",
)


def registry() -> graphopt.Registry:
    """graphopt's registry with the lowrank plugin, installed or importable from source."""
    reg = graphopt.load_registry()
    if "lowrank" not in reg.passes:
        import graphopt_lowrank

        reg = graphopt.load_registry(autoload=False, extra=[graphopt_lowrank])
    return reg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,vgg11_bn")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--pipelines", default=";".join(PIPELINES), help="';'-separated")
    args = parser.parse_args()
    reg = registry()
    print(f"input 2×3×{args.size}×{args.size}, torch {torch.__version__}, weights=None, eval")
    header = f"{'model':<10} {'pipeline':<27} {'MACs':>15} {'params':>15} {'rel err':>8} "
    print(header + f"{'top-1':>6} {'seconds':>8}")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        x = torch.randn(2, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
        ir = graphopt.trace(model, (x,))
        for pipeline in args.pipelines.split(";"):
            start = time.perf_counter()
            result = graphopt.PassManager(pipeline, registry=reg, reproducer=False).run(ir)
            seconds = time.perf_counter() - start
            base, last = result.ledger[0], result.ledger[-1]
            macs = f"{last.macs / 1e9:.3f}G ×{last.macs / base.macs:.3f}"
            params = f"{last.params / 1e6:.2f}M ×{last.params / base.params:.3f}"
            top1 = f"{last.top1:.0%}" if last.top1 is not None else "-"
            print(
                f"{name:<10} {pipeline:<27} {macs:>15} {params:>15} {last.rel_err:>8.3f} "
                f"{top1:>6} {seconds:>8.1f}"
            )
        print(
            f"{name:<10} {'(original)':<27} {base.macs / 1e9:>14.3f}G {base.params / 1e6:>14.2f}M"
        )


if __name__ == "__main__":
    main()
