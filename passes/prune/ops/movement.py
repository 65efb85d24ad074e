"""Ops that move data without computing: reshapes, permutes, slices, concatenation, splits.

Permutations and row-major reshapes are mapped from their shapes alone; any other movement
(slices, strided indexing, ``expand``) by running the op on coordinate tensors. Their size
arguments (a ``view``'s shape, slice bounds, ``narrow``/``split`` sizes) are rewritten to
the kept counts.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from graphopt.fxutil import arg, int_arg, node_arg, set_arg

from ..graph import ChannelGraph, tensor_val, val
from .base import OpRule, Resize, concrete
from .pointwise import norm_dim

__all__ = ["Cat", "GetItem", "Move", "Roll", "Split", "Stack", "link_by_shape", "move"]

#: moves that only reorder dims, and moves that regroup dims in row-major order: mapped from
#: shapes alone (:func:`link_by_shape`)
_PERMUTES: set[Any] = {
    torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim, torch.t,
    "permute", "transpose", "swapaxes", "swapdims", "movedim", "t",
}  # fmt: skip
_RESHAPES: set[Any] = {
    torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze, "view",
    "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
}  # fmt: skip
_SIZE_METHODS = {"view", "reshape", "expand"}


class Move(OpRule):
    """Single-input ops that only move data (and ``nn.Flatten``/``nn.Unflatten``)."""

    functions = (
        torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim,
        torch.t, torch.reshape, torch.flatten, torch.unflatten, torch.squeeze,
        torch.unsqueeze, torch.narrow, torch.select, torch.tile, torch.repeat_interleave,
    )  # fmt: skip
    methods = (
        "permute", "transpose", "swapaxes", "swapdims", "movedim", "t", "view", "reshape",
        "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "view_as",
        "reshape_as", "narrow", "select", "tile", "repeat", "repeat_interleave",
    )  # fmt: skip
    modules = (nn.Flatten, nn.Unflatten)

    def applies(self, node: fx.Node) -> bool:
        # repeat_interleave with one count per element (a tensor) is not a fixed move
        if node.target in (torch.repeat_interleave, "repeat_interleave"):
            return not isinstance(val(arg(node, 1, "repeats")), torch.Tensor)
        return True

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        if node.op != "call_module":
            move(g, node)
        elif not link_by_shape(g, node, reshape=True):  # the modules are reshapes
            move(g, node, g.module(node))

    def resize(self, node: fx.Node, sizes: Resize) -> None:
        t = node.target
        if (node.op == "call_method" and t in _SIZE_METHODS) or t is torch.reshape:
            _rewrite_shape_args(node, sizes)
        elif t in (torch.narrow, "narrow"):
            _rewrite_narrow(node, sizes)
        elif t in (torch.unflatten, "unflatten"):
            _rewrite_unflatten(node, sizes)


class Roll(OpRule):
    """``torch.roll``: the rolled dims wrap around, so they stay whole (on a shorter dim the
    same shift would wrap other elements); the other dims pass through."""

    functions = (torch.roll,)
    methods = ("roll",)

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        src = node_arg(node)
        rank = val(src).dim()
        dims = concrete(arg(node, 2, "dims"))
        listed = [] if dims is None else list(dims) if isinstance(dims, list | tuple) else [dims]
        if not listed:
            g.freeze_node(node, "a roll of the flattened tensor moves elements across dims")
            return
        rolled = {norm_dim(int(d), rank) for d in listed}
        g.identity(src, node, [d for d in range(rank) if d not in rolled])
        for d in rolled:
            g.freeze(g.key(src, d), node, "a roll wraps this dimension around")
            g.freeze(g.key(node, d), node, "a roll wraps this dimension around")


class GetItem(OpRule):
    """``x[...]``: an item of a tuple, or a slice of a tensor (bounds rewritten); indexing
    with a tensor is not mapped."""

    functions = (operator.getitem,)

    def applies(self, node: fx.Node) -> bool:
        return isinstance(val(node.args[0]), list | tuple) or not _has_tensor_index(node.args[1])

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        src, k = node_arg(node), arg(node, 1, "index")
        if not isinstance(val(src), list | tuple):
            move(g, node)
            return
        v = val(node)
        if not isinstance(v, torch.Tensor):
            return
        for d in range(v.dim()):
            g.link(g.key(src, d, int(k)), g.key(node, d))

    def resize(self, node: fx.Node, sizes: Resize) -> None:
        if isinstance(val(node.args[0]), torch.Tensor):
            _rewrite_index(node, sizes)


class Cat(OpRule):
    """Concatenation: each input's channels at their offset in the output."""

    functions = (torch.cat, torch.concat, torch.concatenate)

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        tensors = arg(node, 0, "tensors")
        out = tensor_val(node)
        d = norm_dim(int(arg(node, 1, "dim", 0)), out.dim())
        offset = 0
        for t in tensors:
            v = val(t)
            if v.dim() == 1 and v.shape[0] == 0:
                continue  # legacy empty tensors are skipped by cat
            for i in range(out.dim()):
                if i == d:
                    n = v.shape[d]
                    g.link(g.key(t, d), g.key(node, d), None, np.arange(offset, offset + n))
                    offset += n
                else:
                    g.link(g.key(t, i), g.key(node, i))


