"""Which nodes of a graph run in int8, and the calibration run that measures their ranges.

A *site* is an op with an int8 kernel: a ``Conv1d/2d/3d`` or ``Linear`` module (fused with
a following ReLU), an add of two tensors (fused with a following ReLU) or a concat. A
*passthrough* op computes on int8 values directly with the scale of its input (max/avg
pooling, ReLU/ReLU6/Hardtanh, flatten, reshapes, splits, dropout and identity in eval).
Every other op runs in float; a value crosses from float to int8 through a quantize step
whose scale comes from calibration, and back through a dequantize.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphopt import GraphIR, NamePatterns

from .observers import Observer

__all__ = ["Plan", "Site", "calibrate", "input_batches", "make_plan", "skip_matches"]

LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
RELU_MODULES = (nn.ReLU,)
RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
CLAMP_MODULES = (nn.ReLU6, nn.Hardtanh)
CLAMP_FUNCTIONS = (F.relu6, F.hardtanh)
PASS_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AvgPool2d,
    nn.Flatten,
    nn.Dropout,
    nn.Identity,
    *RELU_MODULES,
    *CLAMP_MODULES,
)
PASS_FUNCTIONS = (
    F.max_pool1d,
    F.max_pool2d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.avg_pool2d,
    F.dropout,
    torch.flatten,
    torch.split,
    torch.chunk,
    torch.transpose,
    torch.permute,
    torch.reshape,
    operator.getitem,
    *RELU_FUNCTIONS,
    *CLAMP_FUNCTIONS,
)
PASS_METHODS = (
    "flatten",
    "view",
    "reshape",
    "permute",
    "transpose",
    "contiguous",
    "split",
    "chunk",
    "relu",
    "relu_",
)
ADDS = (operator.add, torch.add, operator.iadd)
CATS = (torch.cat, torch.concat)


@dataclass
class Site:
    """One op that runs as an int8 kernel."""

    node: fx.Node  #: the conv/linear/add/cat node
    kind: str  #: "layer", "add" or "cat"
    act: fx.Node | None = None  #: a ReLU fused into the kernel (its node is removed)
    observe: fx.Node | None = None  #: the node whose values set the output scale
    label: str = ""  #: what the op is, for reports ("Conv2d+ReLU", "add" …)

    @property
    def result(self) -> fx.Node:
        """The node whose users read the kernel's output."""
        return self.act if self.act is not None else self.node


@dataclass
class Plan:
    """Sites, the int8/float state each node will have, and the values to calibrate."""

    sites: dict[fx.Node, Site] = field(default_factory=dict)
    fused: set[fx.Node] = field(default_factory=set)  #: activations folded into a site
    quantized: set[fx.Node] = field(default_factory=set)  #: nodes whose value is int8
    observed: dict[fx.Node, str] = field(default_factory=dict)  #: node → what it feeds
    skipped: list[str] = field(default_factory=list)
    demoted: list[str] = field(default_factory=list)  #: adds/concats int8 would not speed up


def _is_call(node: fx.Node, ir: GraphIR, modules: tuple[type, ...], functions: tuple) -> bool:
    if node.op == "call_module":
        return type(ir.module(node)) in modules
    return node.op == "call_function" and node.target in functions


def is_relu(node: fx.Node, ir: GraphIR) -> bool:
    """A plain ReLU (module, function or method)."""
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return _is_call(node, ir, RELU_MODULES, RELU_FUNCTIONS)


def _is_clamp_from_zero(node: fx.Node, ir: GraphIR) -> bool:
    if node.op == "call_module" and isinstance(ir.module(node), CLAMP_MODULES):
        clamp: Any = ir.module(node)
        return float(clamp.min_val) == 0.0
    if node.op == "call_function" and node.target is F.relu6:
        return True
    if node.op == "call_function" and node.target is F.hardtanh:
        low = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
        return bool(low == 0.0)
    return False


def is_passthrough(node: fx.Node, ir: GraphIR) -> bool:
    """An op that computes on int8 values with its input's scale."""
    if node.op == "call_method":
        return node.target in PASS_METHODS
    if node.op == "call_module":
        m = ir.module(node)
        if isinstance(m, nn.Dropout) or type(m) in PASS_MODULES:
            return not (isinstance(m, nn.Hardtanh) and float(m.min_val) > 0)
        return False
    return node.op == "call_function" and node.target in PASS_FUNCTIONS


