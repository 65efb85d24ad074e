"""SmoothQuant: move activation outliers into the weights of the Linears they feed.

Per-tensor int8 activations lose precision when a few input channels are much larger than
the rest (trained transformers' LayerNorm outputs have such channels). For input channel
``j`` of the Linears reading one activation ``X``, SmoothQuant (Xiao et al., 2023) picks

    s_j = max|X_j|^α / max|W_:,j|^(1−α)

(``max|X_j|`` over the calibration data, ``max|W_:,j|`` over every Linear reading ``X``) and
computes ``(X / s) · (s W)ᵀ``, which equals ``X · Wᵀ``: the activation's channels are evened
out, the weights' columns take the spread (they are quantized per output channel, and a
column scale spreads over many rows). ``α = 0.5`` balances both; larger ``α`` moves more.

``X / s`` costs nothing when it can be folded into what computes ``X``: a LayerNorm's (or a
Linear's) scale and bias, when ``X`` feeds only these Linears. Otherwise a multiply by
``1/s`` is inserted before them (one float elementwise op).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphopt import GraphIR
from graphopt.ir import ORIGIN, free_name

from .plan import record

__all__ = ["SmoothResult", "smooth"]


@dataclass
class SmoothResult:
    """Which Linear inputs were smoothed, and where each one's ``1/s`` went."""

    folded: list[str] = field(default_factory=list)  #: "x → ln (qkv)"
    inserted: list[str] = field(default_factory=list)  #: inputs that got a multiply


def _groups(ir: GraphIR, skip: Any) -> dict[fx.Node, list[fx.Node]]:
    """Each float activation read by plain Linear calls → those calls."""
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in ir.graph.nodes:
        if node.op != "call_module" or type(ir.module(node)) is not nn.Linear or skip(node):
            continue
        x = node.args[0]
        if isinstance(x, fx.Node):
            groups.setdefault(x, []).append(node)
    return groups


def _channel_max(
    ir: GraphIR, inputs: list[fx.Node], batches: list[tuple[Any, ...]]
) -> dict[fx.Node, torch.Tensor]:
    """``max|X_j|`` of each activation over the batches (all dims but the last)."""
    wanted = set(inputs)
    found: dict[fx.Node, torch.Tensor] = {}

    def sink(node: fx.Node, value: Any) -> None:
        if node in wanted and isinstance(value, torch.Tensor) and value.dim() >= 1:
            amax = value.detach().abs().float().reshape(-1, value.shape[-1]).amax(0)
            found[node] = torch.maximum(found[node], amax) if node in found else amax

    for batch in batches:
        record(ir.gm, batch, sink)
    return found


def _foldable(ir: GraphIR, x: fx.Node, users: list[fx.Node]) -> nn.Module | None:
    """The LayerNorm or Linear computing ``x``, if ``x`` feeds only ``users`` and it can take
    the division (an affine LayerNorm, or a Linear called once)."""
    if x.op != "call_module" or set(x.users) != set(users):
        return None
    module = ir.module(x)
    calls = sum(1 for n in ir.graph.nodes if n.op == "call_module" and n.target == x.target)
    if calls != 1:
        return None
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        return module
    if type(module) is nn.Linear:
        return module
    return None


def smooth(ir: GraphIR, batches: list[tuple[Any, ...]], alpha: float, skip: Any) -> SmoothResult:
    """Apply SmoothQuant with strength ``alpha`` to every Linear input (see the module doc)."""
    done = SmoothResult()
    groups = _groups(ir, skip)
    act = _channel_max(ir, list(groups), batches)
    for x, users in groups.items():
        if x not in act:
            continue
        layers: list[Any] = [ir.module(u) for u in users]
        w_max = torch.stack([m.weight.detach().abs().amax(0) for m in layers]).amax(0)
        a_max = act[x]
        if a_max.shape != w_max.shape:
            continue
        s = a_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
        s = torch.where((a_max > 0) & (w_max > 0), s, torch.ones_like(s)).clamp(1e-4, 1e4)
        for m in layers:
            m.weight.data.mul_(s)
        producer = _foldable(ir, x, users)
        names = ",".join(u.name for u in users)
        if isinstance(producer, nn.LayerNorm):
            producer.weight.data.div_(s)
            if producer.bias is not None:
                producer.bias.data.div_(s)
            done.folded.append(f"{x.name} → {x.target} ({names})")
        elif isinstance(producer, nn.Linear):
            producer.weight.data.div_(s[:, None])
            if producer.bias is not None:
                producer.bias.data.div_(s)
            done.folded.append(f"{x.name} → {x.target} ({names})")
        else:
            _insert_scale(ir, x, users, 1 / s)
            done.inserted.append(f"{x.name} ({names})")
    ir.gm.recompile()
    ir.invalidate()
    return done


def _insert_scale(ir: GraphIR, x: fx.Node, users: list[fx.Node], scale: torch.Tensor) -> None:
    name = free_name(ir.gm, f"{x.name}_smooth_scale")
    ir.gm.register_buffer(name, scale.to(torch.float32))
    with ir.graph.inserting_after(x):
        attr = ir.graph.get_attr(name)
    with ir.graph.inserting_after(attr):
        scaled = ir.graph.call_function(torch.mul, (x, attr))
    scaled.meta[ORIGIN] = x.meta.get(ORIGIN, x.name)
    for u in users:
        u.replace_input_with(x, scaled)
