"""Capturing a model as an fx graph: ``torch.fx`` symbolic tracing, or ``torch.export``
raised back to the same vocabulary.

Two paths end in the same kind of graph (calls of leaf modules, torch-level functions and
tensor methods), so every pass is written once:

* **fx** (:func:`symbolic_trace`) runs ``forward`` on proxies. It is fast and keeps the
  model's own Python structure, but it cannot follow Python control flow on tensor values
  or shapes, nor code that inspects its arguments (``len``, ``isinstance``, iterating a
  proxy) as Hugging Face models do.
* **export** (:func:`export_and_raise`) runs ``forward`` under ``torch.export`` on fake
  tensors with the example inputs' shapes: shapes are concrete, so branches on them are
  simply taken, and only control flow on tensor *values* stops it. The ATen program it
  records is raised back to graphopt's vocabulary by :mod:`graphopt.raising`. The graph is
  specialised to the example inputs' shapes.

``auto`` (the default) tries fx first and export when fx fails; :func:`capture` says in one
sentence why each path failed when neither can capture the model.

Arguments of ``forward`` that have defaults and are not given an example input are not
inputs: fx fixes them to their defaults (as ``concrete_args``), export leaves Python to fill
them in.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import GraphoptError, first_line
from .inputs import FreeDims, dynamic_shapes, free_dim_candidates, grown

__all__ = [
    "CAPTURE",
    "CAPTURE_MODES",
    "HF_ORIGIN",
    "capture",
    "export_and_raise",
    "quiet_export",
    "remember_origin",
    "symbolic_trace",
]

#: ``GraphModule.meta`` key naming the path that captured a graph ("fx" or "export")
CAPTURE = "graphopt_capture"
CAPTURE_MODES = ("auto", "fx", "export")

#: longest failure reason quoted from torch (export's first lines can run long)
_REASON_CHARS = 240

#: ``GraphModule.meta`` key of the transformers class and configuration a graph came from
HF_ORIGIN = "graphopt.hf_origin"


def remember_origin(model: Any, gm: fx.GraphModule) -> None:
    """Record in ``gm.meta`` the transformers class and configuration of ``model`` (nothing
    for other models)."""
    config: Any = getattr(model, "config", None)
    if hasattr(model, "save_pretrained") and hasattr(config, "to_dict"):
        gm.meta[HF_ORIGIN] = {"class": type(model).__name__, "config": config.to_dict()}


class _Tracer(fx.Tracer):
    """fx tracer that also treats user-named modules (qualified or class name) as leaves."""

    def __init__(self, leaves: Iterable[str] = ()) -> None:
        super().__init__()
        self.leaves = set(leaves)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaves or type(m).__name__ in self.leaves:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _data_dependent(exc: BaseException) -> bool:
    """Whether torch.export failed on control flow that depends on a tensor's values."""
    return "DataDependent" in type(exc).__name__


class CaptureFailure(Exception):
    """One path's failure: why, and the model's own line where it happened."""

    def __init__(self, path: str, exc: BaseException) -> None:
        self.path = path
        reason = first_line(exc)
        if _data_dependent(exc):  # export's own wording names sympy symbols
            reason = "the code branches on a tensor's values"
        self.reason = reason if len(reason) <= _REASON_CHARS else reason[:_REASON_CHARS] + "…"
        self.frame = _user_frame(exc.__traceback__)
        super().__init__(self.describe())

    def describe(self) -> str:
        where = f" at {self.frame[0]}:{self.frame[1]} in {self.frame[2]}" if self.frame else ""
        return f"{self.reason}{where}"

    @property
    def owner(self) -> str | None:
        """The class whose method failed, when the failing line is in one."""
        if self.frame and "." in self.frame[2]:
            return self.frame[2].split(".")[0]
        return None


