"""graphopt's built-in passes, registered through the same hook a third-party plugin uses.

Each module (or package) in this folder that defines ``PASSES``, a tuple of
:class:`graphopt.Pass` subclasses, contributes them; adding a built-in pass means adding a
module, never editing a list here.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from graphopt import Pass, hookimpl

__all__ = ["builtin_passes"]


def builtin_passes() -> list[type[Pass]]:
    """Every pass class the modules of this package declare in ``PASSES``, by module name."""
    found: list[type[Pass]] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.extend(getattr(module, "PASSES", ()))
    return found


@hookimpl
def graphopt_register_passes(register: Any) -> None:
    for cls in builtin_passes():
        register(cls)
