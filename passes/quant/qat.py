"""Quantization-aware training: the quantization points as trainable fake-quant.

``form=qat`` puts a :class:`FakeQuant` after every value the int8 form would quantize and
fake-quantizes each conv/linear weight per channel through a parametrization, so training
(e.g. the ``distill`` pass) sees int8 rounding. Both use ``torch.fake_quantize_*``, whose
gradient is the straight-through estimator: 1 inside the quantization range, 0 outside. In
training mode a FakeQuant keeps following its input's range with a moving average. Running
``quant`` again on such a model bakes the trained weights and uses the learnt ranges.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.nn.utils import parametrize

from graphopt import GraphIR

from .convert import QParams
from .observers import activation_qparams, weight_qparams
from .plan import Plan

__all__ = ["FakeQuant", "WeightFakeQuant", "to_qat", "weights_from_qat"]


class FakeQuant(nn.Module):
    """Per-tensor fake quantization with a range that follows the data while training."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    def __init__(
        self, qp: QParams, qmin: int, qmax: int, symmetric: bool = False, c: float = 0.01
    ) -> None:
        super().__init__()
        self.qmin, self.qmax, self.symmetric, self.c = qmin, qmax, symmetric, c
        self.register_buffer("scale", torch.tensor([qp.scale], dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor([qp.zero_point], dtype=torch.int32))
        lo = (qmin - qp.zero_point) * qp.scale
        self.register_buffer("lo", torch.tensor(lo, dtype=torch.float32))
        self.register_buffer("hi", torch.tensor(lo + (qmax - qmin) * qp.scale))

        # Python copies of the buffers for the forward pass: the tensor overload of
        # fake_quantize reads them with .item(), which shape propagation cannot fake.
        self._qp = qp

    @property
    def qparams(self) -> QParams:
        """The current scale and zero point."""
        return self._qp

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._qp = QParams(float(self.scale), int(self.zero_point))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not is_fake(x):  # shape propagation runs modules as they are
            with torch.no_grad():
                self.lo += self.c * (x.min() - self.lo)
                self.hi += self.c * (x.max() - self.hi)
                scale, zp = activation_qparams(
                    float(self.lo),
                    float(self.hi),
                    symmetric=self.symmetric,
                    qmin=self.qmin,
                    qmax=self.qmax,
                )
                self.scale.fill_(scale)
                self.zero_point.fill_(zp)
                self._qp = QParams(scale, zp)
        qp = self._qp
        return torch.fake_quantize_per_tensor_affine(
            x, qp.scale, qp.zero_point, self.qmin, self.qmax
        )


class WeightFakeQuant(nn.Module):
    """Parametrization: the weight as its symmetric int8 codes would reproduce it."""

    def __init__(self, per_channel: bool = True) -> None:
        super().__init__()
        self.per_channel = per_channel

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scales = weight_qparams(weight, per_channel=self.per_channel).detach()
        scales = scales.expand(weight.shape[0]).contiguous()
        zeros = torch.zeros(weight.shape[0], dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scales, zeros, 0, -127, 127)


def to_qat(
    ir: GraphIR,
    plan: Plan,
    qparams: dict[fx.Node, QParams],
    qrange: tuple[int, int],
    *,
    per_channel: bool,
    symmetric: bool = False,
) -> dict[fx.Node, fx.Node]:
    """Insert :class:`FakeQuant` after every quantized value and fake-quantize weights."""
    graph, gm = ir.graph, ir.gm
    results: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(list(plan.observed)):
        name = f"fake_quant_{i}"
        gm.add_module(name, FakeQuant(qparams[node], *qrange, symmetric=symmetric))
        users = list(node.users)
        with graph.inserting_after(node):
            fq = graph.call_module(name, (node,))
        for u in users:
            u.replace_input_with(node, fq)
        results[node] = fq
    for site in plan.sites.values():
        if site.kind == "layer":
            layer = ir.module(site.node)
            if not parametrize.is_parametrized(layer, "weight"):
                parametrize.register_parametrization(layer, "weight", WeightFakeQuant(per_channel))
    return results


def weights_from_qat(ir: GraphIR) -> dict[str, QParams]:
    """Undo :func:`to_qat` keeping what training learnt: bake weights, return the ranges.

    Returns the learnt scale and zero point of each value a FakeQuant followed, by the
    name of that value's node; the FakeQuant nodes are removed.
    """
    learnt: dict[str, QParams] = {}
    for node in list(ir.graph.nodes):
        if node.op == "call_module" and isinstance(ir.module(node), FakeQuant):
            src = node.args[0]
            assert isinstance(src, fx.Node)
            fake_quant: Any = ir.module(node)
            learnt[src.name] = fake_quant.qparams
            node.replace_all_uses_with(src)
            ir.graph.erase_node(node)
    for module in ir.gm.modules():
        m: Any = module
        if parametrize.is_parametrized(m, "weight"):
            chain: Any = m.parametrizations["weight"]
            fqs = [p for p in chain if isinstance(p, WeightFakeQuant)]
            if fqs:
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
    if learnt:
        ir.recompile()
        ir.invalidate()
    return learnt