def _user_frame(tb: TracebackType | None) -> tuple[str, int, str] | None:
    """The innermost traceback frame outside torch: the model's own line that failed."""
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(__file__)
    found = None
    while tb is not None:
        code = tb.tb_frame.f_code
        if not code.co_filename.startswith((torch_dir, here)):
            owner = tb.tb_frame.f_locals.get("self")
            where = f"{type(owner).__name__}.{code.co_name}" if owner is not None else code.co_name
            found = (code.co_filename, tb.tb_lineno, where)
        tb = tb.tb_next
    return found


def _hint(failures: Sequence[CaptureFailure]) -> str:
    owner = next((f.owner for f in failures if f.owner), None) or "NAME"
    return (
        f"keep that module opaque with --leaf-module {owner} or fix the argument with "
        "--concrete-arg NAME=VALUE"
    )


def capture(
    model: nn.Module,
    example_inputs: Sequence[Any],
    *,
    input_names: Sequence[str] | None = None,
    leaf_modules: Iterable[str] = (),
    concrete_args: dict[str, Any] | None = None,
    mode: str = "auto",
) -> fx.GraphModule:
    """``model`` as a GraphModule in graphopt's vocabulary, captured by ``mode``: ``"fx"``,
    ``"export"`` or ``"auto"`` (fx, then export if fx fails). ``input_names`` binds the
    example inputs to ``forward``'s arguments by name instead of by position. The path that
    captured the graph is in ``gm.meta[CAPTURE]``."""
    if mode not in CAPTURE_MODES:
        raise GraphoptError(f"capture must be one of {', '.join(CAPTURE_MODES)}, not '{mode}'")
    leaves = list(leaf_modules)
    failures: list[CaptureFailure] = []
    if mode in ("auto", "fx"):
        try:
            return symbolic_trace(
                model, len(example_inputs), input_names, leaves=leaves, concrete_args=concrete_args
            )
        except CaptureFailure as failure:
            if mode == "fx":
                hint = _hint([failure]) if failure.owner else "try --capture export"
                raise GraphoptError(
                    f"cannot trace the model with torch.fx: {failure.describe()}; {hint}"
                ) from None
            failures.append(failure)
    try:
        return export_and_raise(
            model, example_inputs, input_names, leaves=leaves, concrete_args=concrete_args
        )
    except CaptureFailure as failure:
        if mode == "export":
            owner = failure.owner or "NAME"
            raise GraphoptError(
                f"cannot capture the model with torch.export: {failure.describe()}; try "
                f"--capture fx with --leaf-module {owner} to keep that module opaque"
            ) from None
        failures.append(failure)
    raise GraphoptError(
        f"cannot capture the model: torch.fx failed ({failures[0].describe()}) and "
        f"torch.export failed ({failures[1].describe()}); {_hint(failures)}"
    )


# -- fx ------------------------------------------------------------------------------------


def _defaults(model: nn.Module, n_inputs: int, input_names: Sequence[str] | None) -> dict[str, Any]:
    """``forward``'s arguments that get no example input but have a default: fixed to it."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    named = [
        p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    given = set(input_names) if input_names is not None else {p.name for p in named[:n_inputs]}
    return {p.name: p.default for p in named if p.name not in given and p.default is not p.empty}


def symbolic_trace(
    model: nn.Module,
    n_inputs: int,
    input_names: Sequence[str] | None = None,
    *,
    leaves: Iterable[str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace with torch.fx; arguments with defaults and no example input are fixed to their
    defaults. Raises :class:`CaptureFailure`."""
    tracer = _Tracer(leaves)
    fixed = {**_defaults(model, n_inputs, input_names), **(concrete_args or {})}
    try:
        graph = tracer.trace(model, fixed or None)
    except Exception as exc:
        raise CaptureFailure("fx", exc) from None
    _drop_guarded_placeholders(graph)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.train(model.training)
    gm.meta[CAPTURE] = "fx"
    return gm


#: the checks fx adds for an argument fixed by concrete_args (a value, or None)
_GUARDS = (torch._assert, fx._symbolic_trace._assert_is_none)


