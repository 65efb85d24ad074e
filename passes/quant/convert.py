"""Rewriting a planned graph into its deployable forms.

* ``int8``: real kernels of PyTorch's x86/fbgemm quantized engine — ``quantized::conv2d``,
  ``conv2d_relu``, ``linear``, ``linear_relu`` on fbgemm-packed int8 weights (attributes of
  the GraphModule), ``quantized::add``/``add_relu``/``cat``, ``torch.quantize_per_tensor``
  where a float value enters int8 and ``.dequantize()`` where it leaves. Everything in the
  graph is a torch op or object, so the pickled ``.pt`` runs without graphopt.
* ``qdq``: the reference form — float ops between ``quantized_decomposed`` quantize/
  dequantize pairs and int8 weights dequantized per channel. It simulates int8 in float,
  exports through ``torch.export`` and becomes ONNX ``QuantizeLinear``/``DequantizeLinear``,
  which onnxruntime fuses into its int8 kernels (``QLinearConv``, ``QLinearAdd`` …).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphopt import GraphIR
from graphopt.ir import free_name

from .observers import quantize_weight, weight_qparams
from .plan import Plan

__all__ = ["QParams", "to_int8", "to_qdq"]

QD = torch.ops.quantized_decomposed
QOPS = torch.ops.quantized

_FUNCTIONAL = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


@dataclass(frozen=True)
class QParams:
    """Per-tensor scale and zero point of an activation (uint8 codes, or int8 = uint8 − 128)."""

    scale: float
    zero_point: int


def _weight_codes(layer: Any, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scales = weight_qparams(layer.weight, per_channel=per_channel)
    return quantize_weight(layer.weight, scales), scales


def _packed_layer(layer: Any, per_channel: bool) -> Any:
    """fbgemm's packed int8 weight (and float bias) of a conv or linear layer."""
    with warnings.catch_warnings():
        # torch 2.10+ warns that quantized tensor constructors will go; they are still the
        # only way into fbgemm's packed weights
        warnings.simplefilter("ignore", UserWarning)
        return _pack(layer, per_channel)


def _pack(layer: Any, per_channel: bool) -> Any:
    codes, scales = _weight_codes(layer, per_channel)
    if per_channel:
        shape = (-1,) + (1,) * (codes.dim() - 1)
        zeros = torch.zeros(scales.numel(), dtype=torch.long)
        qweight = torch.quantize_per_channel(
            codes.float() * scales.reshape(shape), scales.double(), zeros, 0, torch.qint8
        )
    else:
        qweight = torch.quantize_per_tensor(codes.float() * scales, float(scales), 0, torch.qint8)
    bias = layer.bias.detach().float() if layer.bias is not None else None
    if isinstance(layer, nn.Linear):
        return torch.ops.quantized.linear_prepack(qweight, bias)
    prepack = getattr(torch.ops.quantized, f"conv{qweight.dim() - 2}d_prepack")
    return prepack(
        qweight, bias, list(layer.stride), list(layer.padding), list(layer.dilation), layer.groups
    )


def _int8_op(layer: Any, fused: bool) -> Any:
    """The int8 kernel of a conv or linear layer, with a fused ReLU or without."""
    name = "linear" if isinstance(layer, nn.Linear) else f"conv{layer.weight.dim() - 2}d"
    op = getattr(torch.ops.quantized, name + ("_relu" if fused else ""))
    # the packed-params overload is "new" for conv2d/3d; conv1d (and linear) have only one
    return op.new if "new" in op.overloads() else op.default


def to_int8(
    ir: GraphIR, plan: Plan, qparams: dict[fx.Node, QParams], *, per_channel: bool
) -> dict[fx.Node, fx.Node]:
    """Rewrite ``ir`` to fbgemm int8 kernels; return each site's result node → new node."""
    graph, gm = ir.graph, ir.gm
    state: set[fx.Node] = set()
    to_quant: dict[fx.Node, fx.Node] = {}
    to_float: dict[fx.Node, fx.Node] = {}
    results: dict[fx.Node, fx.Node] = {}

    def as_quant(n: fx.Node) -> fx.Node:
        if n in state:
            return n
        if n not in to_quant:
            qp = qparams[n]
            with graph.inserting_after(n):
                to_quant[n] = graph.call_function(
                    torch.quantize_per_tensor, (n, qp.scale, qp.zero_point, torch.quint8)
                )
        return to_quant[n]

    def as_float(n: Any) -> Any:
        if not isinstance(n, fx.Node) or n not in state:
            return n
        if n not in to_float:
            with graph.inserting_after(n):
                to_float[n] = graph.call_method("dequantize", (n,))
        return to_float[n]

    for node in list(graph.nodes):
        if node in plan.fused or node in to_quant.values() or node in to_float.values():
            continue
        site = plan.sites.get(node)
        if site is not None:
            out = qparams[site.observe] if site.observe is not None else None
            assert out is not None
            if site.kind == "layer":
                layer = ir.module(node)
                name = free_name(gm, str(node.target).replace(".", "_") + "_packed")
                setattr(gm, name, _packed_layer(layer, per_channel))
                with graph.inserting_before(node), warnings.catch_warnings():
                    # fx does not count a TorchScript object as a real attribute; it is one
                    warnings.simplefilter("ignore", UserWarning)
                    packed = graph.get_attr(name)
                node.op, node.target = "call_function", _int8_op(layer, site.act is not None)
                node.args = (as_quant(node.args[0]), packed, out.scale, out.zero_point)
                node.kwargs = {}
            elif site.kind == "add":
                fn = QOPS.add_relu.default if site.act else QOPS.add.default
                node.target = fn
                qa, qb = as_quant(node.args[0]), as_quant(node.args[1])
                node.args = (qa, qb, out.scale, out.zero_point)
            else:
                tensors = node.args[0] if node.args else node.kwargs["tensors"]
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
                node.target = QOPS.cat.default
                node.args = ([as_quant(t) for t in tensors], dim, out.scale, out.zero_point)
                node.kwargs = {}
            if site.act is not None:
                site.act.replace_all_uses_with(node)
                graph.erase_node(site.act)
            state.add(node)
            results[site.result] = node
            continue
        if node in plan.quantized:
            state.add(node)
            continue
        if node.op in ("placeholder", "get_attr") or _reads_metadata(node):
            continue
        node.args = fx.node.map_arg(node.args, as_float)
        node.kwargs = fx.node.map_arg(node.kwargs, as_float)
    return results


