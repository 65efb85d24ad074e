"""Typed access to the arguments of an fx call node.

A call records its arguments in ``node.args`` and ``node.kwargs``, and the same argument may
arrive either way (``F.conv2d(x, w, groups=2)`` or ``F.conv2d(x, w, None, 1, 0, 1, 2)``).
These helpers read or write one argument by its position and name, and check its type
where the caller needs one, so a pass does not index ``node.args`` by hand.

>>> import torch, torch.fx as fx
>>> gm = fx.symbolic_trace(lambda x: torch.flatten(x, start_dim=1))
>>> node = next(n for n in gm.graph.nodes if n.op == "call_function")
>>> arg(node, 1, "start_dim"), arg(node, 2, "end_dim", -1), node_arg(node, 0, "input").op
(1, -1, 'placeholder')
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

__all__ = ["arg", "fetch", "int_arg", "node_arg", "set_arg"]


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """The argument at position ``index`` or keyword ``name`` of ``node``'s call, else
    ``default``."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if index < len(node.args) else default


def node_arg(node: fx.Node, index: int = 0, name: str = "input") -> fx.Node:
    """The argument at ``index``/``name``, which must be another node (a tensor input);
    TypeError if it is a constant or missing."""
    value = arg(node, index, name)
    if not isinstance(value, fx.Node):
        raise TypeError(f"argument '{name}' of {node.name} is {type(value).__name__}, not a node")
    return value


def int_arg(node: fx.Node, index: int, name: str, default: int | None = None) -> int:
    """The argument at ``index``/``name`` as a literal int (``default`` when absent);
    TypeError if it is computed in the graph."""
    value = arg(node, index, name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"argument '{name}' of {node.name} is {type(value).__name__}, not an int")
    return value


def set_arg(node: fx.Node, index: int, name: str, value: Any) -> None:
    """Replace the argument at ``index``/``name``: where the call passed it (by keyword or
    position), else as a keyword."""
    if name not in node.kwargs and index < len(node.args):
        node.args = (*node.args[:index], value, *node.args[index + 1 :])
    else:
        node.kwargs = {**node.kwargs, name: value}


def fetch(root: nn.Module, target: str) -> Any:
    """What ``root`` holds at the dotted path ``target`` (a submodule, parameter, buffer or
    plain attribute, as a ``get_attr`` node reads it); AttributeError when nothing is there."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
