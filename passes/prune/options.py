"""The ``prune`` pass's options, declared once for the pipeline parser, help, docs and
ledger, and handed as one typed object to :func:`.step.prune_once`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import graphopt

__all__ = ["PruneOptions"]


@dataclass
class PruneOptions:
    """Options of ``prune``; see ``docs/passes/prune.md``."""

    ratio: float = graphopt.option(
        0.5,
        "fraction of each coupled group's channels to remove",
        ge=0,
        lt=1,
        what="a fraction",
    )
    target: float | None = graphopt.option(
        None,
        "fraction of the original MACs (or params, see metric) to keep; overrides ratio",
        gt=0,
        le=1,
        what="a fraction",
    )
    metric: Literal["macs", "params"] = graphopt.option("macs", "what target measures")
    criterion: str = graphopt.option(
        "l1", "importance: l1, l2, bn_scale, activation, apoz, taylor, random or a plugin's"
    )
    global_rank: bool = graphopt.option(
        False, "rank channels across all layers instead of removing ratio in each"
    )
    max_layer_ratio: float = graphopt.option(
        0.9, "most any one group may lose", gt=0, lt=1, what="a fraction"
    )
    round_to: int = graphopt.option(
        8, "keep channel counts multiples of this (8 suits CPU SIMD and GPU tensor cores)",
        ge=1,
    )  # fmt: skip
    steps: int = graphopt.option(1, "prune in this many steps, re-scoring in between", ge=1)
    ignore: list[str] = graphopt.option([], "node-name globs whose layers stay whole")
    heads: bool | None = graphopt.option(
        None,
        "remove whole attention heads (true) or the same positions of every head (false); "
        "by default whole heads where scaled dot-product attention batches its heads in a "
        "dimension of their own, positions in nn.MultiheadAttention",
    )
    seed: int = graphopt.option(0, "seed of the random criterion")
    blocks: int = graphopt.option(
        0,
        "first drop this many residual blocks (y = x + f(x) becomes y = x), those adding "
        "least to the residual stream; ratio=0 drops blocks only",
        ge=0,
    )
