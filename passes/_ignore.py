"""The ``ignore`` option several built-in passes share: glob patterns naming layers to leave
alone, and a clear error for a pattern that matched nothing (usually a typo)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from graphopt import GraphoptError

__all__ = ["IgnoreList"]


class IgnoreList:
    """Glob patterns over module paths or node names; remembers which ones matched."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self._matched = dict.fromkeys(patterns, False)

    def matches(self, *names: str) -> bool:
        """Whether any pattern matches any of ``names`` (each matching pattern is marked)."""
        hits = [p for p in self._matched if any(fnmatch.fnmatchcase(n, p) for n in names)]
        self._matched.update(dict.fromkeys(hits, True))
        return bool(hits)

    def check_all_used(self, pass_name: str, what: str) -> None:
        """Raise if a pattern matched nothing: it names no ``what`` of the model."""
        unused = [p for p, hit in self._matched.items() if not hit]
        if unused:
            raise GraphoptError(
                f"{pass_name} ignore pattern '{unused[0]}' matches no {what}; use a module path "
                "from 'graphopt inspect MODEL'"
            )
