"""The plugin host: a pluggy ``PluginManager`` filled with built-ins, then entry points.

Built-in passes, analyses and exporters are plugins loaded exactly like third-party ones,
only first. Two plugins that register the same name of one kind are an error naming both.
``-p no:NAME`` on the CLI (or ``disabled=`` here) skips a plugin;
``GRAPHOPT_DISABLE_PLUGIN_AUTOLOAD=1`` skips every entry point.

A third-party plugin's fault stays the plugin's: one that fails to import, or whose hook
raises, is reported in one line (a :class:`PluginWarning`) naming it, its distribution and
``-p no:NAME``, and is shown as failed by ``graphopt plugins``; a hook that raised
contributes nothing, and everything else keeps working. Asking for something a failed hook
would have contributed (a pass, an output format …) names the failure; an exception from a
contributed function later on is a :class:`~graphopt.errors.PluginError` naming the plugin.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .contributions import Contributions, PluginFault, PluginRef, blamed
from .errors import first_line
from .extensions import Criterion, Exporter, LossFn
from .ir import Analysis
from .pass_api import Pass
from .version import __version__

__all__ = [
    "BUILTIN_PLUGINS",
    "PluginInfo",
    "PluginWarning",
    "Registry",
    "get_registry",
    "load_registry",
    "registry_in_effect",
]

ENTRY_POINT_GROUP = "graphopt"
AUTOLOAD_ENV = "GRAPHOPT_DISABLE_PLUGIN_AUTOLOAD"
#: built-in plugin modules, registered before any entry point
BUILTIN_PLUGINS = ("graphopt.analyses", "graphopt.lowering", "graphopt.passes")


class PluginWarning(UserWarning):
    """A plugin failed to import or in one of its hooks; graphopt goes on without what it
    would have contributed. The message is one line naming the plugin."""


@dataclass
class PluginInfo:
    """A loaded (or failed) plugin and what it contributed."""

    name: str
    version: str
    builtin: bool
    distribution: str | None = None
    passes: list[str] = field(default_factory=list)
    exporters: list[str] = field(default_factory=list)
    analyses: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    criteria: list[str] = field(default_factory=list)
    losses: list[str] = field(default_factory=list)
    prune_rules: list[str] = field(default_factory=list)
    #: why it failed to import (None when it imported)
    error: str | None = None
    #: everything that failed: the import, or hooks that raised
    faults: list[PluginFault] = field(default_factory=list)

    @property
    def ref(self) -> PluginRef:
        return PluginRef(self.name, self.distribution, self.version, self.builtin)

    @property
    def status(self) -> str:
        """``loaded``, or what failed: ``failed to import: …``, ``failed in HOOK: …``."""
        if not self.faults:
            return "loaded"
        return "; ".join(
            f"failed {'to import' if f.hook == 'import' else 'in ' + f.hook}: {f.error}"
            for f in self.faults
        )


def _table(kind: str, plural: str, listing: str = "") -> Any:
    return field(default_factory=lambda: Contributions(kind, plural, listing=listing))


@dataclass
class Registry:
    """Everything the plugins contributed, kind by kind (each a
    :class:`~graphopt.contributions.Contributions` table that knows who gave what and which
    plugins failed to), and the plugins themselves."""

    pm: pluggy.PluginManager
    passes: Contributions[type[Pass]] = _table("pass", "passes", "graphopt passes")
    analyses: Contributions[Analysis] = _table("analysis", "analyses")
    exporters: Contributions[Exporter] = _table("output format", "output formats")
    criteria: Contributions[Criterion] = _table("pruning criterion", "pruning criteria")
    losses: Contributions[LossFn] = _table("distillation loss", "distillation losses")
    #: op rules for ``prune`` by the rule class's qualified name: ``(rule, replace)``
    prune_rules: Contributions[tuple[Any, bool]] = _table("prune op rule", "prune op rules")
    commands: Contributions[Any] = _table("command", "commands", "graphopt --help")
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    faults: list[PluginFault] = field(default_factory=list)
    _cli_app: Any = None

    @property
    def pass_owner(self) -> dict[str, str]:
        """The plugin name behind each pass."""
        return {name: ref.name for name, ref in self.passes.owners.items()}

    @property
    def distill_losses(self) -> Contributions[LossFn]:
        """The distillation losses plugins contributed (the same table as ``losses``)."""
        return self.losses

    def pass_class(self, name: str) -> type[Pass]:
        """The pass registered as ``name``; an unknown name is one sentence listing the
        registered passes (and any plugin that failed to register its passes)."""
        return self.passes[name]

    def fail(self, fault: PluginFault, table: Contributions[Any] | None = None) -> None:
        """Record a plugin's failure and report it in one line (a :class:`PluginWarning`)."""
        self.faults.append(fault)
        self.plugins[fault.plugin.name].faults.append(fault)
        if table is not None:
            table.faults.append(fault)
        warnings.warn(fault.sentence(), PluginWarning, stacklevel=3)

    def cli_app(self) -> Any:
        """A ``typer.Typer`` holding every plugin-contributed subcommand (built once). A
        plugin whose hook raises contributes none; a command that raises when run is a
        :class:`~graphopt.errors.PluginError` naming the plugin."""
        if self._cli_app is None:
            import typer

            app = typer.Typer()
            for impl in self.pm.hook.graphopt_register_commands.get_hookimpls():
                info = self.plugins[impl.plugin_name]
                own = typer.Typer()
                call = functools.partial(impl.function, app=own)
                if not _contained(self, info, "graphopt_register_commands", self.commands, call):
                    continue
                for command in own.registered_commands:
                    callback_name = getattr(command.callback, "__name__", "command")
                    name = command.name or callback_name.replace("_", "-")
                    if command.callback is not None:
                        command.callback = blamed(command.callback, info.ref, f"command '{name}'")
                    self.commands.add(name, command, info.ref)
                    info.commands.append(name)
                    app.registered_commands.append(command)
                app.registered_groups.extend(own.registered_groups)
            self._cli_app = app
        return self._cli_app

    @contextlib.contextmanager
    def in_effect(self) -> Iterator[Registry]:
        """Make this the registry :func:`registry_in_effect` returns inside the block (the
        pass manager does this while it runs a pipeline)."""
        token = _IN_EFFECT.set(self)
        try:
            yield self
        finally:
            _IN_EFFECT.reset(token)


