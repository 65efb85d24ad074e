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
...         factor: float = graphopt.option(2.0, "the multiplier", gt=0, le=10)
...     def run(self, ir, ctx):
...         factor = self.options.factor  # an Options instance, parsed and checked
>>> Scale.parse_options({"factor": "3"}).factor
3.0
>>> Scale.parse_options({"factor": "0"})
Traceback (most recent call last):
...
graphopt.errors.GraphoptError: option scale(factor=0.0) is out of range; expected a number ...
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, get_args, get_origin

import torch

from .errors import GraphoptError

if TYPE_CHECKING:
    from rich.console import Console

    from .extensions import Criterion, Exporter, LossFn
    from .ir import Analysis, GraphIR

__all__ = [
    "Bounds",
    "NamePatterns",
    "NoOptions",
    "OptionSpec",
    "Pass",
    "PassContext",
    "RegistryView",
    "input_names",
    "option",
    "split_batch",
]


@dataclass(frozen=True)
class Bounds:
    """The valid range of a numeric option (of each item, for a list option): ``ge``/``gt``
    a lower bound, inclusive or not, ``le``/``lt`` an upper one. ``what`` names the values
    in messages ("a fraction"); by default "a number" or "a whole number"."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    what: str | None = None

    def __post_init__(self) -> None:
        if self.ge is not None and self.gt is not None:
            raise ValueError("give ge or gt, not both")
        if self.le is not None and self.lt is not None:
            raise ValueError("give le or lt, not both")

    def holds(self, value: Any) -> bool:
        """Whether ``value`` (a number, None, or a list of numbers) is within the bounds."""
        if value is None:
            return True
        if isinstance(value, list | tuple):
            return all(self.holds(v) for v in value)
        return not (
            (self.ge is not None and not value >= self.ge)
            or (self.gt is not None and not value > self.gt)
            or (self.le is not None and not value <= self.le)
            or (self.lt is not None and not value < self.lt)
        )

    def interval(self) -> str:
        """The range alone: ``[0, 1)``, ``≥ 1``, ``< 100`` …"""
        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        if low is not None and high is not None:
            left, right = "[" if self.ge is not None else "(", "]" if self.le is not None else ")"
            return f"in {left}{_number(low)}, {_number(high)}{right}"
        if low is not None:
            return f"{'≥' if self.ge is not None else '>'} {_number(low)}"
        if high is not None:
            return f"{'≤' if self.le is not None else '<'} {_number(high)}"
        return "any number"

    def describe(self, typ: Any) -> str:
        """The range for messages and docs, e.g. ``a fraction in [0, 1)``."""
        inner = _item_type(typ)
        what = self.what or ("a whole number" if inner is int else "a number")
        text = f"{what} {self.interval()}"
        return f"each value to be {text}" if _is_list(typ) else text


def _number(value: float) -> str:
    return f"{value:g}"


def option(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    what: str | None = None,
    check: Callable[[Any], bool] | None = None,
    check_msg: str | None = None,
) -> Any:
    """Declare one pass option: its default and help text, and what values are valid.

    ``ge``/``gt``/``le``/``lt`` bound a number (each item of a list) and drive both the
    check and its message, e.g. ``option(0.5, "fraction to remove", ge=0, lt=1, what="a
    fraction")`` refuses ``1`` with "expected a fraction in [0, 1)"; ``what`` names the
    values in that message. ``check`` is any other rule (a predicate on the converted
    value) and ``check_msg`` states it for the message, e.g. "decreasing fractions".
    """
    bounds = Bounds(ge, gt, le, lt, what) if (ge, gt, le, lt) != (None,) * 4 else None
    meta = {"help": help, "check": check, "check_msg": check_msg, "bounds": bounds}
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
    bounds: Bounds | None = None

    @property
    def type_name(self) -> str:
        """The type as ``graphopt passes`` shows it, with its range: ``float in [0, 1)``."""
        name = _type_name(self.type)
        return f"{name} {self.bounds.interval()}" if self.bounds is not None else name


class RegistryView(Protocol):
    """What a running pass may look up among the plugins' contributions: the
    :class:`graphopt.Registry` the pipeline runs with (``-p no:NAME`` applied)."""

    @property
    def passes(self) -> Mapping[str, type[Pass]]: ...

    @property
    def analyses(self) -> Mapping[str, Analysis]: ...

    @property
    def exporters(self) -> Mapping[str, Exporter]: ...

    @property
    def criteria(self) -> Mapping[str, Criterion]: ...

    @property
    def losses(self) -> Mapping[str, LossFn]: ...

    def pass_class(self, name: str) -> type[Pass]: ...


class PassContext:
    """What a running pass may use besides the IR it rewrites.

    ``data`` is the calibration/training data the user supplied (an iterable of input
    tuples or of ``(inputs, target)`` batches), ``reference`` the untouched original model
    (the teacher for distillation; it shares the caller's tensors, so it is read, never
    written), ``probe_inputs`` the inputs the pass manager checks
    deviation on, ``registry`` the plugin registry the pipeline runs with (look other
    contributions up there, e.g. ``ctx.registry.losses[name]``: ``-p no:NAME`` applies),
    ``target_format`` the name of the exporter the result will be written with (``"pt2"``,
    ``"pt"``, ``"onnx"``, ``"folder"`` or a plugin's), or None when the caller did not say:
    a pass may pick a representation that format can hold. ``note`` records a line for the
    pass's report, e.g. why a node was left alone; ``stat`` records a number such as how
    many nodes were rewritten.
    """

    def __init__(
        self,
        *,
        probe_inputs: tuple[Any, ...],
        reference: Any = None,
        data: Any = None,
        console: Console | None = None,
        registry: RegistryView | None = None,
        target_format: str | None = None,
    ) -> None:
        self.probe_inputs = probe_inputs
        self.reference = reference
        self.data = data
        self.console = console
        self.registry = registry
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
    ``ir`` in place (the pass manager hands each pass its own copy of the model). The
    option values the pipeline gave are ``self.options``, an instance of ``Options`` with
    every field converted and checked.
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
            specs.append(
                OptionSpec(
                    f.name, hints[f.name], default, f.metadata.get("help", ""),
                    f.metadata.get("bounds"),
                )
            )  # fmt: skip
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
            meta = fields[key].metadata
            where = f"option {cls.name}({key}={format_value(values[key])}) is out of range"
            bounds: Bounds | None = meta.get("bounds")
            if bounds is not None and not bounds.holds(values[key]):
                raise GraphoptError(f"{where}; expected {bounds.describe(hints[key])}")
            check = meta.get("check")
            if check is not None and not check(values[key]):
                why = meta.get("check_msg") or meta.get("help")
                raise GraphoptError(f"{where}; expected {why}")
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


def _is_list(typ: Any) -> bool:
    origin, args = get_origin(typ), get_args(typ)
    if origin in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in args)
    return origin in (list, tuple)


def _item_type(typ: Any) -> Any:
    """``int`` for ``int``, ``int | None``, ``list[int]`` …"""
    origin, args = get_origin(typ), get_args(typ)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _item_type(inner[0]) if len(inner) == 1 else typ
    if origin in (list, tuple) and args:
        return _item_type(args[0])
    return typ


def _type_name(typ: Any) -> str:
    origin, args = get_origin(typ), get_args(typ)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or none"
    if origin in (list, tuple):
        return f"list of {_type_name(args[0]) if args else 'str'}"
    return getattr(typ, "__name__", str(typ))


class NamePatterns:
    """Glob patterns over node names or module paths (an ``ignore``, ``skip`` or
    ``features`` option), remembering which matched so that a pattern that matched
    nothing (usually a typo) can be refused.

    >>> ignore = NamePatterns(["layer1.*", "fc"])
    >>> ignore.matches("layer1.0.conv1"), ignore.matches("layer2.0.conv1", "conv1")
    (True, False)
    >>> ignore.unused()
    ['fc']
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        self._matched = dict.fromkeys(patterns, False)

    def __bool__(self) -> bool:
        return bool(self._matched)

    def matches(self, *names: str) -> bool:
        """Whether any pattern matches any of ``names`` (each matching pattern is marked)."""
        hits = [p for p in self._matched if any(fnmatch.fnmatchcase(n, p) for n in names)]
        self._matched.update(dict.fromkeys(hits, True))
        return bool(hits)

    def unused(self) -> list[str]:
        """The patterns that have matched nothing so far."""
        return [p for p, hit in self._matched.items() if not hit]

    def check_all_used(self, pass_name: str, what: str, *, option: str = "ignore") -> None:
        """Raise if a pattern matched nothing: it names no ``what`` of the model."""
        unused = self.unused()
        if unused:
            raise GraphoptError(
                f"{pass_name} {option} pattern '{unused[0]}' matches no {what}; use a module "
                "path or node name from 'graphopt inspect MODEL'"
            )


#: keys a mapping batch may hold its labels under (transformers' tokenised datasets: "labels")
LABEL_KEYS = ("labels", "label")


def split_batch(batch: Any, inputs: int | Sequence[str]) -> tuple[tuple[Any, ...], Any]:
    """A batch of the user's data (``ctx.data``) as ``(model inputs, labels or None)``.

    ``inputs`` is the number of the model's inputs, or their names (:func:`input_names`).
    A batch is a tensor (the one input of a one-input model), a tuple or list of the
    model's inputs optionally followed by the labels, a pair ``((inputs…), labels)``, or,
    when ``inputs`` names them, a mapping from input names to tensors with the labels
    under ``"labels"`` or ``"label"`` (a Hugging Face style batch).

    >>> x, y = torch.zeros(2, 3), torch.tensor([0, 1])
    >>> [len(split_batch(b, 1)[0]) for b in (x, (x,), (x, y), [(x,), y])]
    [1, 1, 1, 1]
    >>> split_batch((x, y), 1)[1] is y, split_batch((x,), 1)[1]
    (True, None)
    >>> split_batch({"input_ids": x, "labels": y}, ["input_ids"])[1] is y
    True
    """
    names = None if isinstance(inputs, int) else list(inputs)
    n_inputs = inputs if isinstance(inputs, int) else len(inputs)
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, Mapping):
        return _split_mapping(batch, names)
    if not isinstance(batch, tuple | list):
        raise GraphoptError(
            f"a data batch is a {type(batch).__name__}; batches must be tuples of the model's "
            f"{n_inputs} input(s), optionally followed by the labels"
        )
    if len(batch) == 2 and isinstance(batch[0], tuple | list):
        return tuple(batch[0]), batch[1]
    if len(batch) == n_inputs:
        return tuple(batch), None
    if len(batch) == n_inputs + 1:
        return tuple(batch[:n_inputs]), batch[n_inputs]
    raise GraphoptError(
        f"a data batch has {len(batch)} items but the model takes {n_inputs} input(s); give "
        f"{n_inputs} inputs, optionally followed by the labels"
    )


def _split_mapping(batch: Mapping[str, Any], names: list[str] | None) -> tuple[tuple, Any]:
    """A mapping batch's inputs in the model's order, and its labels (or None)."""
    if names is None:
        raise GraphoptError(
            "a data batch is a mapping, which this step cannot match to the model's inputs; "
            "give batches as tuples (inputs…, labels)"
        )
    labels = [k for k in LABEL_KEYS if k in batch]
    extra = [k for k in batch if k not in names and k not in LABEL_KEYS]
    missing = [n for n in names if n not in batch]
    if extra or missing:
        what = f"has key '{extra[0]}', which" if extra else f"lacks '{missing[0]}', which"
        verb = "is not an input of" if extra else "is an input of"
        raise GraphoptError(
            f"a data batch {what} {verb} the model (its inputs: {', '.join(names)}; labels go "
            f"under 'labels'); give a mapping with exactly those keys"
        )
    return tuple(batch[n] for n in names), batch[labels[0]] if labels else None


def input_names(gm: Any) -> list[str]:
    """The names of a graph module's inputs (its placeholders), in order: what
    :func:`split_batch` matches a mapping batch's keys against."""
    return [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
