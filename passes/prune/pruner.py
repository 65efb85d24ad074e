"""Physical removal: slice parameters, update module attributes and size literals.

Given the channel graph and the set of atoms to remove, every space with a removed element
gets a keep mask. Parameters and buffers are sliced along their masked dims, modules get
their cached sizes (``out_channels``, ``num_features``, ``groups`` …) recomputed, and size
literals in the graph (``view``/``reshape`` sizes, slice bounds, ``split`` sizes,
``layer_norm`` shapes) are rewritten from the kept counts. The result is checked by
re-running the graph on fake tensors; a node that no longer fits is reported back so the
caller can freeze it and try again.
"""

from __future__ import annotations

import math
import operator
import sys
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphopt import GraphIR
from graphopt.analyses import MACS, run_counting
from graphopt.ir import store_tensor

from .deps import ChannelGraph, SpaceKey, _arg, _val

__all__ = ["ResizeFailed", "apply_removal", "keep_masks", "known_macs", "light_copy", "observe"]


class ResizeFailed(Exception):
    """The resized graph no longer runs at ``node`` (the caller freezes it and retries)."""

    def __init__(self, node: fx.Node, cause: BaseException) -> None:
        super().__init__(f"{node.name}: {cause}")
        self.node = node
        self.cause = cause


def keep_masks(g: ChannelGraph, removed: np.ndarray) -> dict[SpaceKey, np.ndarray]:
    """Keep mask of every space that loses at least one element."""
    assert g.comp is not None
    return {
        key: ~removed[g.comp[start : start + size]]
        for key, start, size in g.spaces_touching(removed)
    }


class _Sizes:
    """New sizes of activation dims, read from keep masks (unchanged when not masked)."""

    def __init__(self, g: ChannelGraph, masks: dict[SpaceKey, np.ndarray]) -> None:
        self.g = g
        self.masks = masks

    def dim(self, node: fx.Node, d: int, item: int | None = None) -> int:
        key = self.g.key(node, d, item)
        if key in self.masks:
            return int(self.masks[key].sum())
        val = _val(node)
        if item is not None:
            val = val[item]
        return int(val.shape[d])

    def kept_before(self, node: fx.Node, d: int, index: int) -> int:
        key = self.g.key(node, d)
        if key not in self.masks:
            return index
        return int(self.masks[key][:index].sum())


def apply_removal(ir: GraphIR, g: ChannelGraph, removed: np.ndarray) -> dict[str, int]:
    """Remove the atoms flagged in ``removed`` (one bool per component) from ``ir``; return
    the MACs of each node of the result (see :func:`observe`)."""
    masks = keep_masks(g, removed)
    sizes = _Sizes(g, masks)
    _slice_tensors(ir, masks)
    for node in list(ir.graph.nodes):
        if node.op == "call_module":
            _update_module(ir.module(node), node, sizes)
        elif node.op in ("call_function", "call_method"):
            _rewrite_literals(node, sizes)
    for node in list(ir.graph.nodes):
        _pin_size_read(node, g, masks)
    ir.gm.recompile()
    ir.invalidate()
    return observe(ir)


def _slice_tensors(ir: GraphIR, masks: dict[SpaceKey, np.ndarray]) -> None:
    by_name: dict[str, dict[int, np.ndarray]] = {}
    for key, mask in masks.items():
        if key[0] == "p":
            by_name.setdefault(key[1], {})[key[2]] = mask
    for qualname, dims in by_name.items():
        new = ir.fetch(qualname).detach()
        for d, mask in sorted(dims.items()):
            new = new.index_select(d, torch.from_numpy(np.flatnonzero(mask)))
        store_tensor(ir.gm, qualname, new)