class Stack(OpRule):
    """``torch.stack``: inputs' dims pass through, the new dim is frozen."""

    functions = (torch.stack,)

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        tensors = arg(node, 0, "tensors")
        out = tensor_val(node)
        d = norm_dim(int(arg(node, 1, "dim", 0)), out.dim())
        for t in tensors:
            for i in range(val(t).dim()):
                g.link(g.key(t, i), g.key(node, i if i < d else i + 1))
        g.freeze(g.key(node, d), node, "a stacked dimension")


class Split(OpRule):
    """``split``/``chunk``/``tensor_split``/``unbind``: each piece takes its range; equal
    pieces lose the same positions so they stay equal; split sizes are rewritten."""

    functions = (torch.split, torch.chunk, torch.tensor_split, torch.unbind)
    methods = ("split", "chunk", "tensor_split", "unbind")

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        src = node_arg(node)
        vin, parts = val(src), val(node)
        t = node.target
        name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
        if name == "unbind":
            d = norm_dim(int(arg(node, 1, "dim", 0)), vin.dim())
            g.freeze(g.key(src, d), node, "unbind removes this dimension")
            for k, _ in enumerate(parts):
                for i in range(vin.dim() - 1):
                    g.link(g.key(src, i if i < d else i + 1), g.key(node, i, k))
            return
        d = norm_dim(int(arg(node, 2, "dim", 0)), vin.dim())
        offset = 0
        sizes = [p.shape[d] for p in parts]
        explicit = name == "split" and isinstance(concrete(node.args[1]), list | tuple)
        for k, p in enumerate(parts):
            n = p.shape[d]
            for i in range(vin.dim()):
                if i == d:
                    g.link(g.key(src, d), g.key(node, d, k), np.arange(offset, offset + n))
                else:
                    g.link(g.key(src, i), g.key(node, i, k))
            offset += n
        if not explicit:
            # equal pieces are recomputed from the size: prune the same positions in each
            if len(set(sizes)) != 1 or name == "tensor_split":
                g.freeze(g.key(src, d), node, "unequal pieces cannot be resized")
                return
            n = sizes[0]
            for k in range(1, len(parts)):
                g.link(g.key(src, d), g.key(src, d), np.arange(n), np.arange(n) + k * n)

    def resize(self, node: fx.Node, sizes: Resize) -> None:
        if node.target not in (torch.split, "split"):
            return
        name = "split_size" if "split_size" in node.kwargs else "split_size_or_sections"
        split = arg(node, 1, name)
        src = node_arg(node)
        dim = int(arg(node, 2, "dim", 0)) % val(src).dim()
        if isinstance(split, list | tuple):
            new: Any = type(split)(sizes.dim(node, dim, k) for k in range(len(split)))
        else:  # equal pieces: the same positions go from each, so the first piece's size
            new = sizes.dim(node, dim, 0)
            if isinstance(split, fx.Node) and new == val(node)[0].shape[dim]:
                return
        set_arg(node, 1, name, new)


# -- mapping moves ------------------------------------------------------------------------------


