"""The pipeline grammar: ``name(opt=value,…),name,…``.

Values are bare words (``0.5``, ``true``, ``l1``), double-quoted strings (``"a,b"``) or
bracketed lists (``[fc,classifier]``). A parsed pipeline prints back canonically: passes in
order, each with only the options that differ from their defaults, in declaration order.

>>> steps = parse("prune(ratio=0.5),fold")
>>> [(s.name, s.options) for s in steps]
[('prune', {'ratio': '0.5'}), ('fold', {})]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import GraphoptError
from .pass_api import Pass, format_value

if TYPE_CHECKING:
    from .plugins import Registry

__all__ = ["Step", "check_order", "format_pipeline", "parse", "resolve"]

_SPECIAL = set(',()[]="')


@dataclass
class Step:
    """One pass invocation as written: its name, raw option values, and column."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    column: int = 0


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, expected: str) -> GraphoptError:
        shown = self.text[: self.pos] + "⟨here⟩" + self.text[self.pos :]
        found = repr(self.text[self.pos]) if self.pos < len(self.text) else "the end"
        return GraphoptError(
            f"pipeline error at column {self.pos + 1} of '{shown}': expected {expected} but "
            f"found {found}; write passes as name(option=value,…) separated by commas"
        )

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise self.fail(f"'{char}'")
        self.pos += 1

    def word(self, what: str) -> str:
        self.skip_space()
        start = self.pos
        while (
            self.pos < len(self.text)
            and self.text[self.pos] not in _SPECIAL
            and not self.text[self.pos].isspace()
        ):
            self.pos += 1
        if self.pos == start:
            raise self.fail(what)
        return self.text[start : self.pos]

    def quoted(self) -> str:
        self.expect('"')
        out = []
        while self.pos < len(self.text) and self.text[self.pos] != '"':
            if self.text[self.pos] == "\\" and self.pos + 1 < len(self.text):
                self.pos += 1
            out.append(self.text[self.pos])
            self.pos += 1
        if self.pos >= len(self.text):
            raise self.fail("a closing '\"'")
        self.pos += 1
        return "".join(out)

    def value(self) -> Any:
        char = self.peek()
        if char == '"':
            return self.quoted()
        if char == "[":
            self.pos += 1
            items: list[Any] = []
            if self.peek() == "]":
                self.pos += 1
                return items
            while True:
                items.append(self.value())
                if self.peek() == "]":
                    self.pos += 1
                    return items
                self.expect(",")
        return self.word("a value")

    def step(self) -> Step:
        self.skip_space()
        column = self.pos
        name = self.word("a pass name")
        options: dict[str, Any] = {}
        if self.peek() == "(":
            self.pos += 1
            if self.peek() == ")":
                self.pos += 1
                return Step(name, options, column)
            while True:
                key_pos = self.pos
                key = self.word("an option name")
                if key in options:
                    self.pos = key_pos
                    raise self.fail(f"each option of '{name}' once, but '{key}' repeats")
                self.expect("=")
                options[key] = self.value()
                if self.peek() == ")":
                    self.pos += 1
                    break
                if self.peek() != ",":
                    raise self.fail("',' or ')'")
                self.pos += 1
        return Step(name, options, column)

    def pipeline(self) -> list[Step]:
        if not self.text.strip():
            raise GraphoptError("the pipeline is empty; name at least one pass, e.g. --passes fold")
        steps = [self.step()]
        while self.peek() == ",":
            self.pos += 1
            steps.append(self.step())
        if self.peek():
            raise self.fail("',' or the end")
        return steps


def parse(text: str) -> list[Step]:
    """Parse a pipeline string into steps (names and raw option strings)."""
    return _Parser(text).pipeline()


def resolve(steps: list[Step], registry: Registry) -> list[Pass]:
    """Instantiate each step's pass with validated options, then check the order."""
    passes = []
    for step in steps:
        cls = registry.pass_class(step.name)
        passes.append(cls(cls.parse_options(step.options)))
    check_order(passes)
    return passes


def check_order(passes: list[Pass]) -> None:
    """Refuse a pipeline that breaks an ordering constraint declared by one of its passes."""
    position: dict[str, list[int]] = {}
    for i, p in enumerate(passes):
        position.setdefault(p.name, []).append(i)
    for i, p in enumerate(passes):
        for other in p.after:
            late = [j for j in position.get(other, []) if j > i]
            if late:
                raise GraphoptError(
                    f"pass '{p.name}' must run after '{other}', but '{other}' comes later in "
                    f"the pipeline; move '{other}' before '{p.name}'"
                )
        for other in p.before:
            early = [j for j in position.get(other, []) if j < i]
            if early:
                raise GraphoptError(
                    f"pass '{p.name}' must run before '{other}', but '{other}' comes earlier in "
                    f"the pipeline; move '{p.name}' before '{other}'"
                )


def format_step(p: Pass) -> str:
    """One pass with its non-default options, as the grammar reads it."""
    opts = p.non_default_options(p.options)
    if not opts:
        return p.name
    return p.name + "(" + ",".join(f"{k}={format_value(v)}" for k, v in opts.items()) + ")"


def format_pipeline(passes: list[Pass]) -> str:
    """The canonical text of a resolved pipeline; parsing it gives the same pipeline."""
    return ",".join(format_step(p) for p in passes)
