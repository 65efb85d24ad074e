"""graphopt's built-in analyses, ``shapes`` and ``costs``, contributed through the same hook
as a plugin's (see :mod:`graphopt.shapes` for how they are computed)."""

from __future__ import annotations

from typing import Any

from .hookspecs import hookimpl
from .ir import BUILTIN_ANALYSES
from .shapes import FUSED_FLOPS, MACS, NodeCost, packed_weights, propagate_shapes, run_counting

__all__ = [
    "FUSED_FLOPS",
    "MACS",
    "NodeCost",
    "graphopt_register_analyses",
    "packed_weights",
    "propagate_shapes",
    "run_counting",
]


@hookimpl
def graphopt_register_analyses(register: Any) -> None:
    for name, function in BUILTIN_ANALYSES.items():
        register(name, function)