def move(g: ChannelGraph, node: fx.Node, fn: Callable[[torch.Tensor], Any] | None = None) -> None:
    """Link pure data movement: permutations and reshapes from the shapes alone, anything
    else (or ``fn``, the op as a function of its input) by running it on coordinates."""
    if fn is None and link_by_shape(g, node):
        return
    link_by_coordinates(g, node, fn)


def link_by_shape(g: ChannelGraph, node: fx.Node, *, reshape: bool = False) -> bool:
    """Link a permutation or a row-major reshape (view, reshape, flatten, unflatten,
    squeeze, unsqueeze) as :func:`link_by_coordinates` would, from shapes alone (the
    coordinate run moves every element, millions in window attention); False when ``node``
    is neither. ``reshape`` says it is a reshape (a module such as nn.Flatten, whose target
    is its path)."""
    src, t = node.args[0], node.target
    if node.op == "call_module" and not reshape:
        return False
    vin, vout = val(src), val(node)
    if not isinstance(vin, torch.Tensor) or not isinstance(vout, torch.Tensor):
        return False
    if vin.numel() != vout.numel() or vin.dtype != vout.dtype or vin.dim() * vout.dim() == 0:
        return False
    assert isinstance(src, fx.Node)
    if not reshape and t in _PERMUTES:
        # on a contiguous input the output's strides name the input dim of each output dim
        base = torch.empty(vin.shape, dtype=vin.dtype, device="meta")
        probe = _call(node, base)
        stride_of = {base.stride(d): d for d in range(vin.dim()) if vin.shape[d] > 1}
        for out_dim in range(vout.dim()):
            if vout.shape[out_dim] > 1:
                g.link(g.key(src, stride_of[probe.stride(out_dim)]), g.key(node, out_dim))
        return True
    if not reshape and t not in _RESHAPES:
        return False
    for ins, outs in _reshape_blocks(list(vin.shape), list(vout.shape)):
        # where one side is a single dim, link it with the largest dim of the other side
        # (or with the one indexing attention heads, when whole heads go), so removals stay
        # product sets of the factors and the reshape remains valid; every other factor
        # (all of them, if both sides have several) is regrouped
        d: int | None = None
        e: int | None = None
        if len(ins) == 1 or len(outs) == 1:
            d = _widest(g, src, ins, vin.shape)
            e = _widest(g, node, outs, vout.shape)
            if len(ins) == 1:  # input index i sits at this index along e
                ia = np.arange(vin.shape[d])
                ib = _factor_index(ia, [vout.shape[k] for k in outs], outs.index(e))
            else:  # output index j came from this index along d
                ib = np.arange(vout.shape[e])
                ia = _factor_index(ib, [vin.shape[k] for k in ins], ins.index(d))
            g.link(g.key(src, d), g.key(node, e), ia, ib)
        for k in ins:
            if k != d:
                g.freeze(g.key(src, k), node, "a reshape regroups this dimension")
        for k in outs:
            if k != e:
                g.freeze(g.key(node, k), node, "a reshape regroups this dimension")
    return True


def _widest(g: ChannelGraph, node: fx.Node, dims: list[int], shape: Any) -> int:
    """The dim of ``dims`` that a reshape links across: one indexing attention heads if
    any (``g.heads``), else the largest."""
    heads = [d for d in dims if g.key(node, d) in g.heads]
    return heads[0] if heads else max(dims, key=lambda i: (shape[i], -i))


