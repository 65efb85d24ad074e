"""BatchNorm recalibration: re-estimate running statistics of a compressed model, no training.

After pruning or weight rewriting, the running mean and variance a BatchNorm stored belong
to the old network; re-estimating them on a few hundred samples often recovers much of the
accuracy for the cost of a few forward passes. Every BatchNorm's statistics are reset and
recomputed as the plain average over the given batches (``momentum=None``); all other
layers run in eval mode, nothing is trained.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch.nn.modules.batchnorm import _BatchNorm

from graphopt import input_names, split_batch

__all__ = ["recalibrate_bn"]


@torch.no_grad()
def recalibrate_bn(gm: fx.GraphModule, batches: Iterable[Any], max_batches: int) -> int:
    """Recompute the running statistics of every BatchNorm in ``gm`` from up to
    ``max_batches`` batches; returns how many batches were used. Training flags and
    momenta are restored afterwards."""
    bns = [m for m in gm.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    names = input_names(gm)
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    modes = [(m, m.training) for m in gm.modules()]
    momenta = [bn.momentum for bn in bns]
    try:
        gm.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: every batch weighs the same
            bn.train()
        used = 0
        for batch in batches:
            if used >= max_batches:
                break
            inputs, _ = split_batch(batch, names)
            gm(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs))
            used += 1
        return used
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        for m, mode in modes:
            m.training = mode
