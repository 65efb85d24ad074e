"""Solving the element graph: atoms, which of them can go, and the groups they form.

The connected components of the element graph are *atoms*: sets of channel indices that
can only be removed all at once. An atom is prunable when it contains an output channel of
a weighted layer (a producer space) and no frozen element. Prunable atoms that share a
space form a *group* (one coupled set of layers), the unit of per-layer ratios and
rounding.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .graph import ChannelGraph, distinct

__all__ = ["components", "solve"]


def solve(g: ChannelGraph) -> None:
    """Fill in ``g``'s atoms (``comp``), their flags and their groups from its links and
    freezes; run again after more is frozen."""
    n = g.total
    comp = components(g)
    g.comp = comp
    ncomp = int(comp.max()) + 1 if n else 0
    frozen = np.zeros(ncomp, dtype=bool)
    if g.freezes:
        frozen[comp[np.concatenate([f.elements for f in g.freezes])]] = True
    has_producer = np.zeros(ncomp, dtype=bool)
    made = [g.ids(key) for key in g.producers if key in g.spaces]
    if made:
        has_producer[comp[np.concatenate(made)]] = True
    g.frozen = frozen
    g.has_producer = has_producer
    g.prunable = has_producer & ~frozen
    g.space_of, g.group_of = _groups(g, comp, ncomp)


def components(g: ChannelGraph) -> np.ndarray:
    """The connected component of every element of ``g`` under its links."""
    n = g.total
    if g.edges:
        a = np.concatenate([e[0] for e in g.edges])
        b = np.concatenate([e[1] for e in g.edges])
    else:
        a = b = np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _groups(g: ChannelGraph, comp: np.ndarray, ncomp: int) -> tuple[np.ndarray, np.ndarray]:
    """Each element's space, and each component's group: prunable atoms sharing a space
    (one edge per distinct atom-space pair)."""
    nspaces = len(g.spaces)
    sizes = np.fromiter((size for _, size in g.spaces.values()), np.int64, nspaces)
    space_of = np.repeat(np.arange(nspaces), sizes)
    atom_ids = np.flatnonzero(g.prunable)
    index = -np.ones(ncomp, dtype=np.int64)
    index[atom_ids] = np.arange(len(atom_ids))
    m = len(atom_ids)
    of_element = index[comp]
    inside = of_element >= 0
    pairs = distinct(of_element[inside] * nspaces + space_of[inside])
    r, c = pairs // max(nspaces, 1), pairs % max(nspaces, 1)
    bip = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c + m)), shape=(m + nspaces,) * 2)
    _, labels = connected_components(bip, directed=False)
    group_of = -np.ones(ncomp, dtype=np.int64)
    if m:
        _, compact = np.unique(labels[:m], return_inverse=True)
        group_of[atom_ids] = compact
    return space_of, group_of