def _update_module(m: nn.Module, node: fx.Node, sizes: _Sizes) -> None:
    x = node.args[0] if node.args else None
    if isinstance(m, nn.modules.conv._ConvNd):
        spatial = m.weight.dim() - 2
        cd = _val(x).dim() - spatial - 1
        new_in = sizes.dim(x, cd)
        if m.transposed:
            m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
        else:
            if m.groups > 1:
                per_group_out = m.out_channels // m.groups
                m.groups = m.weight.shape[0] // per_group_out
            m.out_channels = m.weight.shape[0]
            m.in_channels = new_in
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        m.num_features = sizes.dim(node, 1 if _val(node).dim() > 1 else 0)
    elif isinstance(m, nn.GroupNorm):
        new_c = sizes.dim(node, 1)
        m.num_groups = new_c // (m.num_channels // m.num_groups)
        m.num_channels = new_c
    elif isinstance(m, nn.LayerNorm):
        rank, k = _val(node).dim(), len(m.normalized_shape)
        m.normalized_shape = tuple(sizes.dim(node, d) for d in range(rank - k, rank))
    elif isinstance(m, nn.PReLU):
        m.num_parameters = m.weight.numel()
    elif isinstance(m, nn.Embedding):
        m.embedding_dim = m.weight.shape[1]
    elif isinstance(m, nn.MultiheadAttention):
        _update_mha(m, sizes.g.whole_heads)


def _update_mha(m: nn.MultiheadAttention, whole_heads: bool) -> None:
    inner = m.in_proj_weight.shape[0] // 3
    if inner == m.embed_dim:
        return
    if whole_heads:  # fewer heads of the same size: the 1/sqrt(head_dim) scale holds
        m.num_heads = inner // m.head_dim
    else:
        new_hd = inner // m.num_heads
        _rescale_queries(m.in_proj_weight, m.in_proj_bias, inner, new_hd / m.head_dim)
        m.head_dim = new_hd
    m.embed_dim = m.kdim = m.vdim = inner
    m.out_proj.out_features, m.out_proj.in_features = m.out_proj.weight.shape


def _rescale_queries(
    weight: torch.Tensor, bias: torch.Tensor | None, inner: int, shrink: float
) -> None:
    """Attention scaled by ``1/sqrt(head_dim)`` recomputed from the new head size: scale the
    query rows by ``sqrt(new/old)`` so the logits stay what they were."""
    with torch.no_grad():
        weight[:inner] *= math.sqrt(shrink)
        if bias is not None:
            bias[:inner] *= math.sqrt(shrink)


def _is_swin_attention(target: Any) -> bool:
    """Whether ``target`` is torchvision's shifted-window attention (looked up only when
    torchvision is imported, which a model calling it has done)."""
    if "torchvision" not in sys.modules:
        return False
    from torchvision.models.swin_transformer import shifted_window_attention

    return target is shifted_window_attention


_SIZE_METHODS = {"view", "reshape", "expand"}