def link_by_coordinates(
    g: ChannelGraph, node: fx.Node, fn: Callable[[torch.Tensor], Any] | None = None
) -> None:
    """Compute the index mapping of a move by running it on coordinate tensors."""
    src = node_arg(node)
    if fn is None:
        fn = lambda c: _call(node, c)  # noqa: E731
    vin, vout = val(src), val(node)
    if node.target is operator.getitem:
        strided, computed = _unresizable_slices(node.args[1], vin.dim())
        for d in strided:
            g.freeze(g.key(src, d), node, "a strided slice cannot be re-sliced")
        for d in computed:
            g.freeze(g.key(src, d), node, "a slice bound computed in the graph cannot be rewritten")
    if vin.dim() == 0 or vout.dim() == 0:
        return
    coords = [
        torch.arange(n).view([-1 if i == d else 1 for i in range(vin.dim())]).expand(vin.shape)
        for d, n in enumerate(vin.shape)
    ]
    maps = [fn(c.contiguous()) for c in coords]
    # which output dims each input coordinate varies along
    varies = [
        [e for e in range(vout.dim()) if vout.shape[e] > 1 and bool((m != m.narrow(e, 0, 1)).any())]
        for m in maps
    ]
    in_dims = [d for d in range(vin.dim()) if vin.shape[d] > 1]
    covered_in: set[int] = set()
    covered_out: set[int] = set()
    # connected blocks of (input dims, output dims) that exchange coordinates
    pending = set(in_dims)
    while pending:
        d0 = pending.pop()
        block_in, block_out, frontier = {d0}, set(varies[d0]), [d0]
        while frontier:
            frontier.pop()
            for d in list(pending):
                if set(varies[d]) & block_out:
                    pending.discard(d)
                    block_in.add(d)
                    block_out |= set(varies[d])
                    frontier.append(d)
        if not block_out:
            continue
        if len(block_in) > 1 and len(block_out) > 1:
            continue  # an unfactorable regrouping: leave both sides uncovered (frozen)
        # one side is a single dim: link it with the largest dim of the other side, so
        # removals stay product sets of the factors and the reshape remains valid
        d = max(block_in, key=lambda i: (vin.shape[i], -i))
        e = max(block_out, key=lambda i: (vout.shape[i], -i))
        m = maps[d]
        pos = (
            torch.arange(vout.shape[e])
            .view([-1 if i == e else 1 for i in range(vout.dim())])
            .expand(vout.shape)
        )
        # which (input index, output index) pairs occur: a table, not a sort of every
        # element, since window partitions move millions of elements
        seen = np.zeros((vin.shape[d], vout.shape[e]), dtype=bool)
        seen[m.reshape(-1).numpy(), pos.reshape(-1).numpy()] = True
        ia, ib = np.nonzero(seen)
        g.link(g.key(src, d), g.key(node, e), ia, ib)
        covered_in.add(d)
        covered_out.add(e)
    for d in in_dims:
        if d not in covered_in:
            g.freeze(g.key(src, d), node, "a reshape regroups this dimension")
    for e in range(vout.dim()):
        if vout.shape[e] > 1 and e not in covered_out:
            g.freeze(g.key(node, e), node, "a reshape regroups this dimension")


def _call(node: fx.Node, first: Any) -> Any:
    """Run ``node``'s op with ``first`` as its data input and propagated values elsewhere."""
    rest = fx.node.map_aggregate(concrete(node.args[1:]), _zeros_like_fake)
    kwargs = fx.node.map_aggregate(concrete(node.kwargs), _zeros_like_fake)
    if node.op == "call_method":
        return getattr(first, str(node.target))(*rest, **kwargs)
    fn: Any = node.target
    return fn(first, *rest, **kwargs)


