"""The pass API: what a pass declares and what it receives when it runs.

A pass is a class with a name, a one-line summary, typed options declared once as a
dataclass, whether it is exact (semantics-preserving) or lossy, which analyses it keeps
valid, and ordering constraints against other passes. The same declaration drives pipeline
parsing, ``graphopt passes``, and the generated docs.

>>> import dataclasses, graphopt
>>> class Scale(graphopt.Pass):
...     name = "scale"
...     summary = "Multiply every output by a constant."
...     exact = False
...     @dataclasses.dataclass
...     class Options:
...         factor: float = graphopt.option(2.0, "the multiplier", check=lambda v: v > 0)
...     def run(self, ir, ctx):
...         ...
>>> Scale.parse_options({"factor": "3"}).factor
3.0
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args, get_origin

from .errors import GraphoptError

if TYPE_CHECKING:
    from rich.console import Console

    from .ir import GraphIR

__all__ = ["NoOptions", "OptionSpec", "Pass", "PassContext", "option"]


def option(
    default: Any,
    help: str,
    *,
    check: Callable[[Any], bool] | None = None,
    check_msg: str | None = None,
) -> Any:
    """Declare one pass option: its default, help text, and an optional validity check."""
    meta = {"help": help, "check": check, "check_msg": check_msg}
    if isinstance(default, list | dict | set):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class NoOptions:
    """Options of a pass that takes none."""


@dataclass(frozen=True)
class OptionSpec:
    """One declared option, as shown by ``graphopt passes`` and the docs."""

    name: str
    type: Any
    default: Any
    help: str

    @property
    def type_name(self) -> str:
        return _type_name(self.type)


class PassContext:
    """What a running pass may use besides the IR it rewrites.

    ``data`` is the calibration/training data the user supplied (an iterable of input
    tuples or of ``(inputs, target)`` batches), ``reference`` the untouched original model
    (the teacher for distillation), ``probe_inputs`` the inputs the pass manager checks
    deviation on, ``target_format`` the name of the exporter the result will be written
    with (``"pt2"``, ``"pt"``, ``"onnx"``, ``"folder"`` or a plugin's), or None when the
    caller did not say: a pass may pick a representation that format can hold. ``note``
    records a line for the pass's report, e.g. why a node was left alone; ``stat`` records
    a number such as how many nodes were rewritten.
    """

    def __init__(
        self,
        *,
        probe_inputs: tuple[Any, ...],
        reference: Any = None,
        data: Any = None,
        console: Console | None = None,
        target_format: str | None = None,
    ) -> None:
        self.probe_inputs = probe_inputs
        self.reference = reference
        self.data = data
        self.console = console
        self.target_format = target_format
        self.notes: list[str] = []
        self.stats: dict[str, float] = {}

    def note(self, message: str) -> None:
        """Add a line to this pass's report (shown after the run and stored in the ledger)."""
        self.notes.append(message)

    def stat(self, name: str, value: float = 1) -> None:
        """Add ``value`` to the named counter in this pass's report."""
        self.stats[name] = self.stats.get(name, 0) + value


class Pass:
    """Base class of every pass, built-in or third-party.

    Subclasses set the class attributes and implement :meth:`run`, which rewrites
    ``ir`` in place (the pass manager hands each pass its own copy of the model).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    #: analyses that stay valid after the pass (the rest are recomputed when next asked)
    keeps: ClassVar[tuple[str, ...]] = ()
    #: passes that, when they are in the same pipeline, must run before this one
    after: ClassVar[tuple[str, ...]] = ()
    #: passes that, when they are in the same pipeline, must run after this one
    before: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def run(self, ir: GraphIR, ctx: PassContext) -> None:
        """Rewrite ``ir`` in place."""
        raise NotImplementedError

    def check_target(self, target_format: str | None) -> None:
        """Refuse, before any work, options whose result the output format cannot hold.

        Called by the pass manager with the exporter name the result will be written with
        (see :class:`PassContext`); raise :class:`GraphoptError` with one sentence naming
        the conflict and the fix. The default accepts every format."""

    # -- option handling, shared by the pipeline parser, the CLI and the docs ---------------

    @classmethod
    def option_specs(cls) -> list[OptionSpec]:
        """The declared options in declaration order."""
        hints = typing.get_type_hints(cls.Options)
        specs = []
        for f in dataclasses.fields(cls.Options):
            factory: Any = f.default_factory
            default = f.default if f.default is not dataclasses.MISSING else factory()
            specs.append(OptionSpec(f.name, hints[f.name], default, f.metadata.get("help", "")))
        return specs

    @classmethod
    def parse_options(cls, raw: Mapping[str, Any]) -> Any:
        """Build the options object from strings (or typed values), validating each one."""
        fields = {f.name: f for f in dataclasses.fields(cls.Options)}
        hints = typing.get_type_hints(cls.Options)
        values = {}
        for key, value in raw.items():
            if key not in fields:
                known = ", ".join(fields) or "none"
                raise GraphoptError(
                    f"pass '{cls.name}' has no option '{key}'; its options are: {known}"
                )
            values[key] = _convert(value, hints[key], f"{cls.name}({key}=…)")
            check = fields[key].metadata.get("check")
            if check is not None and not check(values[key]):
                why = fields[key].metadata.get("check_msg") or fields[key].metadata.get("help")
                raise GraphoptError(
                    f"option {cls.name}({key}={format_value(values[key])}) is out of range; "
                    f"expected {why}"
                )
        return cls.Options(**values)

    @classmethod
    def non_default_options(cls, options: Any) -> dict[str, Any]:
        """The options whose value differs from the declared default, in declaration order."""
        return {
            s.name: getattr(options, s.name)
            for s in cls.option_specs()
            if getattr(options, s.name) != s.default
        }


def format_value(value: Any) -> str:
    """Print an option value the way the pipeline grammar reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    text = str(value)
    if text == "" or any(c in _QUOTED or c.isspace() or not c.isprintable() for c in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


_QUOTED = set(",()[]=\"'\\")
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _convert(value: Any, typ: Any, where: str) -> Any:
    origin, args = get_origin(typ), get_args(typ)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() == "none")
        if is_none and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except GraphoptError as exc:
                errors.append(exc)
        raise errors[0] if errors else GraphoptError(f"{where} cannot be none")
    if origin is Literal:
        choices = {str(a): a for a in args}
        if str(value) in choices:
            return choices[str(value)]
        raise GraphoptError(f"{where} must be one of {', '.join(choices)}, not '{value}'")
    if origin in (list, tuple):
        items = value if isinstance(value, list | tuple) else [value]
        inner = args[0] if args else str
        converted = [_convert(v, inner, where) for v in items]
        return converted if origin is list else tuple(converted)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in _TRUE:
            return True
        if str(value).lower() in _FALSE:
            return False
        raise GraphoptError(f"{where} must be true or false, not '{value}'")
    if typ in (int, float):
        if isinstance(value, bool):
            raise GraphoptError(f"{where} must be a number, not '{value}'")
        try:
            number = typ(value)
        except (TypeError, ValueError):
            kind = "a whole number" if typ is int else "a number"
            raise GraphoptError(f"{where} must be {kind}, not '{value}'") from None
        if typ is int and isinstance(value, float) and not float(value).is_integer():
            raise GraphoptError(f"{where} must be a whole number, not '{value}'")
        return number
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        try:
            return typ(value)
        except ValueError:
            names = ", ".join(str(m.value) for m in typ)
            raise GraphoptError(f"{where} must be one of {names}, not '{value}'") from None
    if typ is str:
        if isinstance(value, list | tuple):
            raise GraphoptError(f"{where} takes one value, not a list")
        return str(value)
    return value


def _type_name(typ: Any) -> str:
    origin, args = get_origin(typ), get_args(typ)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or none"
    if origin in (list, tuple):
        return f"list of {_type_name(args[0]) if args else 'str'}"
    return getattr(typ, "__name__", str(typ))
