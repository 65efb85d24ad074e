"""Linear-only forms: dynamic int8 and weight-only int8/int4, on PyTorch's CPU kernels.

* Dynamic int8, ``form=int8``: every ``Linear`` becomes ``torch.ao.nn.quantized.dynamic.Linear``
  (fbgemm's ``quantized::linear_dynamic``: activations quantized per tensor on the fly,
  per-channel int8 weights) and every ``LSTM`` its dynamic counterpart; the model pickles
  (``.pt``) but does not export.
* Dynamic int8, ``form=aten``: the same idea in plain aten ops, which ``torch.export`` keeps
  (``.pt2``, folder): each row (token) of the input gets its own symmetric int8 scale,
  ``torch._int_mm`` multiplies int8 by int8 into int32, and the result is rescaled by the
  row's and the output channel's scales.
* Dynamic int8, ``form=onnx``: each Linear becomes ``graphopt::dynamic_linear_int8``, which
  the ONNX exporter writes as ``DynamicQuantizeLinear`` + ``MatMulInteger`` + rescale
  (uint8 activations over each tensor's own range, int8 weights per output channel; see
  :mod:`graphopt.passes.quant.onnxops`).
* Weight-only, ``mode=weight_only``: weights stored as int8 per output channel
  (``aten._weight_int8pack_mm``) or as int4 with one scale and offset per group of
  ``group_size`` inputs (``aten._weight_int4pack_mm_for_cpu``); activations stay float and
  enter the kernel as bfloat16 (the kernels are vectorised for bfloat16 only). This is the
  memory-bound decoder recipe: the weights are 4× (int8) or about 7× (int4) smaller.

int4 codes ``q ∈ [0, 15]`` per group ``g`` of a row: ``scale_g = (max_g − min_g) / 15``,
``q = round((w − min_g) / scale_g)``, and the kernel computes ``ŵ = (q − 8)·scale_g + zero_g``
with ``zero_g = min_g + 8·scale_g`` (scales and offsets stored in bfloat16).

Each rewrite leaves only torch ops and tensors in the graph, so the artifacts need no
graphopt to run.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphopt import GraphIR
from graphopt.ir import ORIGIN, free_name

from .observers import quantize_weight, weight_qparams

__all__ = [
    "INT4_GROUPS",
    "dynamic_aten",
    "dynamic_int8",
    "dynamic_onnx",
    "int4_codes",
    "int4_fits",
    "linears",
    "weight_only",
]

#: group sizes the int4 CPU kernel takes
INT4_GROUPS = (32, 64, 128, 256)
ATEN = torch.ops.aten


def linears(ir: GraphIR, skip: Callable[[fx.Node], bool]) -> list[fx.Node]:
    """Calls of plain ``nn.Linear`` modules (not skipped) with a known input of rank ≥ 1."""
    found = []
    for node in ir.graph.nodes:
        if node.op == "call_module" and type(ir.module(node)) is nn.Linear and not skip(node):
            found.append(node)
    return found


def _module_uses(graph: fx.Graph) -> dict[str, int]:
    uses: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            uses[str(node.target)] = uses.get(str(node.target), 0) + 1
    return uses


def _set_module(gm: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    setattr(owner, leaf, module)


def _place(gm: fx.GraphModule, node: fx.Node, module: nn.Module, uses: dict[str, int]) -> str:
    """Put ``module`` where ``node``'s module was (a shared one gets a copy per site)."""
    target = str(node.target)
    if uses[target] == 1:
        _set_module(gm, target, module)
        return target
    name = free_name(gm, target.replace(".", "_") + "_site")
    gm.add_module(name, module)
    return name


def _qweight(layer: nn.Linear, per_channel: bool) -> torch.Tensor:
    """The layer's weight as a quantized tensor (symmetric int8), for torch's packers."""
    scales = weight_qparams(layer.weight, per_channel=per_channel)
    codes = quantize_weight(layer.weight, scales)
    with warnings.catch_warnings():  # torch 2.10+ deprecates quantized tensor constructors
        warnings.simplefilter("ignore", UserWarning)
        if per_channel:
            return torch.quantize_per_channel(
                codes.float() * scales[:, None],
                scales.double(),
                torch.zeros(scales.numel(), dtype=torch.long),
                0,
                torch.qint8,
            )
        return torch.quantize_per_tensor(codes.float() * scales, float(scales), 0, torch.qint8)


