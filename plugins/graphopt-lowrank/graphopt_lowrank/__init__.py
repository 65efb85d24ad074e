"""graphopt-lowrank: a graphopt plugin adding the ``lowrank`` pass.

graphopt loads this module through the entry point ``lowrank`` in the group ``graphopt``
(see ``pyproject.toml``) and calls the hook below, which registers the pass. Everything
the pass uses comes from graphopt's public API (``import graphopt``).
"""

from __future__ import annotations

from typing import Any

import graphopt

from .lowrank import LowRank, factor_matrix, factor_ratio, singular_energy

__version__ = "0.1.0"

__all__ = [
    "LowRank",
    "__version__",
    "factor_matrix",
    "factor_ratio",
    "graphopt_register_passes",
    "singular_energy",
]


@graphopt.hookimpl
def graphopt_register_passes(register: Any) -> None:
    """Contribute the ``lowrank`` pass."""
    register(LowRank)
