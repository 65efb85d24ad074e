"""The ``distill`` pass's options, declared once: they drive the pipeline parser, ``graphopt
passes``, the docs, and the training loop, which takes them typed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import graphopt

__all__ = ["DistillOptions"]


@dataclass
class DistillOptions:
    """The ``distill`` pass's options (``Distill.Options``), as the training loop reads them."""

    epochs: int = graphopt.option(10, "training epochs (per round)", ge=0)
    alpha: float = graphopt.option(0.9, "weight α of the soft-label KD loss", ge=0)
    beta: float = graphopt.option(
        0.5, "weight β of the feature loss (0 turns feature pairing off)", ge=0
    )
    gamma: float = graphopt.option(0.1, "weight γ of the hard-label cross-entropy", ge=0)
    temperature: float = graphopt.option(4.0, "softmax temperature T of the KD loss", gt=0)
    features: list[str] = graphopt.option(
        [], "teacher node-name globs to distil features at (default: every block's output)"
    )
    losses: list[str] = graphopt.option([], "plugin losses to add, as NAME or NAME:WEIGHT")
    optimizer: Literal["adamw", "sgd"] = graphopt.option("adamw", "optimizer")
    lr: float = graphopt.option(1e-3, "initial learning rate", gt=0)
    weight_decay: float = graphopt.option(1e-4, "weight decay", ge=0)
    schedule: Literal["cosine", "constant"] = graphopt.option(
        "cosine", "learning-rate schedule over the epochs"
    )
    patience: int = graphopt.option(
        3, "stop after this many epochs without a better validation metric (0: never)", ge=0
    )
    l1_bn: float = graphopt.option(0.0, "L1 penalty on BatchNorm scales (network slimming)", ge=0)
    freeze_bn: bool = graphopt.option(
        False, "keep BatchNorm statistics fixed while training (scales still learn)"
    )
    keep_zeros: bool = graphopt.option(
        True, "weights that are exactly zero (sparsify, magnitude pruning) stay zero"
    )
    prune_targets: list[float] = graphopt.option(
        [],
        "iterative schedule: prune to each fraction of the MACs in turn, distilling after each",
        gt=0,
        le=1,
        what="a fraction",
        check=lambda v: list(v) == sorted(v, reverse=True),
        check_msg="decreasing fractions in (0, 1]",
    )
    prune: str = graphopt.option(
        "prune", "the pruning step of a prune_targets schedule, e.g. prune(criterion=l2)"
    )
    checkpoint: str | None = graphopt.option(None, "folder for a checkpoint every epoch")
    resume: bool = graphopt.option(False, "continue from the checkpoint if there is one")
    device: str = graphopt.option("auto", "cpu, cuda, cuda:N, or auto (GPU when there is one)")
    seed: int = graphopt.option(0, "random seed of adapters and shuffling")
    progress: bool = graphopt.option(True, "show a progress bar on a terminal")
