"""User-facing errors.

Every problem caused by what the user gave us (a file, a pipeline, an option) is raised as
:class:`GraphoptError` carrying one plain sentence that names the cause and the fix. The CLI
prints that sentence to stderr and exits with status 2; nothing else is ever shown. A
fault in a third-party plugin's code is a :class:`PluginError`, which names the plugin and
says how to disable it; a pass that crashes is a :class:`PassCrash`.
"""

from __future__ import annotations

import re

__all__ = ["GraphoptError", "PassCrash", "PluginError", "first_line"]


class GraphoptError(Exception):
    """A bad input: the message is one sentence naming the cause and the fix."""

    exit_code = 2


class PluginError(GraphoptError):
    """A third-party plugin's code raised: the message names the plugin, its distribution,
    what it was doing, says the fault is the plugin's and how to disable it (``-p no:NAME``).

    It is a :class:`GraphoptError` so that it passes through everything that lets a
    user-facing error through untouched, but it exits with status 1: the input was fine.
    """

    exit_code = 1

    def __init__(self, plugin: str, message: str) -> None:
        self.plugin = plugin
        super().__init__(message)


class PassCrash(Exception):
    """A pass raised an unexpected exception; a reproducer bundle may have been written.

    ``where`` says where the bundle went and how large it is; ``blame`` names the plugin
    that contributed the pass when it is not one of graphopt's own.
    """

    exit_code = 1

    def __init__(
        self,
        pass_name: str,
        cause: BaseException,
        bundle: str | None,
        *,
        where: str = "",
        blame: str = "",
    ) -> None:
        self.pass_name = pass_name
        self.cause = cause
        self.bundle = bundle
        where = where or (f"; a reproducer was written to {bundle}" if bundle else "")
        super().__init__(
            f"pass '{pass_name}'{blame} crashed with {type(cause).__name__}: "
            f"{first_line(cause)}{where}"
        )


#: terminal control sequences: CSI (colours, cursor moves) and OSC (titles, links)
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")


def strip_ansi(text: str) -> str:
    """``text`` without terminal escape sequences (colour codes a library put in a message)."""
    return _ANSI.sub("", text)


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, for one-sentence reports, without
    terminal escape codes."""
    for line in strip_ansi(str(exc)).splitlines():
        if line.strip():
            return line.strip().rstrip(".")
    return type(exc).__name__
