"""Weighted layers: convolutions (plain, grouped, transposed), linear layers, embeddings.

Their weights' output dimension is what makes an atom prunable (a *producer*); the input
dimension they contract over is a *consumer*. Each covers the module and the functional
form, with a stored weight (``F.conv2d(x, self.weight)``) or one computed in the graph from
a parameter (timm's weight-standardised ``StdConv2d``/``ScaledStdConv2d``: ``F.conv2d(x,
batch_norm(self.weight.reshape(1, out, -1), …).reshape_as(self.weight))``): the computed
weight's dims are linked like a stored one's, and the ops computing it link them back to
the parameter, which is sliced with them.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from graphopt.fxutil import arg, node_arg, set_arg

from ..graph import ChannelGraph, SpaceKey, val
from .base import OpRule, Resize, concrete

__all__ = ["Conv", "Embedding", "Linear"]

_TRANSPOSED = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


class Conv(OpRule):
    """Convolutions, 1-3 d, transposed or not, any groups.

    Without groups, input channels tie to the weight's input dimension and output channels
    to its output dimension (``(out, in, k…)``, or ``(in, out, k…)`` when transposed). With
    groups, whole groups go together: input group ``k``, output group ``k`` and the weight
    rows of group ``k`` (output channels, or input channels when transposed, whose weight
    is ``(in, out/groups, k…)``); ``groups`` shrinks with them. Spatial dims are mixed.
    """

    modules = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
               nn.ConvTranspose3d)  # fmt: skip
    functions = (F.conv1d, F.conv2d, F.conv3d, *_TRANSPOSED)

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        x = node_arg(node)
        if node.op == "call_module":
            t = str(node.target)
            m = g.module(node)
            assert isinstance(m, _ConvNd)
            b = g.param_key(t, "bias", 0) if m.bias is not None else None
            w = g.param_key(t, "weight", 0)
            _conv_like(g, node, x, w, b, m.groups, m.transposed, t, m.stride)
            return
        w = arg(node, 1, "weight")
        weight = g.arg_key(w, 0)
        if weight is None:
            raise ValueError("it has no weight")
        groups = int(concrete(arg(node, 6, "groups", 1)))
        bias = g.arg_key(arg(node, 2, "bias"), 0)
        transposed = node.target in _TRANSPOSED
        stride = concrete(arg(node, 3, "stride", 1))
        _conv_like(g, node, x, weight, bias, groups, transposed, _owner(w), stride)
        _mark_source(g, w, (0, 1) if groups == 1 else (0, None), transposed)

    def resize(self, node: fx.Node, sizes: Resize) -> None:
        if node.op != "call_module":
            groups = arg(node, 6, "groups", 1)
            if isinstance(groups, int) and groups > 1:
                old_c = val(node).shape[1]
                set_arg(node, 6, "groups", sizes.dim(node, 1) // (old_c // groups))
            return
        m = sizes.module(node)
        assert isinstance(m, _ConvNd)
        if m.transposed:
            if m.groups > 1:
                per_group_in = m.in_channels // m.groups
                m.groups = m.weight.shape[0] // per_group_in
            m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
            return
        x = node_arg(node)
        spatial = m.weight.dim() - 2
        cd = val(x).dim() - spatial - 1
        new_in = sizes.dim(x, cd)
        if m.groups > 1:
            per_group_out = m.out_channels // m.groups
            m.groups = m.weight.shape[0] // per_group_out
        m.out_channels = m.weight.shape[0]
        m.in_channels = new_in

    def contracted(self, g: ChannelGraph, node: fx.Node) -> SpaceKey | None:
        if node.op == "call_module":
            m = g.module(node)
            assert isinstance(m, _ConvNd)
            if m.groups != 1:
                return None
            return ("p", f"{node.target}.weight", 0 if m.transposed else 1)
        weight = arg(node, 1, "weight")
        if arg(node, 6, "groups", 1) != 1 or not isinstance(weight, fx.Node):
            return None
        return g.key(weight, 0 if node.target in _TRANSPOSED else 1)


def _conv_like(
    g: ChannelGraph,
    node: fx.Node,
    x: fx.Node,
    w: SpaceKey,
    b: SpaceKey | None,
    groups: int,
    transposed: bool = False,
    owner: str = "",
    stride: int | tuple[int, ...] = 1,
) -> None:
    vx, out = val(x), val(node)
    spatial = g.rank_of(w) - 2
    cd = vx.dim() - spatial - 1

    def wk(d: int) -> SpaceKey:
        return (*w[:-1], d)

    if cd == 1:
        g.link(g.key(x, 0), g.key(node, 0))
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    c_out = out.shape[cd]
    if groups == 1:
        g.link(g.key(x, cd), wk(in_dim))
        g.link(g.key(node, cd), wk(out_dim))
        g.consumers.add(wk(in_dim))
        made = wk(out_dim)
    else:
        # whole groups go together: input group k, output group k, weight rows of group k
        # (the rows are output channels, or input channels when transposed)
        ci, co = vx.shape[cd] // groups, c_out // groups
        g.link(g.key(x, cd), g.key(node, cd), None, (np.arange(vx.shape[cd]) // ci) * co)
        g.link(g.key(node, cd), g.key(node, cd), None, (np.arange(c_out) // co) * co)
        g.link(g.key(x if transposed else node, cd), wk(0))
        made = wk(0)
    if b is not None:
        g.link(g.key(node, cd), b)
    g.produces(made, owner or node.name)
    strides = (stride,) * spatial if isinstance(stride, int) else tuple(stride)
    for d, s in zip(range(cd + 1, vx.dim()), strides, strict=True):
        if s == 1 and out.shape[d] == vx.shape[d]:
            # a length-keeping slide (ECA's gate, a Conv1d over the pooled channels as its
            # sequence): position i of the output is centred on position i of the input
            # and the kernel fits any length, so positions go with the channels they
            # come from; the kept ones then see their kept neighbours
            g.link(g.key(x, d), g.key(node, d))
        else:
            g.freeze(g.key(node, d), node, "convolution mixes spatial positions")


class Linear(OpRule):
    """``nn.Linear`` and ``F.linear``: the last dim in, the last dim out."""

    modules = (nn.Linear,)
    functions = (F.linear,)

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        x = node_arg(node)
        if node.op == "call_module":
            t = str(node.target)
            b = g.param_key(t, "bias", 0) if g.module(node).bias is not None else None
            _linear_like(g, node, x, g.param_key(t, "weight", 0), b, t)
            return
        weight = arg(node, 1, "weight")
        w = g.arg_key(weight, 0)
        if w is None:
            raise ValueError("it has no weight")
        _linear_like(g, node, x, w, g.arg_key(arg(node, 2, "bias"), 0), _owner(weight))
        _mark_source(g, weight, (1, 0), False)

    def resize(self, node: fx.Node, sizes: Resize) -> None:
        if node.op == "call_module":
            m = sizes.module(node)
            assert isinstance(m, nn.Linear)
            m.out_features, m.in_features = m.weight.shape

    def contracted(self, g: ChannelGraph, node: fx.Node) -> SpaceKey | None:
        if node.op == "call_module":
            return ("p", f"{node.target}.weight", 1)
        weight = arg(node, 1, "weight")
        return g.key(weight, 1) if isinstance(weight, fx.Node) else None


def _linear_like(
    g: ChannelGraph, node: fx.Node, x: fx.Node, w: SpaceKey, b: SpaceKey | None, owner: str = ""
) -> None:
    r = val(x).dim()
    g.identity(x, node, range(r - 1))
    g.link(g.key(x, r - 1), (*w[:-1], 1))
    g.consumers.add((*w[:-1], 1))
    g.link(g.key(node, r - 1), (*w[:-1], 0))
    if b is not None:
        g.link(g.key(node, r - 1), b)
    g.produces((*w[:-1], 0), owner or node.name)


class Embedding(OpRule):
    """``nn.Embedding`` and ``F.embedding``: the embedding dim (the table's columns)."""

    modules = (nn.Embedding,)
    functions = (F.embedding,)

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        x = node_arg(node)
        r = val(x).dim()
        g.identity(x, node, range(r))
        if node.op == "call_module":
            w = g.param_key(str(node.target), "weight", 1)
            owner = str(node.target)
        else:
            w = g.weight_key(arg(node, 1, "weight"), 1)
            owner = w[1]
        g.link(g.key(node, r), w)
        g.produces(w, owner)

    def resize(self, node: fx.Node, sizes: Resize) -> None:
        if node.op == "call_module":
            m = sizes.module(node)
            assert isinstance(m, nn.Embedding)
            m.embedding_dim = m.weight.shape[1]


#: ops a weight may be computed with and keep its parameter's layout: reshapes and back,
#: per-element arithmetic, normalisation over the weight's rows (weight standardisation)
_LAYOUT_KEEPING = {
    "reshape", "view", "reshape_as", "view_as", "flatten", "contiguous", "mul", "div", "add",
    "sub", torch.reshape, torch.flatten, torch.mul, torch.div, torch.add, torch.sub,
    operator.mul, operator.truediv, operator.add, operator.sub, F.batch_norm, F.layer_norm,
    F.group_norm, F.instance_norm,
}  # fmt: skip


def _stored_source(weight: fx.Node) -> fx.Node | None:
    """The ``get_attr`` node a computed weight is derived from through layout-keeping ops
    (following their first argument), when it has the weight's shape; else None."""
    node = weight
    while node.op != "get_attr":
        if node.op not in ("call_function", "call_method") or node.target not in _LAYOUT_KEEPING:
            return None
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node):
            return None
        node = first
    same = getattr(val(node), "shape", None) == getattr(val(weight), "shape", None)
    return node if node is not weight and same else None


def _owner(weight: Any) -> str:
    """The layer a functional call's weight belongs to, for reports: the module path of
    the stored parameter it is (or is computed from); empty if none."""
    if not isinstance(weight, fx.Node):
        return ""
    source = weight if weight.op == "get_attr" else _stored_source(weight)
    return str(source.target).rpartition(".")[0] or str(source.target) if source else ""


def _mark_source(
    g: ChannelGraph, weight: Any, dims: tuple[int, int | None], transposed: bool
) -> None:
    """For a weight computed from a parameter of the same layout, mark the parameter's
    output (and input) dim as the layer's producer (consumer) too, so that the criteria
    score its rows and columns; ``dims`` is (output, input) of the untransposed layout,
    input None for grouped convolutions."""
    if not isinstance(weight, fx.Node) or weight.op == "get_attr":
        return
    source = _stored_source(weight)
    if source is None:
        return
    out_dim, in_dim = dims
    if transposed and in_dim is not None:
        out_dim, in_dim = in_dim, out_dim
    g.produces(g.key(source, out_dim), _owner(weight))
    if in_dim is not None:
        g.consumers.add(g.key(source, in_dim))