def skip_matches(node: fx.Node, ir: GraphIR, names: Iterable[str], types: Iterable[str]) -> bool:
    """Whether ``node`` is named by a ``skip`` glob (node name or module path) or its module
    by a ``skip_types`` class name."""
    labels = [node.name]
    if node.op == "call_module":
        labels.append(str(node.target))
        cls = type(ir.module(node))
        if cls.__name__ in types or f"{cls.__module__}.{cls.__qualname__}" in types:
            return True
    return NamePatterns(names).matches(*labels)


def _site_of(node: fx.Node, ir: GraphIR) -> str | None:
    if node.op == "call_module" and type(ir.module(node)) in LAYERS:
        m = ir.module(node)
        if isinstance(m, nn.modules.conv._ConvNd) and m.padding_mode != "zeros":
            return None
        return "layer"
    if node.op == "call_function" and node.target in ADDS:
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        extra = {k for k in node.kwargs if k != "out"}
        if len(node.args) == 2 and len(operands) == 2 and not extra:
            return "add"
    if node.op == "call_function" and node.target in CATS:
        tensors: Any = node.args[0] if node.args else node.kwargs.get("tensors")
        if isinstance(tensors, list | tuple) and all(isinstance(t, fx.Node) for t in tensors):
            return "cat"
    return None


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _val_is_tensor(node: Any) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def _operands_fit(node: fx.Node, kind: str) -> bool:
    """Float tensors in and out; an add's operands of one shape (int8 add does not broadcast)."""
    inputs = tensor_inputs(node, kind)
    if not _val_is_tensor(node) or not all(_val_is_tensor(a) for a in inputs):
        return False
    if kind == "add":
        return inputs[0].meta["val"].shape == inputs[1].meta["val"].shape
    return True


def make_plan(
    ir: GraphIR, skip: Iterable[str], skip_types: Iterable[str], floats: Iterable[str] = ()
) -> Plan:
    """Decide sites, fusions and int8 states for every node of ``ir``.

    ``floats`` names sites to keep in float without listing them as skipped (the accuracy
    search's choice). An add or concat runs in int8 only where that saves work: when one of
    its operands is already int8 and an int8 op reads its result (directly or through
    passthrough ops); otherwise it would only add quantize steps and rounding (a
    transformer's residual stream, read by LayerNorm, stays float)."""
    ir.analysis("shapes")
    skip, skip_types, floats = list(skip), list(skip_types), set(floats)
    plan = _plan(ir, skip, skip_types, floats, set())
    demoted = _idle(ir, plan)
    if demoted:
        plan = _plan(ir, skip, skip_types, floats, demoted)
        plan.demoted = [n.name for n in ir.graph.nodes if n in demoted]
    return plan


def _idle(ir: GraphIR, plan: Plan) -> set[fx.Node]:
    """The adds/concats of ``plan`` that int8 would not speed up: none of their operands is
    int8, or no int8 op reads their result (directly or through passthrough ops).

    Keeping one in float can idle the next (a residual chain read by LayerNorm collapses
    from its end), so it repeats to a fixed point; each round is one forward sweep (which
    values are int8) and one backward sweep (which values an int8 op reads)."""
    order = list(ir.graph.nodes)
    candidates = {n for n, s in plan.sites.items() if s.kind != "layer"}
    demoted: set[fx.Node] = set()
    while True:
        int8: set[fx.Node] = set()
        for n in order:
            site = plan.sites.get(n)
            if site is not None:
                if n not in demoted:
                    int8.update((n, site.result))
            elif n in plan.quantized and n not in plan.fused and n.args and n.args[0] in int8:
                int8.add(n)
        reads: set[fx.Node] = set()  # values an int8 op reads
        for n in reversed(order):
            for u in n.users:
                kept = u in plan.sites and u not in demoted
                if (kept and n in tensor_inputs(u, plan.sites[u].kind)) or (
                    u in int8 and u not in plan.sites and u in reads
                ):
                    reads.add(n)
                    break
        idle = {
            n
            for n in candidates - demoted
            if plan.sites[n].result not in reads
            or not any(a in int8 for a in tensor_inputs(n, plan.sites[n].kind))
        }
        if not idle:
            return demoted
        demoted |= idle


