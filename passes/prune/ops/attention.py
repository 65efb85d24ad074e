"""Attention and matrix products: ``nn.MultiheadAttention``, scaled dot-product attention,
``matmul``/``bmm``/``mm`` and ``einsum``.

Token dims are never pruned (attention mixes tokens); the head dim loses the same positions
in every head (or whole heads). Where a head dim shrinks, the ``1/sqrt(head_dim)`` scale is
kept at its old value, so the logits stay what they were.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphopt.fxutil import arg, node_arg

from ..graph import ChannelGraph, SpaceKey, val
from .base import OpRule, Resize

__all__ = ["Einsum", "Matmul", "MultiheadAttention", "ScaledDotProduct", "rescale_queries"]


def packed_attention(
    g: ChannelGraph,
    node: fx.Node,
    inputs: list[fx.Node],
    out: SpaceKey,
    in_proj: tuple[SpaceKey, SpaceKey | None],
    out_proj: tuple[SpaceKey, SpaceKey | None],
    heads: int,
    owner: str,
    whole_heads: bool = False,
) -> None:
    """Attention whose inner width must equal its input width (``E`` rows each for q, k and
    v in one ``(3E, E)`` weight, heads of ``E / heads``): an atom is one head-dim position
    ``p`` in every head of q, k and v, the ``out_proj`` columns reading them, and the input
    and output channels of the same indices, so both widths stay equal and heads equal.
    With ``whole_heads`` an atom is instead one whole head (its ``E / heads`` rows of q, k
    and v) with the same columns and channels: heads go, their size stays.
    Every other dimension (tokens, batch, windows) stays whole: attention mixes tokens."""
    w, b = in_proj
    wo, bo = out_proj
    w_in = (w[0], w[1], 1)
    e = g.size_of(w_in)
    rows = np.arange(e)
    for x in dict.fromkeys(inputs):
        r = val(x).dim()
        for d in range(r - 1):
            g.freeze(g.key(x, d), node, "attention mixes tokens")
        g.link(g.key(x, r - 1), w_in)
    for key in g.tensor_keys(node):
        if key != out:
            g.freeze(key, node, "attention mixes tokens")
    for part in (1, 2):
        g.link(w, w, rows, rows + part * e)
    head_dim = e // heads
    g.link(w, w, rows, rows // head_dim * head_dim if whole_heads else rows % head_dim)
    g.link(w, w_in, rows, rows)
    wo_in = (wo[0], wo[1], 1)
    g.link(wo_in, w, rows, rows + 2 * e)
    g.link(out, wo)
    g.link(wo, w, rows, rows)
    if b is not None:
        g.link(b, w)
    if bo is not None:
        g.link(out, bo)
    g.consumers.update((w_in, wo_in))
    for key in (w, wo):
        g.produces(key, owner)


def rescale_queries(
    weight: torch.Tensor, bias: torch.Tensor | None, inner: int, shrink: float
) -> None:
    """Attention scaled by ``1/sqrt(head_dim)`` recomputed from the new head size: scale the
    query rows by ``sqrt(new/old)`` so the logits stay what they were."""
    with torch.no_grad():
        weight[:inner] *= math.sqrt(shrink)
        if bias is not None:
            bias[:inner] *= math.sqrt(shrink)


class MultiheadAttention(OpRule):
    """Self- or cross-attention through ``nn.MultiheadAttention`` with packed projections.

    The module insists that its inner width equals its input width and that every head has
    the same size, so an atom is one position ``p`` of the head dimension in every head (the
    q, k and v rows ``p + h·head_dim`` and the matching ``out_proj`` columns) together with
    the input and output channels of the same indices: removing it keeps both widths equal.
    """

    modules = (nn.MultiheadAttention,)

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        t = str(node.target)
        m = g.module(node)
        assert isinstance(m, nn.MultiheadAttention)
        q, k, v = (arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
        if (
            not m._qkv_same_embed_dim
            or m.in_proj_weight is None
            or m.bias_k is not None
            or m.add_zero_attn
            or not all(isinstance(val(a), torch.Tensor) for a in (q, k, v))
        ):
            g.freeze_node(node, "only packed-projection attention without bias_kv is mapped")
            return
        for name in ("key_padding_mask", "attn_mask"):
            mask = node.kwargs.get(name)
            if isinstance(mask, fx.Node):
                for key in g.tensor_keys(mask):
                    g.freeze(key, node, "an attention mask")
        out_proj = (
            g.param_key(t, "out_proj.weight", 0),
            g.param_key(t, "out_proj.bias", 0) if m.out_proj.bias is not None else None,
        )
        in_proj = (
            g.param_key(t, "in_proj_weight", 0),
            g.param_key(t, "in_proj_bias", 0) if m.in_proj_bias is not None else None,
        )
        out = g.key(node, val(node)[0].dim() - 1, 0)
        packed_attention(g, node, [q, k, v], out, in_proj, out_proj, m.num_heads, t, g.whole_heads)

    def resize(self, node: fx.Node, sizes: Resize) -> None:
        m = sizes.module(node)
        assert isinstance(m, nn.MultiheadAttention)
        inner = m.in_proj_weight.shape[0] // 3
        if inner == m.embed_dim:
            return
        if sizes.whole_heads:  # fewer heads of the same size: the 1/sqrt(head_dim) scale holds
            m.num_heads = inner // m.head_dim
        else:
            new_hd = inner // m.num_heads
            rescale_queries(m.in_proj_weight, m.in_proj_bias, inner, new_hd / m.head_dim)
            m.head_dim = new_hd
        m.embed_dim = m.kdim = m.vdim = inner
        m.out_proj.out_features, m.out_proj.in_features = m.out_proj.weight.shape

    def contracted(self, g: ChannelGraph, node: fx.Node) -> SpaceKey | None:
        return ("p", f"{node.target}.in_proj_weight", 1)


class ScaledDotProduct(OpRule):
    """``F.scaled_dot_product_attention``: q·k over the head dim, v's head dim out; its
    default scale is pinned to the old head size."""

    functions = (F.scaled_dot_product_attention,)

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        q, k, v = (node_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
        vq, vk, vv, out = val(q), val(k), val(v), val(node)
        ro = out.dim()
        for t, tv in ((q, vq), (k, vk), (v, vv)):
            for d in range(tv.dim() - 2):
                if tv.shape[d] == out.shape[d + ro - tv.dim()]:
                    g.link(g.key(t, d), g.key(node, d + ro - tv.dim()))
        g.link(g.key(q, vq.dim() - 1), g.key(k, vk.dim() - 1))
        g.link(g.key(k, vk.dim() - 2), g.key(v, vv.dim() - 2))
        g.link(g.key(q, vq.dim() - 2), g.key(node, ro - 2))
        g.link(g.key(v, vv.dim() - 1), g.key(node, ro - 1))
        mask = arg(node, 3, "attn_mask")
        if isinstance(mask, fx.Node):
            vm = val(mask)
            rm = vm.dim()
            for d in range(rm):
                od = d + ro - rm
                if d < rm - 2 and od >= 0 and vm.shape[d] == out.shape[od] > 1:
                    # a per-head mask or bias (MaxViT's, Swin's relative positions) goes
                    # with the heads it is added to, or keeps them whole
                    g.link(g.key(mask, d), g.key(node, od))
                elif vm.shape[d] > 1:
                    g.freeze(g.key(mask, d), node, "an attention mask")

    def heads(self, g: ChannelGraph, node: fx.Node) -> list[SpaceKey]:
        """The heads dimension (the third from last) of q, k, v and the output."""
        q, k, v = (node_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
        found = []
        for t in (q, k, v, node):
            tv = val(t)
            if isinstance(tv, torch.Tensor) and tv.dim() >= 3 and tv.shape[-3] > 1:
                found.append(g.key(t, tv.dim() - 3))
        return found

    def resize(self, node: fx.Node, sizes: Resize) -> None:
        """The default scale is 1/sqrt(head dim): keep the old one when the head dim
        shrinks."""
        q = node_arg(node, 0, "query")
        d = val(q).dim() - 1
        old = val(q).shape[d]
        if arg(node, 6, "scale") is None and sizes.dim(q, d) != old:
            node.kwargs = {**node.kwargs, "scale": 1 / math.sqrt(old)}


class Matmul(OpRule):
    """Matrix products of two operands of rank ≥ 2: the contracted dims together, the
    others to the output (batch dims broadcast)."""

    functions = (operator.matmul, torch.matmul, torch.bmm, torch.mm)
    methods = ("matmul", "bmm", "mm")

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        a, b = arg(node, 0, "input"), arg(node, 1, "other")
        va, vb, out = val(a), val(b), val(node)
        if va.dim() < 2 or vb.dim() < 2:
            g.freeze_node(node, "matrix-vector products are not mapped")
            return
        ra, rb, ro = va.dim(), vb.dim(), out.dim()
        g.link(g.key(a, ra - 1), g.key(b, rb - 2))
        g.link(g.key(a, ra - 2), g.key(node, ro - 2))
        g.link(g.key(b, rb - 1), g.key(node, ro - 1))
        for t, tv, r in ((a, va, ra), (b, vb, rb)):
            for d in range(r - 2):
                if tv.shape[d] == out.shape[d + ro - r]:
                    g.link(g.key(t, d), g.key(node, d + ro - r))

    def contracted(self, g: ChannelGraph, node: fx.Node) -> SpaceKey | None:
        a = node.args[0]
        if isinstance(a, fx.Node) and isinstance(val(a), torch.Tensor):
            return g.key(a, val(a).dim() - 1)
        return None


class Einsum(OpRule):
    """``torch.einsum`` with an explicit output: dims sharing a letter are one space."""

    functions = (torch.einsum,)

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        eq = str(node.args[0]).replace(" ", "")
        operands: list[Any] = list(node.args[1:])
        if len(operands) == 1 and isinstance(operands[0], list | tuple):
            operands = list(operands[0])
        if "..." in eq or "->" not in eq:
            g.freeze_node(node, "einsum with an implicit or ellipsis output")
            return
        lhs, rhs = eq.split("->")
        where: dict[str, list[SpaceKey]] = {}
        for spec, t in zip(lhs.split(","), operands, strict=True):
            v = val(t)
            for d, ch in enumerate(spec):
                if v.shape[d] > 1:
                    where.setdefault(ch, []).append(g.key(t, d))
        for d, ch in enumerate(rhs):
            if val(node).shape[d] > 1:
                where.setdefault(ch, []).append(g.key(node, d))
        for keys in where.values():
            for k in keys[1:]:
                g.link(keys[0], k)
