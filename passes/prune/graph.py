"""The element graph: every dimension of every tensor as a space of elements, and the links
and freezes the op rules declare between them.

Every dimension of every tensor in the graph (activations, parameters, buffers) is a
*space* of ``size`` elements, one per index, numbered consecutively as spaces are first
used. An op rule (:mod:`.ops`) *links* elements that must be removed together (an
elementwise op identifies its inputs' channels with its output's, ``cat`` offsets them …)
and *freezes* elements it cannot map; it also names the parameter spaces that hold a
layer's output channels (*producers*), the ones it contracts over (*consumers*) and
normalisation scales. :func:`.solve.solve` turns the links into atoms and groups.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from graphopt import GraphIR

__all__ = ["ChannelGraph", "Freeze", "SpaceKey", "distinct", "tensor_val", "val"]

#: ("n", node name, tuple item or None, dim) for activations; ("p", qualified name, dim)
#: for parameters and buffers (a ``get_attr`` node's dims are its tensor's dims)
SpaceKey = tuple[Any, ...]


def val(node: Any) -> Any:
    """The value propagated for ``node`` (``meta["val"]``: a fake or meta tensor, a tuple
    of them, a number …); None for anything that is not a node."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def tensor_val(node: Any) -> torch.Tensor:
    """The propagated tensor of ``node``; TypeError if its value is not one tensor."""
    v = val(node)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{getattr(node, 'name', node)} does not hold a tensor")
    return v


def distinct(a: np.ndarray) -> np.ndarray:
    """The sorted distinct values of ``a`` (numpy 2's hashing ``np.unique`` is several times
    slower than a sort on the id arrays here)."""
    a = np.sort(a, axis=None)
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if len(a) else a


@dataclass
class Freeze:
    """Elements that must stay, the node that froze them, and why."""

    elements: np.ndarray
    node: str
    reason: str