def dynamic_int8(
    ir: GraphIR, skip: Callable[[fx.Node], bool], *, per_channel: bool, reduce_range: bool = True
) -> list[str]:
    """Replace Linear and LSTM modules by torch's dynamic int8 kernels; return their names.

    With ``reduce_range`` (torch's dynamic ``Linear`` module always asks for it) activations
    are quantized to 7 bits; without it, each Linear becomes a call of
    ``quantized::linear_dynamic`` with 8-bit activations on its packed weights (about 4.5 dB
    more accurate, the same speed; only for CPUs with VNNI, where the int8 products
    accumulate in int32 without saturating)."""
    import torch.ao.nn.quantized.dynamic as nnqd

    done = []
    uses = _module_uses(ir.graph)
    for node in list(ir.graph.nodes):
        if node.op != "call_module" or skip(node):
            continue
        m: Any = ir.module(node)
        q: Any
        if type(m) is nn.Linear and not reduce_range:
            bias = m.bias.detach().float() if m.bias is not None else None
            f = _Emit(ir, node)
            packed = f.packed(torch.ops.quantized.linear_prepack(_qweight(m, per_channel), bias))
            y = f.fn(torch.ops.quantized.linear_dynamic.default, node.args[0], packed, False)
            ir.replace(node, y)
            done.append(node.name)
            continue
        if type(m) is nn.Linear:
            q = nnqd.Linear(m.in_features, m.out_features, bias_=m.bias is not None)
            bias = m.bias.detach().float() if m.bias is not None else None
            q.set_weight_bias(_qweight(m, per_channel), bias)
        elif type(m) is nn.LSTM:
            q = _dynamic_lstm(m)
        else:
            continue
        node.target = _place(ir.gm, node, q, uses)
        done.append(node.name)
    return done


def _dynamic_lstm(m: Any) -> nn.Module:
    import torch.ao.nn.quantized.dynamic as nnqd
    from torch.ao.quantization.qconfig import default_dynamic_qconfig

    m.qconfig = default_dynamic_qconfig
    try:
        return nnqd.LSTM.from_float(m)
    finally:
        del m.qconfig


class _Emit:
    """Adds nodes before one call, each carrying that call's provenance."""

    def __init__(self, ir: GraphIR, node: fx.Node) -> None:
        self.ir, self.node = ir, node
        self.origin = node.meta.get(ORIGIN, node.name)
        self.base = str(node.target).replace(".", "_")

    def __call__(self, op: str, target: Any, *args: Any) -> fx.Node:
        with self.ir.graph.inserting_before(self.node):
            new = self.ir.graph.create_node(op, target, args, {})
        new.meta[ORIGIN] = self.origin
        return new

    def fn(self, target: Any, *args: Any) -> fx.Node:
        return self("call_function", target, *args)

    def method(self, name: str, *args: Any) -> fx.Node:
        return self("call_method", name, *args)

    def tensor(self, suffix: str, value: torch.Tensor) -> fx.Node:
        name = free_name(self.ir.gm, f"{self.base}_{suffix}")
        self.ir.gm.register_buffer(name, value)
        return self("get_attr", name)

    def packed(self, value: Any) -> fx.Node:
        """A read of packed weights (a TorchScript object, which pickles with the model)."""
        name = free_name(self.ir.gm, f"{self.base}_packed")
        setattr(self.ir.gm, name, value)
        with warnings.catch_warnings():  # fx does not count a TorchScript object as one
            warnings.simplefilter("ignore", UserWarning)
            return self("get_attr", name)

    def rows(self, x: Any, k: int) -> tuple[fx.Node, fx.Node]:
        """``x`` as a matrix of rows of ``k`` inputs, and the shape to give the result."""
        lead = self.fn(operator.getitem, self.fn(getattr, x, "shape"), slice(None, -1))
        return self.method("reshape", x, -1, k), lead

    def finish(self, y: fx.Node, lead: fx.Node, n: int, bias: torch.Tensor | None) -> None:
        if bias is not None:
            y = self.fn(operator.add, y, self.tensor("bias", bias.detach().clone()))
        out = self.method("reshape", y, self.fn(operator.add, lead, (n,)))
        self.ir.replace(self.node, out)


