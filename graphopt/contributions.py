"""What plugins contributed, kind by kind, and who answers for each piece.

Every kind of contribution (passes, analyses, exporters, pruning criteria, distillation
losses, commands) is held in a :class:`Contributions` table: a dict by name that also knows
which plugin gave each entry and which plugins failed to give theirs. Looking up a name
that is not there raises one sentence listing what there is and, when a plugin failed to
register that kind, naming the plugin, its distribution and ``-p no:NAME``.

A plugin's code that raises is the plugin's fault, not graphopt's: :func:`blamed` wraps a
function a plugin contributed so that an exception from it becomes a
:class:`~graphopt.errors.PluginError` that says so.

>>> table = Contributions("pass", "passes")
>>> table.add("cleanup", object, PluginRef("graphopt.passes", builtin=True))
>>> table["prune"]
Traceback (most recent call last):
...
graphopt.contributions.UnknownName: unknown pass 'prune'; the registered passes are: cleanup
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import GraphoptError, PluginError, first_line

__all__ = [
    "Contributions",
    "PluginFault",
    "PluginRef",
    "UnknownName",
    "blamed",
    "plugin_failure",
]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class PluginRef:
    """Who a contribution comes from: the plugin's name (what ``-p no:NAME`` takes) and the
    installed distribution that provides it."""

    name: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False

    def advice(self) -> str:
        """Whose fault it is and what the user can do, as the end of a sentence."""
        dist = (
            f" (distribution {self.distribution} {self.version or ''})".replace(" )", ")")
            if self.distribution
            else ""
        )
        if self.builtin:
            return "this is a graphopt bug; rerun with GRAPHOPT_DEBUG=1 and report it"
        return (
            f"the fault is in the plugin{dist}, not in graphopt: fix or update it, or "
            f"disable it with -p no:{self.name}"
        )


@dataclass(frozen=True)
class PluginFault:
    """A plugin that failed: to import (``hook`` is ``"import"``) or in one of its hooks."""

    plugin: PluginRef
    hook: str
    error: str  # "ExceptionType: first line of its message"
    what: str = ""  # what is left out because of it, e.g. "its passes"

    def sentence(self) -> str:
        """The one-line report: ``graphopt plugin 'x' failed … ; the fault is …``."""
        doing = "to import" if self.hook == "import" else f"in {self.hook}"
        lost = self.what or "it"
        return (
            f"graphopt plugin '{self.plugin.name}' failed {doing} ({self.error}), so {lost} "
            f"{'is' if lost == 'it' else 'are'} left out; {self.plugin.advice()}"
        )


class UnknownName(GraphoptError, KeyError):
    """A name no plugin contributed (a ``KeyError`` too, for code that expects one)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Contributions(dict[str, T], Generic[T]):
    """One kind of contribution by name, with the plugin behind each and the plugins that
    failed to contribute this kind."""

    def __init__(self, kind: str, plural: str, *, listing: str = "") -> None:
        super().__init__()
        self.kind = kind
        self.plural = plural
        self.listing = listing  # where the user sees them all, e.g. "graphopt passes"
        self.owners: dict[str, PluginRef] = {}
        self.faults: list[PluginFault] = []

    def add(self, name: str, value: T, owner: PluginRef) -> None:
        """Add ``value`` as ``name``; a name two plugins give is an error naming both."""
        if name in self:
            first = self.owners[name].name
            raise GraphoptError(
                f"{self.kind} '{name}' is registered by both plugin '{first}' and plugin "
                f"'{owner.name}'; disable one of them with -p no:NAME"
            )
        self[name] = value
        self.owners[name] = owner

    def owner(self, name: str) -> PluginRef | None:
        """The plugin that contributed ``name`` (None for entries added by hand)."""
        return self.owners.get(name)

    def fault_note(self) -> str:
        """``""``, or a clause naming the plugins that failed to register this kind."""
        if not self.faults:
            return ""
        parts = [
            f"plugin '{f.plugin.name}' failed to register its {self.plural} ({f.error}), "
            f"which may be why: {f.plugin.advice()}"
            for f in self.faults
        ]
        return "; " + "; ".join(parts)

    def unknown(self, name: str) -> str:
        """The sentence for a name that is not in the table."""
        known = ", ".join(sorted(self)) or "none"
        see = f" (see '{self.listing}')" if self.listing else ""
        return (
            f"unknown {self.kind} '{name}'; the registered {self.plural} are: {known}{see}"
            f"{self.fault_note()}"
        )

    def __missing__(self, name: str) -> T:
        raise UnknownName(self.unknown(name))


def blamed(fn: F, plugin: PluginRef, what: str) -> F:
    """``fn``, raising a :class:`PluginError` naming ``plugin`` when it raises anything but
    a :class:`GraphoptError` (a plugin's own one-sentence refusal of bad input passes
    through). ``what`` names the contribution, e.g. ``"prune criterion 'l4'"``. Built-in
    plugins' functions are returned as they are."""
    if plugin.builtin:
        return fn

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GraphoptError:
            raise
        except Exception as exc:
            raise PluginError(plugin.name, plugin_failure(plugin, what, exc)) from exc

    return call  # type: ignore[return-value]


def plugin_failure(plugin: PluginRef, what: str, exc: BaseException) -> str:
    """The sentence for a plugin's ``what`` that raised ``exc``."""
    return (
        f"{what} of plugin '{plugin.name}' failed with {type(exc).__name__}: "
        f"{first_line(exc)}; {plugin.advice()}"
    )