def _drop_guarded_placeholders(graph: fx.Graph) -> None:
    """Remove placeholders that concrete_args fixed, with the guards fx adds for them.

    fx keeps such an argument as a placeholder whose only use is an assertion that the
    caller passes the traced value; with the value baked in, the input is dead weight and
    would make the model's signature differ from its example inputs.
    """
    position = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "placeholder":
            continue
        reach = set()
        stack = [node]
        while stack:
            current = stack.pop()
            if current in reach:
                continue
            reach.add(current)
            stack.extend(current.users)
        if any(n.op == "output" for n in reach):
            continue
        if not any(n.op == "call_function" and n.target in _GUARDS for n in reach):
            continue
        for dead in sorted(reach, key=lambda n: -position[n]):
            graph.erase_node(dead)


# -- torch.export --------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Silence what torch.export writes while it works or fails (its log records, and the
    partial graph it prints to stderr on an error): the caller reports the failure."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def leaf_paths(model: nn.Module, leaves: Iterable[str] = ()) -> list[str]:
    """Qualified names of the modules fx would keep as leaves (torch.nn layers and the
    named ones), outermost only."""
    tracer = _Tracer(leaves)
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in found):
            continue
        if tracer.is_leaf_module(module, name):
            found.append(name)
    return found


def export_and_raise(
    model: nn.Module,
    example_inputs: Sequence[Any],
    input_names: Sequence[str] | None = None,
    *,
    leaves: Iterable[str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Export ``model`` with torch.export (each leaf module's calls recorded with their
    inputs and outputs) and raise the program to graphopt's vocabulary. Raises
    :class:`CaptureFailure`."""
    from .raising import raise_program

    program = None
    with quiet_export():
        for dims in free_dim_candidates(example_inputs):  # a graph for any batch (and length)
            try:
                program = _export(model, grown(example_inputs, dims), input_names,
                                  concrete_args, leaves, dims)  # fmt: skip
                break
            except Exception:
                continue
        if program is None:
            program = _export(model, example_inputs, input_names, concrete_args, leaves, None)
    gm = raise_program(program, model, name=type(model).__name__)
    gm.meta[CAPTURE] = "export"
    return gm


def _positional_names(model: nn.Module, count: int) -> list[str] | None:
    """The names ``forward``'s first ``count`` positional arguments bind to (None when they
    are taken by ``*args``)."""
    names = []
    for p in inspect.signature(model.forward).parameters.values():
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        names.append(p.name)
    return names[:count] if len(names) >= count else None


def _export(
    model: nn.Module,
    example_inputs: Sequence[Any],
    input_names: Sequence[str] | None,
    concrete_args: dict[str, Any] | None,
    leaves: Iterable[str],
    dims: FreeDims | None,
) -> torch.export.ExportedProgram:
    """One torch.export of ``model`` with each leaf's calls recorded (without, if a leaf is
    called with arguments export cannot record), leaving ``dims`` free. Raises
    :class:`CaptureFailure`, and whatever export raises when ``dims`` cannot be free."""
    if input_names is not None:
        args: tuple[Any, ...] = ()
        kwargs = dict(zip(input_names, example_inputs, strict=True))
    else:
        args, kwargs = tuple(example_inputs), {}
    shapes: Any = None
    if dims is not None:
        names = input_names or _positional_names(model, len(example_inputs))
        if names is None:
            raise CaptureFailure("export", ValueError("inputs bound through *args"))
        free = dynamic_shapes(dims, len(example_inputs))
        shapes = {**dict(zip(names, free, strict=True)), **dict.fromkeys(concrete_args or {})}
    kwargs.update(concrete_args or {})
    preserve = tuple(leaf_paths(model, leaves))
    try:
        return torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=shapes,
                                   preserve_module_call_signature=preserve)  # fmt: skip
    except Exception as exc:
        if _data_dependent(exc) or dims is not None:  # the model's failure, or not free
            raise CaptureFailure("export", exc) from None
    try:  # a leaf called with arguments export cannot record: no records
        return torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=shapes)
    except Exception as exc:
        raise CaptureFailure("export", exc) from None
