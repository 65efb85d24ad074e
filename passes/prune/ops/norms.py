"""Normalisation layers and PReLU: per-channel parameters that follow their channels.

BatchNorm and InstanceNorm carry their scale, shift and running statistics along; GroupNorm
keeps whole groups; LayerNorm keeps its parameters on the normalised dims (its statistics
are recomputed over the kept channels). Scales are marked for the ``bn_scale`` criterion.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from graphopt.fxutil import arg, int_arg, node_arg, set_arg

from ..graph import ChannelGraph, SpaceKey, val
from .base import OpRule, Resize, concrete

__all__ = ["BatchNorm", "GroupNorm", "LayerNorm", "PReLU"]


def _channel_params(
    g: ChannelGraph, node: fx.Node, cd: int, keys: Iterable[SpaceKey | None], scale: SpaceKey | None
) -> None:
    for k in keys:
        if k is not None:
            g.link(g.key(node, cd), k)
    if scale is not None:
        g.norm_scales.add(scale)


class BatchNorm(OpRule):
    """BatchNorm, SyncBatchNorm, InstanceNorm (modules) and ``F.batch_norm``."""

    modules = (
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
        nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    )  # fmt: skip
    functions = (F.batch_norm,)

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        x = node_arg(node)
        g.identity(x, node)
        if node.op != "call_module":
            keys = [
                g.arg_key(arg(node, i, n), 0)
                for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))
            ]
            _channel_params(g, node, 1, keys, keys[2])
            return
        t = str(node.target)
        m = g.module(node)
        assert isinstance(m, _NormBase)
        names = ["weight", "bias"] if m.affine else []
        names += ["running_mean", "running_var"] if m.running_mean is not None else []
        keys = [g.param_key(t, n, 0) for n in names]
        cd = 1 if val(x).dim() > 1 else 0
        _channel_params(g, node, cd, keys, g.param_key(t, "weight", 0) if m.affine else None)

    def resize(self, node: fx.Node, sizes: Resize) -> None:
        if node.op == "call_module":
            m = sizes.module(node)
            assert isinstance(m, _NormBase)
            m.num_features = sizes.dim(node, 1 if val(node).dim() > 1 else 0)


class GroupNorm(OpRule):
    """``nn.GroupNorm`` and ``F.group_norm``: whole groups go; ``num_groups`` shrinks. One
    group (PoolFormer's and timm's ``GroupNorm1``, a LayerNorm over channels and space)
    loses channels one by one, its statistics recomputed over the kept ones as
    LayerNorm's are."""

    modules = (nn.GroupNorm,)
    functions = (F.group_norm,)

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        g.identity(node_arg(node), node)
        m = g.module(node) if node.op == "call_module" else None
        if isinstance(m, nn.GroupNorm):
            groups = m.num_groups
        else:
            groups = int(concrete(arg(node, 1, "num_groups")))
        c = val(node).shape[1]
        per = c // groups
        if groups > 1:
            g.link(g.key(node, 1), g.key(node, 1), None, (np.arange(c) // per) * per)
        if isinstance(m, nn.GroupNorm):
            if m.affine:
                t = str(node.target)
                weight = g.param_key(t, "weight", 0)
                _channel_params(g, node, 1, [weight, g.param_key(t, "bias", 0)], weight)
            return
        keys = [g.arg_key(arg(node, i, n), 0) for i, n in ((2, "weight"), (3, "bias"))]
        _channel_params(g, node, 1, keys, keys[0])

    def resize(self, node: fx.Node, sizes: Resize) -> None:
        new_c = sizes.dim(node, 1)
        if node.op == "call_module":
            m = sizes.module(node)
            assert isinstance(m, nn.GroupNorm)
            if m.num_groups > 1:
                m.num_groups = new_c // (m.num_channels // m.num_groups)
            m.num_channels = new_c
            return
        groups = int_arg(node, 1, "num_groups")
        old_c = val(node).shape[1]
        if groups > 1:
            set_arg(node, 1, "num_groups", new_c // (old_c // groups))


class LayerNorm(OpRule):
    """``nn.LayerNorm`` and ``F.layer_norm``: parameters follow the normalised dims, whose
    ``normalized_shape`` is rewritten."""

    modules: tuple[type[nn.Module], ...] = (nn.LayerNorm,)
    functions: tuple[Any, ...] = (F.layer_norm,)
    #: the functional form's tensor arguments, by name and position
    tensor_args: tuple[tuple[str, int], ...] = (("weight", 2), ("bias", 3))

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        g.identity(node_arg(node), node)
        rank = val(node).dim()
        if node.op == "call_module":
            t = str(node.target)
            m = g.module(node)
            k = len(m.normalized_shape)  # type: ignore[arg-type]
            if m.elementwise_affine:
                for i in range(k):
                    g.link(g.key(node, rank - k + i), g.param_key(t, "weight", i))
                    if getattr(m, "bias", None) is not None:
                        g.link(g.key(node, rank - k + i), g.param_key(t, "bias", i))
                g.norm_scales.add(g.param_key(t, "weight", k - 1))
            return
        k = len(concrete(arg(node, 1, "normalized_shape")))
        for name, i in self.tensor_args:
            keys = [g.arg_key(arg(node, i, name), j) for j in range(k)]
            for j, key in enumerate(keys):
                if key is not None:
                    g.link(g.key(node, rank - k + j), key)
            if name == "weight" and keys[-1] is not None:
                g.norm_scales.add(keys[-1])

    def resize(self, node: fx.Node, sizes: Resize) -> None:
        rank = val(node).dim()
        if node.op == "call_module":
            m = sizes.module(node)
            k = len(m.normalized_shape)  # type: ignore[arg-type]
            m.normalized_shape = tuple(sizes.dim(node, d) for d in range(rank - k, rank))  # type: ignore[assignment]
            return
        k = len(arg(node, 1, "normalized_shape"))
        shape = [sizes.dim(node, d) for d in range(rank - k, rank)]
        set_arg(node, 1, "normalized_shape", shape)


class PReLU(OpRule):
    """``nn.PReLU``: one slope per channel (or one for all)."""

    modules = (nn.PReLU,)

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        g.identity(node_arg(node), node)
        m = g.module(node)
        assert isinstance(m, nn.PReLU)
        if m.num_parameters > 1:
            g.link(g.key(node, 1), g.param_key(str(node.target), "weight", 0))

    def resize(self, node: fx.Node, sizes: Resize) -> None:
        m = sizes.module(node)
        assert isinstance(m, nn.PReLU)
        m.num_parameters = m.weight.numel()