def _rewrite_literals(node: fx.Node, sizes: _Sizes) -> None:
    t = node.target
    if (node.op == "call_method" and t in _SIZE_METHODS) or t is torch.reshape:
        _rewrite_shape_args(node, sizes)
    elif t is operator.getitem and isinstance(_val(node.args[0]), torch.Tensor):
        _rewrite_index(node, sizes)
    elif t in (torch.narrow, "narrow"):
        _rewrite_narrow(node, sizes)
    elif t in (torch.split, "split"):
        _rewrite_split(node, sizes)
    elif t in (torch.unflatten, "unflatten"):
        _rewrite_unflatten(node, sizes)
    elif t is F.layer_norm:
        rank = _val(node).dim()
        k = len(_arg(node, 1, "normalized_shape"))
        shape = [sizes.dim(node, d) for d in range(rank - k, rank)]
        _set_arg(node, 1, "normalized_shape", shape)
    elif t is F.group_norm:
        groups = int(_arg(node, 1, "num_groups"))
        old_c = _val(node).shape[1]
        _set_arg(node, 1, "num_groups", sizes.dim(node, 1) // (old_c // groups))
    elif t is F.scaled_dot_product_attention:
        _pin_attention_scale(node, sizes)
    elif _is_swin_attention(t):
        _swin_queries(node, sizes)
    elif t in (F.conv1d, F.conv2d, F.conv3d):
        groups = _arg(node, 6, "groups", 1)
        if isinstance(groups, int) and groups > 1:
            old_c = _val(node).shape[1]
            _set_arg(node, 6, "groups", sizes.dim(node, 1) // (old_c // groups))


def _swin_queries(node: fx.Node, sizes: _Sizes) -> None:
    x = node.args[0]
    d = _val(x).dim() - 1
    old, new = _val(x).shape[d], sizes.dim(x, d)
    if old == new or _arg(node, 11, "logit_scale") is not None:
        return  # Swin V2's cosine attention has no head-size scale
    gm = node.graph.owning_module
    assert gm is not None
    weight = gm.get_parameter(str(_arg(node, 1, "qkv_weight").target))
    bias_node = _arg(node, 9, "qkv_bias")
    bias = gm.get_parameter(str(bias_node.target)) if bias_node is not None else None
    _rescale_queries(weight, bias, new, new / old)


def _pin_attention_scale(node: fx.Node, sizes: _Sizes) -> None:
    """The default scale is 1/sqrt(head dim): keep the old one when the head dim shrinks."""
    q = node.args[0]
    d = _val(q).dim() - 1
    old = _val(q).shape[d]
    if _arg(node, 6, "scale") is None and sizes.dim(q, d) != old:
        node.kwargs = {**node.kwargs, "scale": 1 / math.sqrt(old)}


def _size_read(node: fx.Node) -> tuple[fx.Node, int] | None:
    """``(tensor, dim)`` when ``node`` reads one size of a tensor (``x.size(1)``,
    ``x.shape[1]``, ``x.size()[1]``)."""
    if node.op == "call_method" and node.target == "size" and len(node.args) + len(node.kwargs) > 1:
        src, dim = node.args[0], _arg(node, 1, "dim")
    elif node.op == "call_function" and node.target is operator.getitem:
        shape, dim = node.args
        if not isinstance(shape, fx.Node):
            return None
        is_shape = (
            shape.op == "call_function" and shape.target is getattr and shape.args[1] == "shape"
        )
        is_size = shape.op == "call_method" and shape.target == "size" and len(shape.args) == 1
        if not (is_shape or is_size) or shape.kwargs:
            return None
        src = shape.args[0]
    else:
        return None
    val = _val(src) if isinstance(src, fx.Node) else None
    if not isinstance(dim, int) or not isinstance(val, torch.Tensor):
        return None
    return src, dim % val.dim()


def _pin_size_read(node: fx.Node, g: ChannelGraph, masks: dict[SpaceKey, np.ndarray]) -> None:
    """A size read of a shrunk dim keeps its original value: what it computes (an attention
    scale, a mean's divisor …) then stays the same, and reshapes get their new sizes from
    :func:`_new_literal`; a use that no longer fits fails the check and is frozen."""
    read = _size_read(node)
    if read is not None and g.key(read[0], read[1]) in masks and node.users:
        node.replace_all_uses_with(int(_val(read[0]).shape[read[1]]))  # type: ignore[arg-type]


def _set_arg(node: fx.Node, i: int, name: str, value: Any) -> None:
    if name in node.kwargs:
        kwargs = dict(node.kwargs)
        kwargs[name] = value
        node.kwargs = kwargs
    else:
        args = list(node.args)
        args[i] = value
        node.args = tuple(args)


def _new_literal(old: Any, node: fx.Node, d: int, sizes: _Sizes) -> Any:
    """The size argument for output dim ``d``: the kept count where ``d`` shrinks (a size
    computed in the graph, say ``c // heads``, would be computed from another tensor)."""
    new = sizes.dim(node, d)
    if old == -1 or (isinstance(old, fx.Node) and new == _val(node).shape[d]):
        return old
    return new if isinstance(old, int | fx.Node) else old


def _rewrite_shape_args(node: fx.Node, sizes: _Sizes) -> None:
    args = list(node.args)
    packed = len(args) == 2 and isinstance(args[1], list | tuple)
    shape = list(args[1]) if packed else args[1:]
    if node.target == "expand":
        # expand keeps broadcast dims at their literal size; only real dims shrink
        src = _val(node.args[0])
        lead = len(shape) - src.dim()
        new = [
            _new_literal(s, node, d, sizes) if d >= lead and src.shape[d - lead] != 1 else s
            for d, s in enumerate(shape)
        ]
    else:
        new = [_new_literal(s, node, d, sizes) for d, s in enumerate(shape)]
    node.args = (args[0], type(args[1])(new)) if packed else (args[0], *new)


def _rewrite_index(node: fx.Node, sizes: _Sizes) -> None:
    src, index = node.args
    items = index if isinstance(index, tuple) else (index,)
    rank = _val(src).dim()
    explicit = sum(1 for it in items if it is not None and it is not Ellipsis)
    d = 0
    new_items = []
    for it in items:
        if it is Ellipsis:
            d += rank - explicit
            new_items.append(it)
            continue
        if it is None:
            new_items.append(it)
            continue
        if isinstance(it, slice) and (it.start is not None or it.stop is not None):
            size = _val(src).shape[d]
            start, stop, _ = it.indices(size)
            it = slice(
                sizes.kept_before(src, d, start) if it.start is not None else None,
                sizes.kept_before(src, d, stop) if it.stop is not None else None,
                it.step,
            )
        new_items.append(it)
        d += 1
    node.args = (src, tuple(new_items) if isinstance(index, tuple) else new_items[0])


def _rewrite_narrow(node: fx.Node, sizes: _Sizes) -> None:
    src = node.args[0]
    dim = int(_arg(node, 1, "dim"))
    start = int(_arg(node, 2, "start"))
    length = int(_arg(node, 3, "length"))
    d = dim % _val(src).dim()
    new_start = sizes.kept_before(src, d, start)
    _set_arg(node, 2, "start", new_start)
    _set_arg(node, 3, "length", sizes.kept_before(src, d, start + length) - new_start)


def _rewrite_split(node: fx.Node, sizes: _Sizes) -> None:
    name = "split_size" if "split_size" in node.kwargs else "split_size_or_sections"
    split = _arg(node, 1, name)
    src = node.args[0]
    dim = int(_arg(node, 2, "dim", 0)) % _val(src).dim()
    if isinstance(split, list | tuple):
        new: Any = type(split)(sizes.dim(node, dim, k) for k in range(len(split)))
    else:  # equal pieces: the same positions go from each, so the first piece's size
        new = sizes.dim(node, dim, 0)
        if isinstance(split, fx.Node) and new == _val(node)[0].shape[dim]:
            return
    _set_arg(node, 1, name, new)


def _rewrite_unflatten(node: fx.Node, sizes: _Sizes) -> None:
    src = node.args[0]
    dim = int(_arg(node, 1, "dim")) % _val(src).dim()
    shape = _arg(node, 2, "sizes")
    new = [_new_literal(s, node, dim + i, sizes) for i, s in enumerate(shape)]
    _set_arg(node, 2, "sizes", type(shape)(new))


class _Observer(fx.Interpreter):
    """Runs the graph on real tensors, recording each node's value as a meta tensor (shape
    and dtype only) and its MACs, and naming the node that fails."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.macs: dict[str, int] = {}

    def _run(self, n: fx.Node) -> Any:
        return super().run_node(n)

    def run_node(self, n: fx.Node) -> Any:
        try:
            out, self.macs[n.name] = run_counting(self.module, n, lambda: self._run(n))  # type: ignore[arg-type]
        except Exception as exc:
            raise ResizeFailed(n, exc) from exc
        n.meta["val"] = fx.node.map_aggregate(out, _as_meta)
        n.meta[MACS] = self.macs[n.name]
        return out


def _as_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    return value


def observe(ir: GraphIR) -> dict[str, int]:
    """Run ``ir`` once on its example inputs (eval mode, no grad): every node's
    ``meta["val"]`` becomes a meta tensor of its value's shape and dtype, and the MACs of
    each node are returned, counted as the ``costs`` analysis counts them. This stands for
    the ``shapes`` analysis of ``ir`` from then on (until the next change). Raise
    :class:`ResizeFailed` naming the first node that does not run. Real tensors at
    example-input sizes cost less than fake-tensor propagation's per-op overhead."""
    ir.invalidate()
    modes = {m: m.training for m in ir.gm.modules()}
    ir.gm.eval()
    try:
        with torch.no_grad():
            observer = _Observer(ir.gm)
            observer.run(*ir.example_inputs)
    finally:
        for m, training in modes.items():
            m.training = training
    ir.provide("shapes", True)
    return observer.macs


def known_macs(ir: GraphIR) -> dict[str, int] | None:
    """MACs per node when a valid ``shapes`` analysis is cached on ``ir`` (the pass manager
    computes it for its ledger), else None. Values a pass left on nodes without the
    analysis being cached may be stale, so they are not trusted."""
    if not ir.has_analysis("shapes"):
        return None
    nodes = [n for n in ir.graph.nodes if n.op != "output"]
    if all("val" in n.meta and MACS in n.meta for n in nodes):
        return {n.name: int(n.meta[MACS]) for n in nodes}
    return None


def light_copy(ir: GraphIR) -> GraphIR:
    """A copy of ``ir`` whose graph and modules are new but whose parameters and buffers are
    shared: removal replaces the tensors it slices instead of writing into them."""
    return ir.copy(share_tensors=True)