def dynamic_aten(ir: GraphIR, skip: Callable[[fx.Node], bool]) -> list[str]:
    """Replace Linear calls by per-row dynamic int8 in aten ops (``torch._int_mm``)."""
    done = []
    tiny = torch.finfo(torch.float32).tiny
    for node in linears(ir, skip):
        layer: Any = ir.module(node)
        scales = weight_qparams(layer.weight, per_channel=True)
        codes = quantize_weight(layer.weight, scales)
        f = _Emit(ir, node)
        rows, lead = f.rows(node.args[0], layer.in_features)
        amax = f.method("amax", f.method("abs", rows), -1, True)
        x_scale = f.fn(operator.truediv, f.method("clamp", amax, tiny), 127.0)
        x_codes = f.method(
            "to", f.fn(torch.round, f.fn(operator.truediv, rows, x_scale)), torch.int8
        )
        acc = f.fn(torch._int_mm, x_codes, f.tensor("weight_t_int8", codes.t().contiguous()))
        scale = f.fn(operator.mul, x_scale, f.tensor("weight_scale", scales.float()))
        y = f.fn(operator.mul, f.method("float", acc), scale)
        f.finish(y, lead, layer.out_features, layer.bias)
        done.append(node.name)
    return done


def dynamic_onnx(
    ir: GraphIR, skip: Callable[[fx.Node], bool], *, per_channel: bool, pair_max: int | None
) -> list[str]:
    """Replace Linear calls by the ONNX dynamic int8 Linear (``pair_max=127`` keeps the
    uint8 × int8 pair sums of CPUs without VNNI from saturating; see
    :func:`~.observers.weight_qparams`)."""
    from .onnxops import DYNAMIC_LINEAR

    done = []
    for node in linears(ir, skip):
        layer: Any = ir.module(node)
        scales = weight_qparams(layer.weight, per_channel=per_channel, pair_max=pair_max)
        codes = quantize_weight(layer.weight, scales)
        f = _Emit(ir, node)
        weight = f.tensor("weight_t_int8", codes.t().contiguous())
        scale = f.tensor("weight_scale", scales.float())
        bias = f.tensor("bias", layer.bias.detach().clone()) if layer.bias is not None else None
        y = f.fn(DYNAMIC_LINEAR, node.args[0], weight, scale, bias)
        ir.replace(node, y)
        done.append(node.name)
    return done


def int4_codes(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4 codes (int32 in [0, 15]), scales and zeros (``N × K/group_size``, bfloat16) of a
    weight, such that ``ŵ = (q − 8)·scale + zero`` group by group."""
    n, k = weight.shape
    groups = weight.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=torch.finfo(torch.bfloat16).tiny).bfloat16()
    zero = (lo + 8 * scale.float()).bfloat16()
    # codes from the stored (bfloat16) scale and zero, so ŵ is as close to w as they allow
    q = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None]) + 8
    return q.clamp(0, 15).to(torch.int32).reshape(n, k), scale, zero


def int4_fits(layer: nn.Linear, group_size: int) -> bool:
    """Whether the int4 kernel takes this layer's shape (N a multiple of 16, K of the group;
    :func:`graphopt.passes.quant.search.dequantized_weight` follows the same rule)."""
    return layer.out_features % 16 == 0 and layer.in_features % group_size == 0


def weight_only(
    ir: GraphIR, skip: Callable[[fx.Node], bool], *, bits: int, group_size: int
) -> tuple[list[str], list[str]]:
    """Replace Linear calls by weight-only int8/int4 kernels. Returns the layers done and
    those that fell back to int8 because the int4 kernel does not take their shape."""
    done, fallback = [], []
    for node in linears(ir, skip):
        layer: Any = ir.module(node)
        k, n = layer.in_features, layer.out_features
        f = _Emit(ir, node)
        rows, lead = f.rows(node.args[0], k)
        x = f.method("to", rows, torch.bfloat16)
        if bits == 4 and int4_fits(layer, group_size):
            codes, scale, zero = int4_codes(layer.weight, group_size)
            packed = ATEN._convert_weight_to_int4pack_for_cpu(codes, 1)
            scale_zero = torch.stack([scale.t(), zero.t()], -1).contiguous()  # K/g × N × 2
            weight = f.tensor("weight_int4", packed)
            params = f.tensor("weight_scale_zero", scale_zero)
            y = f.fn(ATEN._weight_int4pack_mm_for_cpu.default, x, weight, group_size, params)
        else:
            if bits == 4:
                fallback.append(node.name)
            scales = weight_qparams(layer.weight, per_channel=True)
            weight = f.tensor("weight_int8", quantize_weight(layer.weight, scales))
            y = f.fn(
                ATEN._weight_int8pack_mm.default,
                x,
                weight,
                f.tensor("weight_scale", scales.bfloat16()),
            )
        y = f.method("to", y, layer.weight.dtype)
        f.finish(y, lead, n, layer.bias)
        done.append(node.name)
    return done, fallback
