"""graphopt's built-in passes, registered through the same hook a third-party plugin uses."""

from __future__ import annotations

from typing import Any

from graphopt import hookimpl

from .cleanup import Cleanup

BUILTIN_PASSES = (Cleanup,)

__all__ = ["BUILTIN_PASSES", "Cleanup"]


@hookimpl
def graphopt_register_passes(register: Any) -> None:
    for cls in BUILTIN_PASSES:
        register(cls)
