"""``quant``: int8 quantization on real int8 kernels, keeping an accuracy target.

The pass quantizes in one of three *modes*:

* ``static``: the ops that have int8 kernels (conv and linear layers fused with a following
  ReLU, adds and concats where int8 saves work) and the ops that compute on int8 values
  directly (pooling, ReLU/ReLU6, reshapes, splits) run in int8, with every activation's
  range calibrated on the user's data;
* ``dynamic``: ``Linear`` (and ``LSTM``) in int8, activations quantized on the fly — the
  default for token models (integer inputs into an embedding);
* ``weight_only``: ``Linear`` weights in int8 or int4 (group-wise scales), activations float.

and writes one of four *forms* — fbgemm int8 kernels (``int8``, ``.pt``), quantize/
dequantize pairs (``qdq``, what ``.onnx`` holds), aten int8 kernels (``aten``, exportable)
or trainable fake-quant (``qat``) — by default the one the output format can hold
(:mod:`graphopt.passes.quant.forms`). torch's ``MultiheadAttention`` and transformer layers
are first expanded into their ops so their Linears quantize too
(:mod:`graphopt.passes.quant.expand`).

Static quantization keeps an accuracy target: the output SQNR against the float model
(25 dB unless ``min_sqnr`` says otherwise) or a drop in accuracy (``max_drop``). The
pass keeps the cheapest ops in float that meet it (:mod:`graphopt.passes.quant.search`) and
says which and why in the ledger and in :func:`quant_report`.

Weights are int8, symmetric, per output channel; activations uint8 per tensor, asymmetric
or symmetric; the formulas are in :mod:`graphopt.passes.quant.observers`.

>>> import torch, graphopt
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
>>> x = torch.randn(4, 3, 16, 16)
>>> result = graphopt.optimize(model, "quant", example_inputs=(x,), data=[(x,)])
>>> [str(n.target) for n in result.ir.graph.nodes if "quantized" in str(n.target)]
['quantized.conv2d_relu.new']
>>> result.ledger[-1].notes[0].split(";")[0]
'mode=static: picked form=int8, the fastest in PyTorch (no output format given)'

"""

from __future__ import annotations

from .quantize import DEFAULT_MARGIN_DB, DEFAULT_MIN_SQNR, Quant
from .report import FloatChoice, LayerSensitivity, QuantReport, quant_report, sqnr_db

__all__ = [
    "DEFAULT_MARGIN_DB",
    "DEFAULT_MIN_SQNR",
    "FloatChoice",
    "LayerSensitivity",
    "Quant",
    "QuantReport",
    "quant_report",
    "sqnr_db",
]

PASSES = (Quant,)