def _contained(
    reg: Registry, info: PluginInfo, hook: str, table: Contributions[Any], call: Callable[[], Any]
) -> bool:
    """Run one plugin's hook; when a third-party plugin's hook raises, record the fault
    (the hook contributes nothing) and return False. A built-in's failure is a graphopt
    bug and propagates; so does a name two plugins register (a conflict to resolve)."""
    try:
        call()
    except Exception as exc:
        if info.builtin:
            raise
        what = f"its {table.plural}"
        reg.fail(PluginFault(info.ref, hook, f"{type(exc).__name__}: {first_line(exc)}", what),
                 table)  # fmt: skip
        return False
    return True


def _pass_entry(plugin: PluginRef, cls: Any) -> tuple[str, Any]:
    if not (isinstance(cls, type) and issubclass(cls, Pass) and cls.name):
        raise TypeError(f"registered {cls!r}, which is not a named graphopt.Pass subclass")
    return cls.name, cls


def _named_function(kind: str) -> Callable[[PluginRef, str, Any], tuple[str, Any]]:
    def entry(plugin: PluginRef, name: str, function: Any) -> tuple[str, Any]:
        if not (isinstance(name, str) and name and callable(function)):
            raise TypeError(f"register(name, function) was given {name!r}, {function!r}")
        return name, blamed(function, plugin, f"{kind} '{name}'")

    return entry


def _prune_rule_entry(
    plugin: PluginRef, rule: Any, replace: bool = False
) -> tuple[str, tuple[Any, bool]]:
    kind = type(rule)
    if not (hasattr(rule, "link") and hasattr(rule, "applies")):
        raise TypeError(f"registered {rule!r}, which is not a prune OpRule")
    return f"{kind.__module__}.{kind.__qualname__}", (rule, bool(replace))


def _exporter_entry(plugin: PluginRef, exporter: Any) -> tuple[str, Any]:
    if not isinstance(exporter, Exporter):
        raise TypeError(f"registered {exporter!r}, which is not a graphopt.Exporter")
    what = f"output format '{exporter.name}'"
    return exporter.name, replace(
        exporter,
        write=blamed(exporter.write, plugin, what),
        load=blamed(exporter.load, plugin, what),
        read_metadata=blamed(exporter.read_metadata, plugin, what),
    )