def _reads_metadata(node: fx.Node) -> bool:
    """``x.shape``, ``x.size()``, ``x.dim()``: fine on an int8 tensor, no dequantize needed."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("shape", "ndim", "dtype", "device")
    return node.op == "call_method" and node.target in ("size", "dim")


def _qdq_pair(graph: fx.Graph, n: fx.Node, qp: QParams, signed: bool) -> fx.Node:
    """Insert quantize → dequantize after ``n``; return the dequantize node."""
    zp, lo, hi, dtype = qp.zero_point, 0, 255, torch.uint8
    if signed:
        zp, lo, hi, dtype = zp - 128, -128, 127, torch.int8
    with graph.inserting_after(n):
        q = graph.call_function(QD.quantize_per_tensor.default, (n, qp.scale, zp, lo, hi, dtype))
    with graph.inserting_after(q):
        return graph.call_function(
            QD.dequantize_per_tensor.default, (q, qp.scale, zp, lo, hi, dtype)
        )


def to_qdq(
    ir: GraphIR,
    plan: Plan,
    qparams: dict[fx.Node, QParams],
    *,
    per_channel: bool,
    signed: bool,
) -> dict[fx.Node, fx.Node]:
    """Rewrite ``ir`` to the quantize/dequantize reference form; same numbers as ``int8``."""
    graph, gm = ir.graph, ir.gm
    dq: dict[fx.Node, fx.Node] = {}
    made: set[fx.Node] = set()
    results: dict[fx.Node, fx.Node] = {}

    def as_quant(n: fx.Node) -> fx.Node:
        # A passthrough of int8 values is re-quantized with its input's scale, as the int8
        # kernels do, so that onnxruntime sees every int8 op's input come from a dequantize.
        if n in made:
            return n
        if n not in dq:
            dq[n] = _qdq_pair(graph, n, qparams[n], signed)
            made.add(dq[n])
        return dq[n]

    for node in list(graph.nodes):
        site = plan.sites.get(node)
        if site is None:
            continue
        if site.kind == "layer":
            _layer_to_qdq(ir, node, as_quant(node.args[0]), per_channel)
        elif site.kind == "add":
            node.args = (as_quant(node.args[0]), as_quant(node.args[1]))
        else:
            tensors = node.args[0] if node.args else node.kwargs["tensors"]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            node.args, node.kwargs = ([as_quant(t) for t in tensors], dim), {}
        result = site.result
        assert site.observe is not None
        users = [u for u in result.users]
        out = _qdq_pair(graph, result, qparams[site.observe], signed)
        for u in users:
            u.replace_input_with(result, out)
        dq[result] = out
        made.add(out)
        results[result] = out
    gm.delete_all_unused_submodules()
    return results


def _layer_to_qdq(ir: GraphIR, node: fx.Node, x: fx.Node, per_channel: bool) -> None:
    layer: Any = ir.module(node)
    codes, scales = _weight_codes(layer, per_channel)
    scales = scales.expand(codes.shape[0]).contiguous()  # one scale per channel either way
    base = str(node.target).replace(".", "_")
    gm, graph = ir.gm, ir.graph
    names = {}
    for key, value in (
        ("weight_int8", codes),
        ("weight_scale", scales.float()),
        ("weight_zero_point", torch.zeros(scales.numel(), dtype=torch.int64)),
    ):
        names[key] = free_name(gm, f"{base}_{key}")
        gm.register_buffer(names[key], value)
    bias_name = None
    if layer.bias is not None:
        bias_name = free_name(gm, f"{base}_bias")
        gm.register_buffer(bias_name, layer.bias.detach().clone())
    with graph.inserting_before(node):
        w_codes = graph.get_attr(names["weight_int8"])
        w_scale = graph.get_attr(names["weight_scale"])
        w_zero = graph.get_attr(names["weight_zero_point"])
        weight = graph.call_function(
            QD.dequantize_per_channel.default,
            (w_codes, w_scale, w_zero, 0, -127, 127, torch.int8),
        )
        bias = graph.get_attr(bias_name) if bias_name else None
    if isinstance(layer, nn.Linear):
        node.op, node.target = "call_function", F.linear
        node.args, node.kwargs = (x, weight, bias), {}
    else:
        node.op, node.target = "call_function", _FUNCTIONAL[type(layer)]
        node.args = (x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
        node.kwargs = {}
