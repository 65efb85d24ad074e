"""Layer (block) pruning: drop whole residual branches ``y = x + f(x)`` so that ``y = x``.

A branch qualifies when its output has the skip's shape (so the model stays valid with the
add gone) and it is self-contained: every node of ``f`` is computed from ``x``, parameters
and constants only, and is used only inside ``f``. Branches are ranked by how much they add
to the residual stream on the calibration data (or the probe inputs): the mean ``|f(x)|``
relative to the mean ``|x|``; the smallest go first.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt import GraphIR, NamePatterns

__all__ = ["ResidualBlock", "block_scores", "drop_blocks", "residual_blocks"]

_ADDS = {operator.add, operator.iadd, torch.add, "add"}


@dataclass
class ResidualBlock:
    """One droppable residual branch: ``add = skip + output`` with ``nodes`` computing it."""

    add: fx.Node
    skip: fx.Node
    output: fx.Node
    nodes: set[fx.Node]


def _branch(skip: fx.Node, out: fx.Node, add: fx.Node) -> set[fx.Node] | None:
    """The nodes computing ``out`` from ``skip``, or None if it reads anything else."""
    nodes: set[fx.Node] = set()
    stack = [out]
    while stack:
        n = stack.pop()
        if n is skip or n in nodes:
            continue
        if n.op in ("placeholder", "output"):
            return None
        nodes.add(n)
        stack.extend(n.all_input_nodes)
    reads_skip = any(skip in n.all_input_nodes for n in nodes)
    # every node is used only inside the branch (or, for its output, by the add)
    # (a dead user such as the unused attention weights of ``x, _ = attn(…)`` goes too)
    private = all(
        u in nodes or (n is out and u is add) or (not u.users and u.op == "call_function")
        for n in nodes
        for u in n.users
    )
    if not reads_skip or not private:
        return None
    return nodes


def residual_blocks(ir: GraphIR) -> list[ResidualBlock]:
    """Every residual add whose branch can be dropped, in graph order."""
    found = []
    for node in ir.graph.nodes:
        target = node.target
        if node.op not in ("call_function", "call_method") or target not in _ADDS:
            continue
        args = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if len(args) != 2 or len(node.args) > 2 or node.kwargs:
            continue
        vals = [a.meta.get("val") for a in args]
        out_val = node.meta.get("val")
        if not all(isinstance(v, torch.Tensor) for v in [*vals, out_val]):
            continue
        for skip, out in ((args[0], args[1]), (args[1], args[0])):
            if tuple(skip.meta["val"].shape) != tuple(out_val.shape):
                continue
            nodes = _branch(skip, out, node)
            if nodes and any(n.op == "call_module" or n.op == "get_attr" for n in nodes):
                found.append(ResidualBlock(node, skip, out, nodes))
                break
    return found


def block_scores(
    ir: GraphIR, blocks: list[ResidualBlock], batches: list[tuple[Any, ...]]
) -> list[float]:
    """Mean ``|branch output|`` over mean ``|skip|`` per block, on ``batches``."""
    wanted = {b.output.name for b in blocks} | {b.skip.name for b in blocks}
    sums: dict[str, float] = dict.fromkeys(wanted, 0.0)

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n.name in wanted and isinstance(out, torch.Tensor):
                sums[n.name] += float(out.detach().abs().float().mean())
            return out

    training = ir.gm.training
    ir.gm.eval()
    try:
        with torch.no_grad():
            for inputs in batches:
                Recorder(ir.gm).run(*inputs)
    finally:
        ir.gm.train(training)
    return [sums[b.output.name] / max(sums[b.skip.name], 1e-12) for b in blocks]


def drop_blocks(
    ir: GraphIR, count: int, batches: list[tuple[Any, ...]], ignore: list[str]
) -> list[str]:
    """Drop the ``count`` residual branches that add least; return the dropped adds' names."""
    patterns = NamePatterns(ignore)
    blocks = [b for b in residual_blocks(ir) if not patterns.matches(*(n.name for n in b.nodes))]
    scores = block_scores(ir, blocks, batches)
    chosen = sorted(range(len(blocks)), key=lambda i: scores[i])[:count]
    dropped = []
    for i in sorted(chosen, key=lambda i: -GraphIR.position(blocks[i].add)):
        block = blocks[i]
        block.add.replace_all_uses_with(block.skip)
        dropped.append(block.add.name)
        ir.graph.erase_node(block.add)
    ir.graph.eliminate_dead_code()
    ir.gm.delete_all_unused_submodules()
    ir.gm.recompile()
    ir.invalidate()
    return dropped