_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass
class ChannelGraph:
    """The element graph of one IR and, once :func:`.solve.solve` ran, its atoms and
    groups (``comp``, ``frozen``, ``prunable``, ``group_of``, ``space_of``)."""

    ir: GraphIR
    #: nn.MultiheadAttention loses whole heads rather than positions inside every head
    whole_heads: bool = False
    #: spaces that index attention heads (found by a first analysis, see ``deps.analyse``):
    #: a reshape splitting channels into (heads, head size) links them with whole heads
    heads: frozenset[SpaceKey] = frozenset()
    spaces: dict[SpaceKey, tuple[int, int]] = field(default_factory=dict)
    total: int = 0
    edges: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    freezes: list[Freeze] = field(default_factory=list)
    #: param spaces holding output channels of a weighted layer (they make atoms prunable)
    producers: set[SpaceKey] = field(default_factory=set)
    #: param spaces a weighted layer contracts over (its input channels)
    consumers: set[SpaceKey] = field(default_factory=set)
    #: param spaces of normalisation scales (BN/LN/GN γ): the bn_scale criterion reads them
    norm_scales: set[SpaceKey] = field(default_factory=set)
    #: producer param spaces → name of the layer that owns them (for reports and ignore)
    owner: dict[SpaceKey, str] = field(default_factory=dict)
    # filled by solve(): per element, its component; per component, the flags below
    comp: np.ndarray = field(default_factory=lambda: _EMPTY)
    frozen: np.ndarray = field(default_factory=lambda: _EMPTY.astype(bool))
    has_producer: np.ndarray = field(default_factory=lambda: _EMPTY.astype(bool))
    prunable: np.ndarray = field(default_factory=lambda: _EMPTY.astype(bool))
    #: group id per component (-1 if not prunable)
    group_of: np.ndarray = field(default_factory=lambda: _EMPTY)
    #: index (in ``spaces`` order) of each element's space
    space_of: np.ndarray = field(default_factory=lambda: _EMPTY)
    _tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _nodes: dict[str, fx.Node] = field(default_factory=dict, repr=False)
    _modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    #: every other name of a tensor reachable by several (tied weights: a language model's
    #: head and its token embedding), by the name its spaces go by
    aliases: dict[str, list[str]] = field(default_factory=dict)
    _canonical: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._nodes = {n.name: n for n in self.ir.graph.nodes}
        gm = self.ir.gm
        first: dict[int, str] = {}
        named = [
            *gm.named_parameters(remove_duplicate=False),
            *gm.named_buffers(remove_duplicate=False),
        ]
        for name, t in named:
            owner = first.setdefault(id(t), name)
            if owner != name:  # a tied tensor: one set of spaces under its first name
                self._canonical[name] = owner
                self.aliases.setdefault(owner, []).append(name)

    def canonical(self, qualname: str) -> str:
        """The name the spaces of the tensor at ``qualname`` go by (its first name, when
        the tensor is tied to others)."""
        return self._canonical.get(qualname, qualname)

    # -- spaces ---------------------------------------------------------------------------

    def key(self, node: fx.Node, dim: int, item: int | None = None) -> SpaceKey:
        """The space of dim ``dim`` of ``node``'s value (of its ``item``-th tensor if it is
        a tuple)."""
        if node.op == "get_attr":
            return ("p", self.canonical(str(node.target)), dim)
        if item is not None and item < 0:  # x[-1] of a tuple is its last item's space
            item += len(val(node))
        return ("n", node.name, item, dim)

    def param_key(self, module_path: str, pname: str, dim: int) -> SpaceKey:
        """The space of dim ``dim`` of parameter (or buffer) ``pname`` of a submodule."""
        return ("p", self.canonical(f"{module_path}.{pname}" if module_path else pname), dim)

    def attr_key(self, node: Any, dim: int) -> SpaceKey | None:
        """The space of a weight passed as a ``get_attr`` node (None if it is absent);
        ValueError if the weight is computed in the graph."""
        if node is None:
            return None
        if not (isinstance(node, fx.Node) and node.op == "get_attr"):
            raise ValueError("its weight is computed, not a parameter")
        return ("p", self.canonical(str(node.target)), dim)

    def arg_key(self, node: Any, dim: int) -> SpaceKey | None:
        """The space of dim ``dim`` of a tensor argument, stored (a ``get_attr`` node: its
        parameter's space) or computed in the graph (a standardised weight: the computed
        tensor's space, which the ops computing it link back to the parameter); None if
        the argument is absent."""
        if node is None:
            return None
        if not isinstance(node, fx.Node):
            raise ValueError("a tensor argument is not a tensor of the graph")
        return self.key(node, dim)

    def weight_key(self, node: Any, dim: int) -> SpaceKey:
        """:meth:`attr_key` of a weight that must be there."""
        key = self.attr_key(node, dim)
        if key is None:
            raise ValueError("it has no weight")
        return key

    def size_of(self, key: SpaceKey) -> int:
        if key[0] == "p":
            return int(self.tensor(key[1]).shape[key[2]])
        v = val(self._nodes[key[1]])
        if key[2] is not None:
            v = v[key[2]]
        return int(v.shape[key[3]])

    def rank_of(self, key: SpaceKey) -> int:
        """The number of dims of the tensor ``key`` is a dim of."""
        if key[0] == "p":
            return self.tensor(key[1]).dim()
        v = val(self._nodes[key[1]])
        return int((v if key[2] is None else v[key[2]]).dim())

    def tensor(self, qualname: str) -> torch.Tensor:
        """The parameter or buffer at ``qualname`` (looked up once: the IR is not edited
        while its graph is in use)."""
        found = self._tensors.get(qualname)
        if found is None:
            found = self._tensors[qualname] = self.ir.fetch(qualname)
        return found

    def module(self, node: fx.Node) -> nn.Module:
        """The submodule a ``call_module`` node calls (looked up once)."""
        found = self._modules.get(node.name)
        if found is None:
            found = self._modules[node.name] = self.ir.module(node)
        return found

    def ids(self, key: SpaceKey, idx: Any = None) -> np.ndarray:
        """Global element ids of a space (allocated on first use)."""
        if key not in self.spaces:
            self.spaces[key] = (self.total, self.size_of(key))
            self.total += self.spaces[key][1]
        start, size = self.spaces[key]
        return start + (np.arange(size) if idx is None else np.asarray(idx, dtype=np.int64))

    def tensor_keys(self, node: fx.Node) -> list[SpaceKey]:
        """The spaces of every dim of every tensor ``node`` produces."""
        v = val(node)
        if isinstance(v, torch.Tensor):
            return [self.key(node, d) for d in range(v.dim())]
        if isinstance(v, list | tuple):
            return [
                self.key(node, d, i)
                for i, t in enumerate(v)
                if isinstance(t, torch.Tensor)
                for d in range(t.dim())
            ]
        return []

    # -- links and freezes ------------------------------------------------------------------

    def link(
        self,
        a: SpaceKey,
        b: SpaceKey,
        ia: np.ndarray | None = None,
        ib: np.ndarray | None = None,
    ) -> None:
        """Identify element ``ia[k]`` of space ``a`` with element ``ib[k]`` of space ``b``
        (every element, in order, where an index array is None)."""
        ea, eb = self.ids(a, ia), self.ids(b, ib)
        if len(ea) != len(eb):
            raise ValueError(f"cannot link {a} and {b}: {len(ea)} vs {len(eb)} elements")
        self.edges.append((ea, eb))

    def identity(self, src: fx.Node, node: fx.Node, dims: Iterable[int] | None = None) -> None:
        """Link dims ``dims`` (all, by default) of ``src`` with the same dims of ``node``."""
        for d in range(val(node).dim()) if dims is None else dims:
            self.link(self.key(src, d), self.key(node, d))

    def freeze(self, key: SpaceKey, node: fx.Node, reason: str, idx: Any = None) -> None:
        """Keep the elements ``idx`` (all, by default) of space ``key`` whole, because of
        ``node``."""
        self.freezes.append(Freeze(self.ids(key, idx), node.name, reason))

    def freeze_node(self, node: fx.Node, reason: str) -> None:
        """Freeze every dimension of every tensor ``node`` reads or produces."""
        for src in [*node.all_input_nodes, node]:
            for key in self.tensor_keys(src):
                self.freeze(key, node, reason)

    def freeze_params(self, node: fx.Node, reason: str) -> None:
        """Freeze ``node`` and, if it calls a module, every dim of that module's own
        parameters."""
        if node.op == "call_module":
            for pname, p in self.module(node).named_parameters(recurse=False):
                for d in range(p.dim()):
                    self.freeze(self.param_key(str(node.target), pname, d), node, reason)
        self.freeze_node(node, reason)

    def produces(self, key: SpaceKey, owner: str) -> None:
        """Mark param space ``key`` as the output channels of layer ``owner``."""
        self.producers.add(key)
        self.owner[key] = owner

    # -- queries once solved ----------------------------------------------------------------

    def spaces_touching(self, flags: np.ndarray) -> list[tuple[SpaceKey, int, int]]:
        """``(key, start, size)`` of every space with an element in a flagged component
        (``flags``: one bool per component), in ``spaces`` order."""
        hit = np.concatenate([[0], np.cumsum(flags[self.comp], dtype=np.int64)])
        items = list(self.spaces.items())
        starts = np.fromiter((v[0] for _, v in items), np.int64, len(items))
        ends = starts + np.fromiter((v[1] for _, v in items), np.int64, len(items))
        return [
            (items[i][0], *items[i][1]) for i in np.flatnonzero(hit[ends] > hit[starts])
        ]  # fmt: skip