def _plan(
    ir: GraphIR,
    skip: list[str],
    skip_types: list[str],
    floats: set[str],
    demoted: set[fx.Node],
) -> Plan:
    plan = Plan()
    for node in ir.graph.nodes:
        if node in plan.fused:
            plan.quantized.add(node)
            continue
        kind = _site_of(node, ir)
        if kind is not None and not _operands_fit(node, kind):
            kind = None
        if kind is not None and skip_matches(node, ir, skip, skip_types):
            plan.skipped.append(node.name)
            kind = None
        if node in demoted or node.name in floats:
            kind = None
        if kind is not None:
            site = Site(node, kind)
            nxt = _only_user(node)
            if nxt is not None and kind != "cat" and is_relu(nxt, ir):
                site.act = nxt
                plan.fused.add(nxt)
            elif nxt is not None and kind == "layer" and _is_clamp_from_zero(nxt, ir):
                site.observe = nxt  # quantize the layer's output over the clamp's range
            site.observe = site.observe or site.result
            base = type(ir.module(node)).__name__ if kind == "layer" else kind
            site.label = base + ("+ReLU" if site.act is not None else "")
            plan.sites[node] = site
            plan.quantized.add(node)
            for arg in tensor_inputs(node, kind):
                if arg not in plan.quantized:
                    plan.observed.setdefault(arg, node.name)
            plan.observed[site.observe] = node.name
            continue
        first = node.args[0] if node.args else None
        if is_passthrough(node, ir) and isinstance(first, fx.Node) and first in plan.quantized:
            if node.target in (torch.split, torch.chunk, "split", "chunk") and any(
                u.target is not operator.getitem for u in node.users
            ):
                continue
            plan.quantized.add(node)
    return plan


def tensor_inputs(node: fx.Node, kind: str) -> list[fx.Node]:
    """The tensor operands an int8 site of this kind reads (a concat's list, else the args)."""
    if kind == "cat":
        tensors: Any = node.args[0] if node.args else node.kwargs["tensors"]
        return list(tensors)
    if kind == "add":
        return [a for a in node.args[:2] if isinstance(a, fx.Node)]
    return [node.args[0]] if isinstance(node.args[0], fx.Node) else []


# -- calibration ----------------------------------------------------------------------------


def input_batches(data: Any, n_inputs: int, limit: int) -> list[tuple[Any, ...]]:
    """Up to ``limit`` model-input tuples from user data.

    A batch may be a tensor, a tuple of the model's inputs, or ``(inputs, target)``: the
    first ``n_inputs`` items are taken (or, when the first item is itself a tuple, that).
    """
    out: list[tuple[Any, ...]] = []
    for batch in data:
        if len(out) >= limit:
            break
        if isinstance(batch, torch.Tensor):
            out.append((batch,))
        elif isinstance(batch, dict):
            raise TypeError("dict batches")
        elif isinstance(batch[0], list | tuple):
            out.append(tuple(batch[0]))
        else:
            out.append(tuple(batch[:n_inputs]))
    return out


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, sink: Callable[[fx.Node, Any], None]) -> None:
        super().__init__(gm)
        self.sink = sink

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.sink(n, result)
        return result


def record(
    gm: fx.GraphModule, inputs: tuple[Any, ...], sink: Callable[[fx.Node, Any], None]
) -> Any:
    """Run ``gm`` on ``inputs`` (eval, no grad), calling ``sink(node, value)`` for each node."""
    modes = [(m, m.training) for m in gm.modules()]
    for m, _ in modes:
        m.training = False
    try:
        with torch.no_grad():
            return _Recorder(gm, sink).run(*inputs)
    finally:
        for m, mode in modes:
            m.training = mode


def calibrate(
    gm: fx.GraphModule,
    batches: list[tuple[Any, ...]],
    observers: dict[fx.Node, Observer],
    progress: Callable[[], Generator[None, None, None]],
) -> None:
    """Feed every batch through ``gm`` and show each observer the values of its node."""

    def first(node: fx.Node, value: Any) -> None:
        if node in observers and isinstance(value, torch.Tensor):
            observers[node].observe(value)

    def second(node: fx.Node, value: Any) -> None:
        if node in observers and isinstance(value, torch.Tensor):
            observers[node].observe_again(value)

    ticks = progress()
    next(ticks, None)  # start the display; each later next() is one batch done
    try:
        for inputs in batches:
            record(gm, inputs, first)
            next(ticks, None)
        for obs in observers.values():
            obs.freeze()
        if any(o.two_pass for o in observers.values()):
            for inputs in batches:
                record(gm, inputs, second)
                next(ticks, None)
    finally:
        ticks.close()  # ends the progress display
