"""Ops that act on each channel alone, and ops that mix a dimension whole.

Elementwise ops (with broadcasting) identify their operands' channels; pooling, padding,
softmax and reductions keep the channels but mix (and so freeze) the dimension they work
along.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphopt.fxutil import arg, node_arg

from ..graph import ChannelGraph, val
from .base import OpRule, concrete

__all__ = ["Elementwise", "Pad", "Pool", "Reduce", "SameLayout", "Softmax"]


def norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


class Elementwise(OpRule):
    """Per-element ops: every input dim of the output's size is that output dim (size-1
    broadcast dims are not); an activation module maps its input to its output."""

    functions = (
        operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
        operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.abs,
        torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.abs, torch.pow, torch.exp,
        torch.sqrt, torch.rsqrt, torch.sigmoid, torch.tanh, torch.relu, torch.clamp,
        torch.where, torch.maximum, torch.minimum, torch.sign, torch.erf, torch.square,
        torch.reciprocal, F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish,
        F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu, F.elu, F.selu, F.celu, F.softplus,
        F.hardtanh, F.logsigmoid, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
        F.alpha_dropout, F.softshrink, F.hardshrink, F.tanhshrink, F.softsign, F.threshold,
        F.rrelu, torch.log, torch.log1p, torch.expm1, torch.sin, torch.cos, torch.floor,
        torch.ceil, torch.round, torch.trunc, torch.clamp_min, torch.clamp_max,
        # an fx leaf in torchvision that acts per element in eval mode
        "torchvision.ops.stochastic_depth.stochastic_depth",
    )  # fmt: skip
    methods = (
        "add", "sub", "mul", "div", "neg", "abs", "pow", "exp", "sqrt", "rsqrt", "sigmoid",
        "tanh", "relu", "clamp", "clamp_min", "clamp_max", "masked_fill", "sign", "square",
        "add_", "sub_", "mul_", "div_", "relu_", "sigmoid_", "clamp_", "masked_fill_", "erf",
        "reciprocal", "log", "log1p", "exp_", "floor", "ceil", "round", "sin", "cos",
        "tanh_", "sqrt_", "abs_", "neg_", "pow_",
    )  # fmt: skip
    modules = (
        nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
        nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Hardtanh,
        nn.LogSigmoid, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
        nn.FeatureAlphaDropout, nn.Identity, nn.Softshrink, nn.Hardshrink, nn.Tanhshrink,
        nn.Softsign, nn.Threshold, nn.RReLU,
    )  # fmt: skip

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        if node.op == "call_module":
            g.identity(node_arg(node), node)
            return
        out = val(node)
        for inp in node.all_input_nodes:
            v = val(inp)
            if not isinstance(v, torch.Tensor) or v.dim() > out.dim():
                continue
            shift = out.dim() - v.dim()
            for d in range(v.dim()):
                if v.shape[d] == out.shape[d + shift]:
                    g.link(g.key(inp, d), g.key(node, d + shift))


class SameLayout(OpRule):
    """Methods whose result has the first argument's layout whatever the other arguments
    are (casts, copies)."""

    methods = (
        "type_as", "to", "float", "half", "double", "bfloat16", "clone", "detach",
        "contiguous", "cpu", "cuda", "requires_grad_",
    )  # fmt: skip

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        g.identity(node_arg(node), node)


def mix_trailing(g: ChannelGraph, node: fx.Node, spatial: int, reason: str) -> None:
    """Keep the leading dims of ``node``'s first input and freeze its last ``spatial``."""
    src = node_arg(node)
    rank = val(src).dim()
    g.identity(src, node, range(rank - spatial))
    for d in range(rank - spatial, rank):
        g.freeze(g.key(src, d), node, reason)
        g.freeze(g.key(node, d), node, reason)


_POOL_FUNCS: dict[Any, int] = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2,
    F.avg_pool3d: 3, F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3, torch.max_pool2d: 2, torch.avg_pool1d: 1,
    torch.adaptive_avg_pool1d: 1,
}  # fmt: skip


class Pool(OpRule):
    """Pooling, resampling and constant-padding modules: channels pass through, the spatial
    dims (the trailing 1, 2 or 3) are mixed."""

    functions = (*_POOL_FUNCS, F.interpolate)
    modules = (
        nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
        nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.LPPool2d, nn.ZeroPad2d,
        nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
    )  # fmt: skip

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        if node.op == "call_module":
            digits = re.findall(r"(\d)d", type(g.module(node)).__name__)
            spatial = int(digits[0]) if digits else 2
        elif node.target is F.interpolate:
            spatial = val(node).dim() - 2
        else:
            spatial = _POOL_FUNCS[node.target]
        mix_trailing(g, node, spatial, "pooling mixes this dimension")


class Pad(OpRule):
    """``F.pad``: padded dims are shifted (frozen), the others pass through."""

    functions = (F.pad,)

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        x = node_arg(node)
        pad = concrete(arg(node, 1, "pad"))
        rank = val(x).dim()
        k = len(pad) // 2
        g.identity(x, node, range(rank - k))
        for i in range(k):
            d = rank - 1 - i
            if pad[2 * i] or pad[2 * i + 1]:
                g.freeze(g.key(x, d), node, "padding shifts this dimension")
                g.freeze(g.key(node, d), node, "padding shifts this dimension")
            else:
                g.link(g.key(x, d), g.key(node, d))


class Softmax(OpRule):
    """Softmax and normalisation along one dim: every other dim passes, that one is
    normalised as a whole (frozen)."""

    functions = (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.normalize)
    methods = ("softmax", "log_softmax")
    modules = (nn.Softmax,)

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        src = node_arg(node)
        if node.op == "call_module":
            m = g.module(node)
            assert isinstance(m, nn.Softmax)
            rank = val(node).dim()
            d = norm_dim(m.dim if m.dim is not None else -1, rank)
            g.identity(src, node, [i for i in range(rank) if i != d])
            g.freeze(g.key(node, d), node, "channels are normalised together here")
            return
        rank = val(src).dim()
        dim = arg(node, 2, "dim", 1) if node.target is F.normalize else arg(node, 1, "dim")
        if dim is None:
            g.freeze_node(node, "softmax over an implicit dimension")
            return
        d = norm_dim(int(dim), rank)
        g.identity(src, node, [i for i in range(rank) if i != d])
        g.freeze(g.key(src, d), node, "channels are normalised together here")
        g.freeze(g.key(node, d), node, "channels are normalised together here")


class Reduce(OpRule):
    """Reductions: the reduced dims are summed over (frozen), the others pass through."""

    functions = (
        torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var,
        torch.logsumexp, torch.norm,
    )  # fmt: skip
    methods = ("mean", "sum", "amax", "amin", "std", "var", "logsumexp", "norm")

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        src = node_arg(node)
        vin, vout = val(src), val(node)
        dim = concrete(arg(node, 2 if node.target in (torch.norm, "norm") else 1, "dim"))
        if dim is None:
            dims = set(range(vin.dim()))
        else:
            listed = dim if isinstance(dim, Sequence) else [dim]
            dims = {norm_dim(int(d), vin.dim()) for d in listed}
        for d in dims:
            g.freeze(g.key(src, d), node, "channels are reduced over here")
        kept = [d for d in range(vin.dim()) if d not in dims]
        keepdim = vout.dim() == vin.dim()
        for i, d in enumerate(kept):
            g.link(g.key(src, d), g.key(node, d if keepdim else i))
