"""Choosing what to remove: per-group ratios, global ranking, MACs/params targets.

Atoms are ranked by score inside their group (or across all groups with ``global_rank``);
each group keeps at least one atom and loses at most ``max_layer_ratio`` of them, and the
number it keeps is rounded up to a multiple of ``round_to`` channels. A MACs or params
target is met by bisection on the ratio, using a fast estimate: each node's MACs scale with
the kept fraction of its output and of its contracted dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from graphopt import GraphIR

from .graph import ChannelGraph, SpaceKey, val
from .ops import RuleSet

__all__ = ["Estimator", "Selector"]


@dataclass
class _Group:
    atoms: np.ndarray  # component ids, most important last
    step: int  # keep a multiple of this many atoms


class Selector:
    """Turns a ratio into a removal mask over components."""

    def __init__(
        self,
        g: ChannelGraph,
        scores: np.ndarray,
        *,
        round_to: int,
        max_layer_ratio: float,
        global_rank: bool,
    ) -> None:
        self.g = g
        self.ncomp = len(g.prunable)
        self.scores = scores
        self.max_layer_ratio = max_layer_ratio
        self.global_rank = global_rank
        atoms = np.flatnonzero(g.prunable)
        # an atom's width: the most elements it has in any one space (a head spans head_dim)
        mult = np.ones(self.ncomp, dtype=np.int64)
        inside = g.prunable[g.comp]
        pairs, n = np.unique(
            g.space_of[inside] * self.ncomp + g.comp[inside], return_counts=True
        )  # fmt: skip
        np.maximum.at(mult, pairs % self.ncomp, n)
        self.groups: list[_Group] = []
        gid = g.group_of[atoms]
        by_group = atoms[np.lexsort((scores[atoms], gid))]  # by group, then by score
        bounds = np.flatnonzero(np.diff(g.group_of[by_group])) + 1
        for members in np.split(by_group, bounds) if len(atoms) else []:
            width = int(mult[members].max())
            step = max(1, round_to // width) if round_to > 1 else 1
            if len(members) < 2 * step:
                step = 1
            self.groups.append(_Group(members, step))
        self.order = atoms[np.argsort(scores[atoms], kind="stable")]
        spaces = sorted(v for v in g.spaces.values() if v[1] > 0)
        self.starts = np.array([start for start, _ in spaces], dtype=np.int64)
        self.sizes = np.array([size for _, size in spaces], dtype=np.int64)

    @property
    def n_atoms(self) -> int:
        return sum(len(gr.atoms) for gr in self.groups)

    def _count(self, gr: _Group, k: int) -> int:
        n = len(gr.atoms)
        keep = n - k
        keep = min(n, -(-keep // gr.step) * gr.step)
        floor = max(1, n - int(self.max_layer_ratio * n))
        return n - max(keep, floor)

    def counts(self, ratio: float) -> list[int]:
        """How many atoms each group loses at ``ratio`` (rounded and capped)."""
        if self.global_rank:
            chosen = np.zeros(self.ncomp, dtype=bool)
            chosen[self.order[: int(ratio * len(self.order))]] = True
        out = []
        for gr in self.groups:
            # nearest count, so that steps compound to the ratio asked for
            k = (
                int(chosen[gr.atoms].sum())
                if self.global_rank
                else int(ratio * len(gr.atoms) + 0.5)
            )
            out.append(self._count(gr, k))
        return out

    def one_more_step(self, counts: list[int]) -> list[list[int]]:
        """Every count vector that removes one more rounding step from a single group."""
        out = []
        for i, gr in enumerate(self.groups):
            k = self._count(gr, counts[i] + gr.step)
            if k > counts[i]:
                out.append([*counts[:i], k, *counts[i + 1 :]])
        return out

    def mask(self, counts: list[int]) -> np.ndarray:
        """Removal mask (one bool per component) of the least important atoms per group;
        no tensor dimension loses every element (a group can span several layers, and one
        of them could otherwise lose all its channels)."""
        removed = np.zeros(self.ncomp, dtype=bool)
        for gr, k in zip(self.groups, counts, strict=True):
            removed[gr.atoms[:k]] = True
        gone = removed[self.g.comp]
        emptied = np.flatnonzero(np.minimum.reduceat(gone, self.starts))
        for s in emptied:
            comps = self.g.comp[self.starts[s] : self.starts[s] + self.sizes[s]]
            if removed[comps].all():
                removed[comps[np.argmax(self.scores[comps])]] = False
        return removed

    def removal(self, ratio: float) -> np.ndarray:
        return self.mask(self.counts(ratio))


class Estimator:
    """Fast MACs/params of the pruned model, from kept fractions of spaces: each node's MACs
    scale with the kept fraction of its output and of the space its rule says it contracts
    over."""

    def __init__(
        self, ir: GraphIR, g: ChannelGraph, macs: dict[str, int], rule_set: RuleSet
    ) -> None:
        self.g = g
        keys = list(g.spaces)
        self.index = {k: i for i, k in enumerate(keys)}
        self.starts = np.array([g.spaces[k][0] for k in keys], dtype=np.int64)
        self.sizes = np.array([g.spaces[k][1] for k in keys], dtype=np.int64)
        self.macs0 = sum(macs.values())
        self.params0 = ir.total_params()
        self.terms: list[tuple[int, list[int]]] = []
        for node in ir.graph.nodes:
            n_macs = macs.get(node.name, 0)
            if n_macs <= 0:
                continue
            spaces = [self.index[k] for k in self._out_keys(node) if k in self.index]
            rule = rule_set.find(node, g.module)
            c = rule.contracted(g, node) if rule is not None and rule.applies(node) else None
            if c is not None and c[0] == "p":
                c = ("p", g.canonical(c[1]), *c[2:])
            if c is not None and c in self.index:
                spaces.append(self.index[c])
            self.terms.append((n_macs, spaces))
        # parameters: numel and the spaces of each dim
        self.ptensors: list[tuple[int, list[int]]] = []
        named = dict(ir.gm.named_parameters())
        by_param: dict[str, list[int]] = {}
        for k, i in self.index.items():
            if k[0] == "p" and k[1] in named:
                by_param.setdefault(k[1], []).append(i)
        for name, idx in by_param.items():
            self.ptensors.append((named[name].numel(), idx))

    def _out_keys(self, node: fx.Node) -> list[SpaceKey]:
        v = val(node)
        if isinstance(v, list | tuple) and v and isinstance(v[0], torch.Tensor):
            # an attention module's (output, weights): the output's dims
            return [self.g.key(node, d, 0) for d in range(v[0].dim())]
        if isinstance(v, torch.Tensor):
            return [self.g.key(node, d) for d in range(v.dim())]
        return []

    def fractions(self, removed: np.ndarray) -> np.ndarray:
        gone = removed[self.g.comp].astype(np.int64)
        csum = np.concatenate([[0], np.cumsum(gone)])
        lost = csum[self.starts + self.sizes] - csum[self.starts]
        # empty tensors (an attention module's ``None`` weights) keep "all" of nothing
        return (self.sizes - lost) / np.maximum(self.sizes, 1) + (self.sizes == 0)

    def macs(self, removed: np.ndarray) -> float:
        f = self.fractions(removed)
        return float(sum(m * np.prod(f[s]) for m, s in self.terms))

    def params(self, removed: np.ndarray) -> float:
        f = self.fractions(removed)
        lost = sum(n * (1 - np.prod(f[s])) for n, s in self.ptensors)
        return float(self.params0 - lost)
