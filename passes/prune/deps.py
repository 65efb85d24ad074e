"""Channel-dependency analysis: which channels of which tensors must be removed together.

Each node's op rule (:mod:`.ops`) declares how the elements of its inputs' spaces
correspond to those of its outputs (:mod:`.graph`); the connected components of that
element graph are atoms, solved into prunable groups by :mod:`.solve`. An op without a
rule, or whose rule fails, freezes every element it touches, and the report
(:mod:`.report`) says why.

Shapes come from the fake-tensor propagation of the IR (``node.meta["val"]``) or from a
real run that recorded them; the analysis itself computes nothing on real data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from graphopt import GraphIR, NamePatterns

from .graph import ChannelGraph, SpaceKey, val
from .ops import RuleSet, rules
from .report import describe
from .solve import components, solve

__all__ = ["ChannelGraph", "analyse", "head_spaces", "link_node"]


def analyse(
    ir: GraphIR,
    ignore: Sequence[str] = (),
    *,
    whole_heads: bool | None = None,
    rule_set: RuleSet | None = None,
) -> ChannelGraph:
    """Build and solve the channel-dependency graph of ``ir``, whose nodes carry their
    values' shapes in ``meta["val"]`` (from the ``shapes`` analysis or a real run);
    ``ignore`` globs name nodes whose layers stay whole; ``rule_set`` replaces the built-in
    and plugin rules (:func:`.ops.rules`).

    ``whole_heads`` chooses what attention loses: whole heads (True), the same positions of
    every head (False), or, by default, whole heads where an attention batches its heads in
    a dimension of their own (scaled dot-product attention) and positions in
    nn.MultiheadAttention. Whole heads need to know which dimensions index heads: a first
    analysis links every op as usual, the dimensions connected to an attention's heads
    dimension (:meth:`.ops.OpRule.heads`) are the heads, and a second one links the
    reshapes that split channels into (heads, head size) with whole heads."""
    if any("val" not in n.meta for n in ir.graph.nodes if n.op != "output"):
        ir.analysis("shapes")  # not observed by the caller: propagate fake tensors
    found = rules() if rule_set is None else rule_set
    g = _link_all(ir, found, ChannelGraph(ir, whole_heads=whole_heads is True))
    if whole_heads is not False:
        heads = head_spaces(g, found)
        if heads:
            g = _link_all(ir, found, ChannelGraph(ir, whole_heads=whole_heads is True, heads=heads))
    if ignore:
        patterns = NamePatterns(ignore)
        for node in ir.graph.nodes:
            if patterns.matches(node.name):
                g.freeze_params(node, "listed in ignore")
    solve(g)
    return g


def _link_all(ir: GraphIR, found: RuleSet, g: ChannelGraph) -> ChannelGraph:
    for node in ir.graph.nodes:
        try:
            link_node(g, node, found)
        except Exception as exc:  # a rule that cannot map this node refuses it
            g.freeze_node(node, f"its channel mapping failed ({exc})")
    return g


def head_spaces(g: ChannelGraph, rule_set: RuleSet) -> frozenset[SpaceKey]:
    """Every space of ``g`` (linked, not yet solved) holding an element connected to an
    attention's heads dimension."""
    seeds = []
    for node in g.ir.graph.nodes:
        rule = rule_set.find(node, g.module) if node.op.startswith("call_") else None
        if rule is not None and rule.applies(node):
            seeds += [g.ids(key) for key in rule.heads(g, node)]
    if not seeds:
        return frozenset()
    comp = components(g)
    marked = np.zeros(int(comp.max()) + 1, dtype=bool)
    marked[comp[np.concatenate(seeds)]] = True
    return frozenset(
        key for key, (start, size) in g.spaces.items() if marked[comp[start : start + size]].any()
    )


def link_node(g: ChannelGraph, node: fx.Node, rule_set: RuleSet) -> None:
    """Declare ``node``'s links through its op's rule; freeze model inputs and outputs and
    any op no rule maps."""
    if node.op == "placeholder":
        for key in g.tensor_keys(node):
            g.freeze(key, node, "it is a model input")
        return
    if node.op == "output":
        for leaf in pytree.tree_leaves(node.args):
            if isinstance(leaf, fx.Node):
                for key in g.tensor_keys(leaf):
                    g.freeze(key, node, "it is a model output")
        return
    if node.op == "get_attr":
        return
    v = val(node)
    if not isinstance(v, torch.Tensor | list | tuple):
        return
    if isinstance(v, list | tuple) and not any(isinstance(t, torch.Tensor) for t in v):
        return
    if not any(isinstance(val(a), torch.Tensor | list | tuple) for a in node.all_input_nodes):
        return  # computed from constants only: nothing to couple
    rule = rule_set.find(node, g.module)
    if rule is None or not rule.applies(node):
        g.freeze_node(node, f"graphopt does not know how {describe(g.ir, node)} maps channels")
    else:
        rule.link(g, node)
