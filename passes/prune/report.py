"""Reporting: why groups of channels were kept whole."""

from __future__ import annotations

import torch.fx as fx

from graphopt import GraphIR

from .graph import ChannelGraph, distinct

__all__ = ["describe", "frozen_report"]


def frozen_report(g: ChannelGraph) -> list[str]:
    """One line per (node, reason) that kept some layer's output channels whole (``g``
    solved); the first freeze to touch an atom is its reason."""
    reason_of: dict[int, tuple[str, str]] = {}
    for f in g.freezes:
        for c in distinct(g.comp[f.elements]):
            reason_of.setdefault(int(c), (f.node, f.reason))
    lines: dict[tuple[str, str], list[str]] = {}
    for key in sorted(g.producers, key=str):
        if key not in g.spaces:
            continue
        comps = distinct(g.comp[g.ids(key)])
        frozen = [c for c in comps if g.frozen[c]]
        if frozen:
            why = reason_of.get(int(frozen[0]), ("?", "?"))
            lines.setdefault(why, []).append(g.owner.get(key) or key[1])
    out = []
    for (node, reason), layers in lines.items():
        more = f" and {len(layers) - 4} more" if len(layers) > 4 else ""
        shown = ", ".join(layers[:4]) + more
        out.append(f"kept the output channels of {shown} whole: at node '{node}' {reason}")
    return out


def describe(ir: GraphIR, node: fx.Node) -> str:
    """What ``node`` calls, as a report names it: ``module Conv2d``, ``function add`` …"""
    if node.op == "call_module":
        return f"module {type(ir.module(node)).__name__}"
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    return f"{'method' if node.op == 'call_method' else 'function'} {name}"