#: each registration hook: the registry table it fills, and how one ``register(...)`` call
#: becomes a ``(name, value)`` entry (functions a plugin gives are wrapped to blame it)
_HOOKS: dict[str, tuple[str, Callable[..., tuple[str, Any]]]] = {
    "graphopt_register_analyses": ("analyses", _named_function("analysis")),
    "graphopt_register_exporters": ("exporters", _exporter_entry),
    "graphopt_register_passes": ("passes", _pass_entry),
    "graphopt_register_prune_criteria": ("criteria", _named_function("pruning criterion")),
    "graphopt_register_distill_losses": ("losses", _named_function("distillation loss")),
    "graphopt_register_prune_rules": ("prune_rules", _prune_rule_entry),
}


def _stage(
    staged: list[tuple[str, Any]], plugin: PluginRef, entry: Any, *args: Any, **kwargs: Any
) -> None:
    """The ``register`` callback a hook receives: check the contribution and hold it until
    the hook has returned."""
    staged.append(entry(plugin, *args, **kwargs))


def _collect(reg: Registry) -> None:
    """Call every registration hook of every plugin, built-ins first (``get_hookimpls`` is
    in registration order); a hook's entries are added only once it has returned."""
    for hook, (attr, entry) in _HOOKS.items():
        table: Contributions[Any] = getattr(reg, attr)
        for impl in getattr(reg.pm.hook, hook).get_hookimpls():
            info = reg.plugins[impl.plugin_name]
            staged: list[tuple[str, Any]] = []
            register = functools.partial(_stage, staged, info.ref, entry)
            call = functools.partial(impl.function, register=register)
            if not _contained(reg, info, hook, table, call):
                continue
            for name, value in staged:
                table.add(name, value, info.ref)
                getattr(info, attr).append(name)


def _distribution(ep: metadata.EntryPoint) -> tuple[str | None, str]:
    dist = getattr(ep, "dist", None)
    return (dist.name, dist.version) if dist is not None else (None, "?")


def load_registry(
    disabled: Iterable[str] = (), *, autoload: bool | None = None, extra: Iterable[Any] = ()
) -> Registry:
    """Build a fresh registry: built-ins, then entry points, then ``extra`` plugin objects."""
    disabled = set(disabled)
    if autoload is None:
        autoload = os.environ.get(AUTOLOAD_ENV, "") in ("", "0")
    pm = pluggy.PluginManager("graphopt")
    pm.add_hookspecs(hookspecs)
    reg = Registry(pm)
    for modname in BUILTIN_PLUGINS:
        short = modname.rsplit(".", 1)[-1]
        if short in disabled or modname in disabled:
            continue
        pm.register(importlib.import_module(modname), name=modname)
        reg.plugins[modname] = PluginInfo(modname, __version__, True, "graphopt")
    if autoload:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in disabled or ep.name in reg.plugins:
                continue
            dist, version = _distribution(ep)
            info = PluginInfo(ep.name, version, False, dist)
            reg.plugins[ep.name] = info
            try:
                pm.register(ep.load(), name=ep.name)
            except Exception as exc:  # a broken plugin must not take graphopt down
                info.error = f"{type(exc).__name__}: {first_line(exc)}"
                reg.fail(PluginFault(info.ref, "import", info.error))
    for plugin in extra:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        if name in disabled:
            continue
        pm.register(plugin, name=name)
        reg.plugins[name] = PluginInfo(name, "?", builtin=False)
    _collect(reg)
    return reg


_cached: dict[frozenset[str], Registry] = {}
_IN_EFFECT: ContextVar[Registry | None] = ContextVar("graphopt_registry", default=None)


def get_registry(disabled: Iterable[str] = ()) -> Registry:
    """The process-wide registry for a set of disabled plugins (loaded once)."""
    key = frozenset(disabled) | {f"autoload={os.environ.get(AUTOLOAD_ENV, '')}"}
    if key not in _cached:
        _cached[key] = load_registry(disabled)
    return _cached[key]


def registry_in_effect() -> Registry:
    """The registry of the pipeline that is running (see :meth:`Registry.in_effect`), or
    the process-wide default one: where code deep inside a pass, without its
    :class:`~graphopt.PassContext`, looks plugins' contributions up so that ``-p no:NAME``
    applies."""
    return _IN_EFFECT.get() or get_registry()
