"""User-facing errors.

Every problem caused by what the user gave us (a file, a pipeline, an option) is raised as
:class:`GraphoptError` carrying one plain sentence that names the cause and the fix. The CLI
prints that sentence to stderr and exits with status 2; nothing else is ever shown.
"""

from __future__ import annotations

__all__ = ["GraphoptError", "PassCrash"]


class GraphoptError(Exception):
    """A bad input: the message is one sentence naming the cause and the fix."""

    exit_code = 2


class PassCrash(Exception):
    """A pass raised an unexpected exception; a reproducer bundle may have been written."""

    exit_code = 1

    def __init__(self, pass_name: str, cause: BaseException, bundle: str | None) -> None:
        self.pass_name = pass_name
        self.cause = cause
        self.bundle = bundle
        where = f"; a reproducer was written to {bundle}" if bundle else ""
        super().__init__(
            f"pass '{pass_name}' crashed with {type(cause).__name__}: {first_line(cause)}{where}"
        )


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, for one-sentence reports."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip().rstrip(".")
    return type(exc).__name__
