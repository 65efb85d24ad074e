"""The plugin host: a pluggy ``PluginManager`` filled with built-ins, then entry points.

Built-in passes, analyses and exporters are plugins loaded exactly like third-party ones,
only first. A plugin that fails to import is reported as a warning; two plugins that
register the same pass name are an error naming both. ``-p no:NAME`` on the CLI (or
``disabled=`` here) skips a plugin; ``GRAPHOPT_DISABLE_PLUGIN_AUTOLOAD=1`` skips every
entry point.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .errors import GraphoptError
from .pass_api import Pass

__all__ = ["BUILTIN_PLUGINS", "PluginInfo", "Registry", "get_registry", "load_registry"]

ENTRY_POINT_GROUP = "graphopt"
AUTOLOAD_ENV = "GRAPHOPT_DISABLE_PLUGIN_AUTOLOAD"
#: built-in plugin modules, registered before any entry point
BUILTIN_PLUGINS = ("graphopt.analyses", "graphopt.lowering", "graphopt.passes")


@dataclass
class PluginInfo:
    """A loaded (or failed) plugin and what it contributed."""

    name: str
    version: str
    builtin: bool
    passes: list[str] = field(default_factory=list)
    exporters: list[str] = field(default_factory=list)
    analyses: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Registry:
    """Everything the plugins contributed, with which plugin contributed it."""

    pm: pluggy.PluginManager
    passes: dict[str, type[Pass]] = field(default_factory=dict)
    pass_owner: dict[str, str] = field(default_factory=dict)
    analyses: dict[str, Any] = field(default_factory=dict)
    exporters: dict[str, Any] = field(default_factory=dict)
    distill_losses: dict[str, Any] = field(default_factory=dict)
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    _cli_app: Any = None

    def pass_class(self, name: str) -> type[Pass]:
        try:
            return self.passes[name]
        except KeyError:
            known = ", ".join(sorted(self.passes)) or "none"
            raise GraphoptError(
                f"unknown pass '{name}'; the registered passes are: {known} (see 'graphopt passes')"
            ) from None

    def cli_app(self) -> Any:
        """A ``typer.Typer`` holding every plugin-contributed subcommand (built once)."""
        if self._cli_app is None:
            import typer

            app = typer.Typer()
            for impl in self.pm.hook.graphopt_register_commands.get_hookimpls():
                before = len(app.registered_commands)
                impl.function(app=app)
                for command in app.registered_commands[before:]:
                    callback_name = getattr(command.callback, "__name__", "command")
                    name = command.name or callback_name.replace("_", "-")
                    self.plugins[impl.plugin_name].commands.append(name)
            self._cli_app = app
        return self._cli_app


def _register_pass(reg: Registry, owner: str, cls: type[Pass]) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Pass) and cls.name):
        raise GraphoptError(
            f"plugin '{owner}' registered {cls!r}, which is not a named graphopt.Pass subclass"
        )
    if cls.name in reg.passes:
        raise GraphoptError(
            f"pass '{cls.name}' is registered by both plugin '{reg.pass_owner[cls.name]}' and "
            f"plugin '{owner}'; disable one of them with -p no:NAME"
        )
    reg.passes[cls.name] = cls
    reg.pass_owner[cls.name] = owner
    reg.plugins[owner].passes.append(cls.name)


def _register_analysis(reg: Registry, owner: str, name: str, fn: Any) -> None:
    reg.analyses[name] = fn
    reg.plugins[owner].analyses.append(name)


def _register_exporter(reg: Registry, owner: str, exporter: Any) -> None:
    reg.exporters[exporter.name] = exporter
    reg.plugins[owner].exporters.append(exporter.name)


def _register_distill_loss(reg: Registry, owner: str, name: str, fn: Any) -> None:
    if name in reg.distill_losses:
        raise GraphoptError(
            f"distillation loss '{name}' is registered twice (again by plugin '{owner}'); "
            "disable one of the plugins with -p no:NAME"
        )
    reg.distill_losses[name] = fn


def _collect(reg: Registry) -> None:
    hook = reg.pm.hook
    contributions = [
        (hook.graphopt_register_analyses, _register_analysis),
        (hook.graphopt_register_exporters, _register_exporter),
        (hook.graphopt_register_passes, _register_pass),
        (hook.graphopt_register_distill_losses, _register_distill_loss),
    ]
    for caller, adder in contributions:
        # get_hookimpls is in registration order, so built-ins come first.
        for impl in caller.get_hookimpls():

            def register(*args: Any, _owner: str = impl.plugin_name, _add: Any = adder) -> None:
                _add(reg, _owner, *args)

            impl.function(register=register)


def _dist_version(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.version if dist is not None else "?"


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
    from . import __version__

    for modname in BUILTIN_PLUGINS:
        short = modname.rsplit(".", 1)[-1]
        if short in disabled or modname in disabled:
            continue
        pm.register(importlib.import_module(modname), name=modname)
        reg.plugins[modname] = PluginInfo(modname, __version__, builtin=True)
    if autoload:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in disabled or ep.name in reg.plugins:
                continue
            info = PluginInfo(ep.name, _dist_version(ep), builtin=False)
            reg.plugins[ep.name] = info
            try:
                pm.register(ep.load(), name=ep.name)
            except Exception as exc:  # a broken plugin must not take graphopt down
                info.error = f"{type(exc).__name__}: {exc}"
                warnings.warn(
                    f"graphopt plugin '{ep.name}' failed to import ({info.error}); it is skipped",
                    stacklevel=2,
                )
    for plugin in extra:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        pm.register(plugin, name=name)
        reg.plugins[name] = PluginInfo(name, "?", builtin=False)
    _collect(reg)
    return reg


_cached: dict[frozenset[str], Registry] = {}


def get_registry(disabled: Iterable[str] = ()) -> Registry:
    """The process-wide registry for a set of disabled plugins (loaded once)."""
    key = frozenset(disabled) | {f"autoload={os.environ.get(AUTOLOAD_ENV, '')}"}
    if key not in _cached:
        _cached[key] = load_registry(disabled)
    return _cached[key]
