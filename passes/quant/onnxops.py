"""Dynamic int8 Linear in ONNX: ``DynamicQuantizeLinear`` + ``MatMulInteger`` + rescale.

This is the ``form=onnx`` of dynamic quantization, what plain ``quant`` writes for a token
model with ``-o model.onnx``. Each Linear becomes one call of the custom op
``graphopt::dynamic_linear_int8(x, weight, scale, bias)``:

* ``x`` (float) is quantized over its own range on every call, as ONNX's
  ``DynamicQuantizeLinear`` does: ``lo = min(x_min, 0)``, ``hi = max(x_max, 0)``,
  ``s = (hi − lo) / 255``, ``zp = clamp(round(−lo / s), 0, 255)``,
  ``q = clamp(round(x / s) + zp, 0, 255)`` (uint8);
* ``weight`` is ``K × N`` int8 codes (the Linear's weight transposed), symmetric, with one
  scale per output column (``scale``, ``N`` floats) or one in all;
* ``y = ((q − zp) · weight) · (s · scale) + bias``, the integer product accumulated in int32.

In PyTorch the op computes exactly that (the integer product in float, exact for the sums
int8 Linears reach); the ONNX exporter translates it (:data:`TRANSLATIONS`, passed to
``torch.onnx.export`` through :data:`graphopt.lowering.ONNX_TRANSLATIONS`) into the standard
ops ``DynamicQuantizeLinear → MatMulInteger → Cast → Mul(Mul(s, scale)) → Add``, the pattern
onnxruntime fuses into one ``DynamicQuantizeMatMul`` kernel (per-column scales included).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.flop_counter import register_flop_formula

__all__ = ["DYNAMIC_LINEAR", "TRANSLATIONS", "dynamic_linear_int8"]


@torch.library.custom_op("graphopt::dynamic_linear_int8", mutates_args=())
def dynamic_linear_int8(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x · Wᵀ + b`` with ``x`` quantized to uint8 over its own range and ``W`` int8."""
    lo, hi = x.amin().clamp(max=0), x.amax().clamp(min=0)
    s = (hi - lo) / 255
    s = torch.where(s > 0, s, torch.ones_like(s))
    zp = torch.round(-lo / s).clamp(0, 255)
    q = (torch.round(x / s) + zp).clamp(0, 255)
    y = torch.matmul(q - zp, weight.to(x.dtype)) * (s * scale)
    return y if bias is None else y + bias


@dynamic_linear_int8.register_fake
def _(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[1]))


@register_flop_formula(torch.ops.graphopt.dynamic_linear_int8)
def _flops(x: Any, weight: Any, *args: Any, **kwargs: Any) -> int:
    """What torch's FLOP counter (and so graphopt's MAC count) charges for one call."""
    return 2 * math.prod(x[:-1]) * weight[0] * weight[1]


def _onnx_dynamic_linear(x: Any, weight: Any, scale: Any, bias: Any = None) -> Any:
    """The ONNX translation: the standard integer ops onnxruntime fuses into one kernel."""
    import onnx
    from onnxscript import opset18 as op

    q, s, zp = op.DynamicQuantizeLinear(x)
    zero = onnx.helper.make_tensor("zero", onnx.TensorProto.INT8, [], [0])
    acc = op.MatMulInteger(q, weight, zp, op.Constant(value=zero))
    y = op.Mul(op.Cast(acc, to=onnx.TensorProto.FLOAT), op.Mul(s, scale))
    return y if bias is None else op.Add(y, bias)


#: the op as graphs call it
DYNAMIC_LINEAR = torch.ops.graphopt.dynamic_linear_int8.default
#: the ONNX exporter's translations of this module's ops
TRANSLATIONS = {DYNAMIC_LINEAR: _onnx_dynamic_linear}