def _zeros_like_fake(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return torch.zeros(a.shape, dtype=torch.int64)
    return a


def _reshape_blocks(a: list[int], b: list[int]) -> list[tuple[list[int], list[int]]]:
    """The finest pairing of dims of shape ``a`` with dims of shape ``b`` (same numel) whose
    products agree, as a row-major reshape from ``a`` to ``b`` groups them; size-1 dims are
    left out."""
    ia = [d for d, n in enumerate(a) if n > 1]
    ib = [e for e, n in enumerate(b) if n > 1]
    blocks = []
    i = j = 0
    while i < len(ia) and j < len(ib):
        ins, outs = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                ins.append(ia[i])
                pa *= a[ia[i]]
                i += 1
            else:
                outs.append(ib[j])
                pb *= b[ib[j]]
                j += 1
        blocks.append((ins, outs))
    return blocks


def _factor_index(flat: np.ndarray, sizes: list[int], k: int) -> np.ndarray:
    """Index along factor ``k`` of positions ``flat`` in a row-major block of ``sizes``."""
    inner = int(np.prod(sizes[k + 1 :], dtype=np.int64))
    return (flat // inner) % sizes[k]


def _has_tensor_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    for it in items:
        if isinstance(it, fx.Node) and isinstance(val(it), torch.Tensor):
            return True
        if isinstance(it, list | torch.Tensor):
            return True
    return False


def _unresizable_slices(index: Any, rank: int) -> tuple[list[int], list[int]]:
    """Source dims an index slices with a step other than 1, and those it slices with a
    bound computed in the graph (``x[..., :h]`` with ``h = y.shape[2]``)."""
    items = index if isinstance(index, tuple) else (index,)
    explicit = sum(1 for it in items if it is not None and it is not Ellipsis)
    strided, computed, d = [], [], 0
    for it in items:
        if it is Ellipsis:
            d += rank - explicit
        elif it is not None:
            if isinstance(it, slice) and it.step not in (None, 1):
                strided.append(d)
            if isinstance(it, slice) and not _literal(it):
                computed.append(d)
            d += 1
    return strided, computed


def _literal(s: slice) -> bool:
    return all(b is None or isinstance(b, int) for b in (s.start, s.stop, s.step))


# -- rewriting size arguments -------------------------------------------------------------------


def _new_literal(old: Any, node: fx.Node, d: int, sizes: Resize) -> Any:
    """The size argument for output dim ``d``: the kept count where ``d`` shrinks (a size
    computed in the graph, say ``c // heads``, would be computed from another tensor)."""
    new = sizes.dim(node, d)
    if old == -1 or (isinstance(old, fx.Node) and new == val(node).shape[d]):
        return old
    return new if isinstance(old, int | fx.Node) else old


def _rewrite_shape_args(node: fx.Node, sizes: Resize) -> None:
    args: list[Any] = list(node.args)
    packed = len(args) == 2 and isinstance(args[1], list | tuple)
    shape = list(args[1]) if packed else args[1:]
    if node.target == "expand":
        # expand keeps broadcast dims at their literal size; only real dims shrink
        src = val(node.args[0])
        lead = len(shape) - src.dim()
        new = [
            _new_literal(s, node, d, sizes) if d >= lead and src.shape[d - lead] != 1 else s
            for d, s in enumerate(shape)
        ]
    else:
        new = [_new_literal(s, node, d, sizes) for d, s in enumerate(shape)]
    node.args = (args[0], type(args[1])(new)) if packed else (args[0], *new)


def _rewrite_index(node: fx.Node, sizes: Resize) -> None:
    src, index = node.args
    assert isinstance(src, fx.Node)
    items = index if isinstance(index, tuple) else (index,)
    rank = val(src).dim()
    explicit = sum(1 for it in items if it is not None and it is not Ellipsis)
    d = 0
    new_items: list[Any] = []
    for it in items:
        if it is Ellipsis:
            d += rank - explicit
            new_items.append(it)
            continue
        if it is None:
            new_items.append(it)
            continue
        if isinstance(it, slice) and (it.start is not None or it.stop is not None) and _literal(it):
            # (a computed bound's dim was frozen by the analysis: it keeps its size)
            size = val(src).shape[d]
            start, stop, _ = it.indices(size)
            it = slice(
                sizes.kept_before(src, d, start) if it.start is not None else None,
                sizes.kept_before(src, d, stop) if it.stop is not None else None,
                it.step,
            )
        new_items.append(it)
        d += 1
    node.args = (src, tuple(new_items) if isinstance(index, tuple) else new_items[0])


def _rewrite_narrow(node: fx.Node, sizes: Resize) -> None:
    src = node_arg(node)
    d = int_arg(node, 1, "dim") % val(src).dim()
    if not sizes.changed(src, d):  # e.g. a token model's positions cut to a free length
        return
    start = int_arg(node, 2, "start")
    length = int_arg(node, 3, "length")
    new_start = sizes.kept_before(src, d, start)
    set_arg(node, 2, "start", new_start)
    set_arg(node, 3, "length", sizes.kept_before(src, d, start + length) - new_start)


def _rewrite_unflatten(node: fx.Node, sizes: Resize) -> None:
    src = node_arg(node)
    dim = int_arg(node, 1, "dim") % val(src).dim()
    shape = arg(node, 2, "sizes")
    new = [_new_literal(s, node, dim + i, sizes) for i, s in enumerate(shape)]
    set_arg(node, 2, "sizes", type(shape)(new))
