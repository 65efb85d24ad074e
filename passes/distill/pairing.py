"""Which student node is distilled towards which teacher node, and how to read their values.

Pairs are found on the IR, not on modules: a teacher node is named by its name in the
original graph, and the student node standing for it is the one whose provenance
(``node.meta[graphopt.ORIGIN]``) is that name — so a conv that pruning sliced, a block that
``depthwise`` rewrote or a functional op that a pass replaced still finds its teacher.

The default set is the output of every *block* of the teacher (see :func:`block_outputs`);
a list of name globs overrides it. Values are read by :func:`tap`, which returns a copy of
the graph whose output also carries the tapped nodes, sharing the original's modules and
parameters (no forward hooks, so functional ops can be tapped too).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

import graphopt
from graphopt import GraphoptError

__all__ = ["Pair", "block_outputs", "pair_nodes", "tap"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_CONTAINER_NAMES = ("Sequential", "ModuleList", "ModuleDict")


@dataclass(frozen=True)
class Pair:
    """A teacher node and the student node standing for it (by provenance)."""

    teacher: str
    student: str


def _scope_tree(gm: fx.GraphModule) -> tuple[dict[str, list[str]], dict[str, Any], set[str]]:
    """The module scopes the tracer recorded (``nn_module_stack``): children of each path
    in order of first use, the original class of each, and the leaf paths (called as one
    ``call_module``, or with no submodule scope below them, as in exported programs).

    The GraphModule's own module tree cannot say this: it keeps only the called leaves,
    under plain ``nn.Module`` parents.
    """
    children: dict[str, list[str]] = {"": []}
    types: dict[str, Any] = {}
    called = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            called.add(str(node.target))
        parent = ""
        for path, kind in _stack(node):
            if path not in types:
                types[path] = _resolve(kind)
                children.setdefault(parent, []).append(path)
                children.setdefault(path, [])
            parent = path
    leaves = called | {p for p in types if not children.get(p)}
    return children, types, leaves


def _stack(node: fx.Node) -> list[tuple[str, Any]]:
    """(module path, class or class name) of the scopes a node was traced in, outermost
    first; symbolic tracing and torch.export spell ``nn_module_stack`` differently."""
    out = []
    for key, value in node.meta.get("nn_module_stack", {}).items():
        path = value[0] if isinstance(value, tuple) and isinstance(value[0], str) else key
        path = path.split("@")[0]
        if path:  # exported programs list the root itself
            out.append((path, value[1] if isinstance(value, tuple) else object))
    return out


def _resolve(kind: Any) -> Any:
    """A class from its dotted name when its module is loaded (exported programs store
    names); never imports anything."""
    if isinstance(kind, str):
        module, _, name = kind.rpartition(".")
        return getattr(sys.modules.get(module), name, kind)
    return kind


def _is_container(kind: Any) -> bool:
    if isinstance(kind, type):
        return issubclass(kind, _CONTAINERS)
    return isinstance(kind, str) and kind.rsplit(".", 1)[-1] in _CONTAINER_NAMES


def _blocks(
    path: str, children: dict[str, list[str]], types: dict[str, Any], leaves: set[str]
) -> Iterator[str]:
    """Module paths of the blocks below ``path``: descend through containers; a container
    of leaves (conv-bn-relu) or any module with its own traced forward is a block."""
    for child in children.get(path, []):
        if child in leaves:
            continue
        if _is_container(types.get(child)):
            kids = children.get(child, [])
            if kids and all(k in leaves for k in kids):
                yield child
            else:
                yield from _blocks(child, children, types, leaves)
        elif _holds_stack(child, children, types, leaves):
            yield from _blocks(child, children, types, leaves)
        else:
            yield child


def _holds_stack(
    path: str, children: dict[str, list[str]], types: dict[str, Any], leaves: set[str]
) -> bool:
    """Whether a module keeps a stack of blocks in a container (a transformer's encoder
    with its ``layers``): a container child with at least two non-container submodules."""

    def is_block(p: str) -> bool:
        return p not in leaves and not _is_container(types.get(p))

    for child in children.get(path, []):
        kids = children.get(child, [])
        if _is_container(types.get(child)) and sum(is_block(k) for k in kids) >= 2:
            return True
    return False


def block_outputs(gm: fx.GraphModule) -> list[str]:
    """Names of the nodes that produce each block's output, in graph order.

    Blocks are found from the module tree and the ``nn_module_stack`` the tracer records:
    ResNet's ``layer1.0`` …, MobileNet's ``features.N``, a ``Sequential(conv, bn, relu)``
    stage. A block's output is the last node traced inside it. Nodes that feed the model's
    output directly are left out (the logits are distilled by the KD loss already).
    """
    children, types, leaves = _scope_tree(gm)
    paths = list(_blocks("", children, types, leaves))
    last: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        stack = {path for path, _ in _stack(node)}
        for path in paths:
            if path in stack:
                last[path] = node
    outputs = {a for n in gm.graph.nodes if n.op == "output" for a in n.all_input_nodes}
    chosen = {n for n in last.values() if n not in outputs}
    return [n.name for n in gm.graph.nodes if n in chosen]


def pair_nodes(
    teacher: fx.GraphModule,
    student: fx.GraphModule,
    patterns: Sequence[str] = (),
) -> tuple[list[Pair], list[str]]:
    """Pair teacher nodes (block outputs, or the names matching ``patterns``) with the student
    nodes standing for them. Returns the pairs and the teacher names with no student node
    (removed by a pass), so the caller can report them."""
    names = [n.name for n in teacher.graph.nodes if n.op not in ("placeholder", "output")]
    if patterns:
        features = graphopt.NamePatterns(patterns)
        wanted = [n for n in names if features.matches(n)]
        if not wanted:
            raise GraphoptError(
                f"no teacher node matches features={list(patterns)}; give globs over the "
                "original model's node names (see 'graphopt inspect')"
            )
    else:
        wanted = block_outputs(teacher)
    stands_for: dict[str, str] = {}
    for node in student.graph.nodes:  # the last node standing for an origin carries its value
        if node.op not in ("placeholder", "output"):
            stands_for[node.meta.get(graphopt.ORIGIN, node.name)] = node.name
    pairs = [Pair(t, stands_for[t]) for t in wanted if t in stands_for]
    missing = [t for t in wanted if t not in stands_for]
    if patterns and not pairs:
        raise GraphoptError(
            f"no student node stands for the teacher nodes matching features={list(patterns)}; "
            "the passes before distill removed them, so pick other nodes"
        )
    return pairs, missing


def tap(gm: fx.GraphModule, names: Sequence[str]) -> fx.GraphModule:
    """A GraphModule computing ``(output, (value of each named node, …))``.

    It shares ``gm``'s submodules and parameters, so training it trains ``gm``.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    by_name = {n.name: n for n in gm.graph.nodes}
    graph.output((out, tuple(env[by_name[name]] for name in names)))
    return fx.GraphModule(gm, graph, f"Tapped{type(gm).__name__}")
