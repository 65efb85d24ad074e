"""graphopt's built-in passes, registered through the same hook a third-party plugin uses."""

from __future__ import annotations

from typing import Any

from graphopt import hookimpl

from .cleanup import Cleanup
from .fold import Fold

BUILTIN_PASSES = (Cleanup, Fold)

__all__ = ["BUILTIN_PASSES", "Cleanup", "Fold"]


@hookimpl
def graphopt_register_passes(register: Any) -> None:
    for cls in BUILTIN_PASSES:
        register(cls)
