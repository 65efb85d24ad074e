"""Functions torchvision wraps as fx leaves (they appear whole in a traced graph).

They are named by ``module.qualname``, so graphopt needs no torchvision import to know
them: a model that calls them has imported it.
"""

from __future__ import annotations

import numpy as np
import torch.fx as fx

from graphopt.fxutil import arg, node_arg

from ..graph import ChannelGraph, SpaceKey, val
from .attention import packed_attention, rescale_queries
from .base import OpRule, Resize, concrete

__all__ = ["PatchMergingPad", "ShiftedWindowAttention"]

_SWIN = "torchvision.models.swin_transformer"


class ShiftedWindowAttention(OpRule):
    """``shifted_window_attention`` (Swin, Swin V2): packed-projection attention in windows
    of a channels-last map; its inner width is read from the input's, so the queries are
    rescaled to keep ``1/sqrt(head_dim)`` (V2's cosine attention has no such scale)."""

    functions = (f"{_SWIN}.shifted_window_attention",)

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        x = node_arg(node)
        w = g.weight_key(arg(node, 1, "qkv_weight"), 0)
        wo = g.weight_key(arg(node, 2, "proj_weight"), 0)
        b = g.attr_key(arg(node, 9, "qkv_bias"), 0)
        bo = g.attr_key(arg(node, 10, "proj_bias"), 0)
        heads = int(concrete(arg(node, 5, "num_heads")))
        for i, name in ((3, "relative_position_bias"), (11, "logit_scale")):
            extra = arg(node, i, name)
            if isinstance(extra, fx.Node):
                for key in g.tensor_keys(extra):
                    g.freeze(key, node, "per-head attention terms")
        out = g.key(node, val(node).dim() - 1)
        owner = w[1].rpartition(".")[0]
        packed_attention(g, node, [x], out, (w, b), (wo, bo), heads, owner)

    def resize(self, node: fx.Node, sizes: Resize) -> None:
        x = node_arg(node)
        d = val(x).dim() - 1
        old, new = val(x).shape[d], sizes.dim(x, d)
        if old == new or arg(node, 11, "logit_scale") is not None:
            return  # Swin V2's cosine attention has no head-size scale
        weight = sizes.ir.gm.get_parameter(str(node_arg(node, 1, "qkv_weight").target))
        bias_node = arg(node, 9, "qkv_bias")
        bias = sizes.ir.gm.get_parameter(str(bias_node.target)) if bias_node is not None else None
        rescale_queries(weight, bias, new, new / old)

    def contracted(self, g: ChannelGraph, node: fx.Node) -> SpaceKey | None:
        return ("p", str(node_arg(node, 1, "qkv_weight").target), 1)


class PatchMergingPad(OpRule):
    """``_patch_merging_pad``: pad H and W to even sizes and concatenate the four 2×2
    phases along the channels (``… H/2 W/2 4C``)."""

    functions = (f"{_SWIN}._patch_merging_pad",)

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        x = node_arg(node)
        r, c = val(x).dim(), val(x).shape[-1]
        g.identity(x, node, range(r - 3))
        g.link(g.key(x, r - 1), g.key(node, r - 1), np.arange(4 * c) % c, None)
        for d in (r - 3, r - 2):
            for key in (g.key(x, d), g.key(node, d)):
                g.freeze(key, node, "patch merging regroups spatial positions")
