"""SmoothQuant: move activation outliers into the weights of the Linears they feed.

Per-tensor int8 activations lose precision when a few input channels are much larger than
the rest (trained transformers' LayerNorm outputs have such channels). For input channel
``j`` of the Linears reading one activation ``X``, SmoothQuant (Xiao et al., 2023) picks

    s_j = max|X_j|^α / max|W_:,j|^(1−α)

(``max|X_j|`` over the calibration data, ``max|W_:,j|`` over every Linear reading ``X``) and
computes ``(X / s) · (s W)ᵀ``, which equals ``X · Wᵀ``: the activation's channels are evened
out, the weights' columns take the spread (they are quantized per output channel, and a
column scale spreads over many rows). ``α = 0.5`` balances both; larger ``α`` moves more.

Smoothing is applied to an input only where it has outlier channels (its largest channel
range at least 8× the median one) and where it lowers the int8 error of the Linears reading
it, judged on up to 512 calibration rows (activations rounded per tensor, weights per
output channel, as the kernels do). Without outliers it was measured to cost up to 0.8 dB
end to end on random-weight ViTs even where it lowered that local error, hence the first
condition.

``X / s`` is folded into what computes ``X``: a LayerNorm's (or a Linear's) scale and bias,
when ``X`` feeds only these Linears, so the float model computes the same function with
no extra op. Inputs with nothing to fold into are left alone: a multiply by ``1/s``
inserted before the Linears was measured, and lost 3 dB on a ViT (its int8 input then
carries the spread the weights took away, and the rounding error grows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphopt import GraphIR

from .observers import (
    MinMaxObserver,
    Observer,
    activation_qparams,
    fake_quantize,
    quantize_weight,
    weight_qparams,
)
from .plan import record

__all__ = ["SmoothResult", "smooth"]


@dataclass
class SmoothResult:
    """Which Linear inputs were smoothed, and which were not and why."""

    folded: list[str] = field(default_factory=list)  #: "x → ln (qkv)"
    skipped: list[str] = field(default_factory=list)  #: inputs with nothing to fold into
    declined: list[str] = field(default_factory=list)  #: inputs where it did not help


#: rows of each Linear input kept to judge whether smoothing helps it
SAMPLE_ROWS = 512
#: calibration batches the channel ranges are taken from
STAT_BATCHES = 8
#: an input has outlier channels when its largest channel range is this many times the
#: median channel range (a LayerNorm output of random weights measured 1.3 to 2)
OUTLIER_SPREAD = 8.0


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


def _statistics(
    ir: GraphIR, inputs: list[fx.Node], batches: list[tuple[Any, ...]]
) -> tuple[dict[fx.Node, torch.Tensor], dict[fx.Node, torch.Tensor]]:
    """``max|X_j|`` of each activation over the batches (all dims but the last), and up to
    :data:`SAMPLE_ROWS` of its rows."""
    wanted = set(inputs)
    amax: dict[fx.Node, torch.Tensor] = {}
    rows: dict[fx.Node, torch.Tensor] = {}

    def sink(node: fx.Node, value: Any) -> None:
        if node in wanted and isinstance(value, torch.Tensor) and value.dim() >= 1:
            flat = value.detach().float().reshape(-1, value.shape[-1])
            top = flat.abs().amax(0)
            amax[node] = torch.maximum(amax[node], top) if node in amax else top
            have = rows.get(node, flat[:0])
            rows[node] = torch.cat([have, flat[: SAMPLE_ROWS - len(have)]])

    for batch in batches[:STAT_BATCHES]:
        record(ir.gm, batch, sink)
    return amax, rows


def _reads_metadata(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return True  # x.shape, x.dtype …
    return node.op == "call_method" and node.target in ("size", "dim")


def _foldable(ir: GraphIR, x: fx.Node, users: list[fx.Node]) -> tuple[Any, Any, bool] | None:
    """Where ``1/s`` can go: the weight and bias (and whether the weight holds rows) of the
    LayerNorm or Linear computing ``x``, if ``x``'s values go only to ``users``. An affine
    LayerNorm module or ``F.layer_norm`` on stored weights (as fx traces timm's LayerNorm),
    or a Linear called once."""
    readers = {u for u in x.users if not _reads_metadata(u)}
    if readers != set(users):
        return None
    if x.op == "call_function" and x.target is F.layer_norm:
        args = [*x.args, None, None, None]
        w_node, b_node = x.kwargs.get("weight", args[2]), x.kwargs.get("bias", args[3])
        weight, bias = _stored(ir, w_node), _stored(ir, b_node)
        once = all(len(a.users) == 1 for a in (w_node, b_node) if isinstance(a, fx.Node))
        return (weight, bias, False) if weight is not None and once else None
    if x.op != "call_module":
        return None
    module = ir.module(x)
    calls = sum(1 for n in ir.graph.nodes if n.op == "call_module" and n.target == x.target)
    if calls != 1:
        return None
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        return module.weight, module.bias, False
    if type(module) is nn.Linear:
        return module.weight, module.bias, True
    return None


def _stored(ir: GraphIR, node: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads, else None."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = ir.fetch(str(node.target))
        return value if isinstance(value, torch.Tensor) else None
    return None


def _int8_error(
    x: torch.Tensor, weights: list[torch.Tensor], qmax: int, observer: Callable[[], Observer]
) -> float:
    """Squared error of ``x·Wᵀ`` for each W when ``x`` is rounded to int8 per tensor (over
    the range ``observer`` picks, as calibration would) and W per output channel: the error
    the Linears' kernels would make."""
    obs = observer()
    obs.observe(x)
    obs.freeze()
    obs.observe_again(x)
    scale, zp = activation_qparams(*obs.range(), symmetric=False, qmin=0, qmax=qmax)
    xq = fake_quantize(x, scale, zp, 0, qmax)
    err = 0.0
    for w in weights:
        scales = weight_qparams(w, per_channel=True)
        wq = quantize_weight(w, scales).float() * scales[:, None]
        err += float((x @ w.t() - xq @ wq.t()).pow(2).sum())
    return err


def smooth(
    ir: GraphIR,
    batches: list[tuple[Any, ...]],
    alpha: float,
    skip: Any,
    *,
    qmax: int = 127,
    observer: Callable[[], Observer] = MinMaxObserver,
) -> SmoothResult:
    """Apply SmoothQuant with strength ``alpha`` (see the module doc) to each Linear input
    where it can be folded and where it lowers the Linears' int8 error on the calibration
    rows (activations rounded to ``[0, qmax]`` over the range ``observer`` picks)."""
    done = SmoothResult()
    groups = _groups(ir, skip)
    act, rows = _statistics(ir, list(groups), batches)
    for x, users in groups.items():
        names = ",".join(u.name for u in users)
        layers: list[Any] = [ir.module(u) for u in users]
        weights = [m.weight.detach().float() for m in layers]
        w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
        if x not in act or act[x].shape != w_max.shape:
            continue
        a_max = act[x]
        s = a_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
        s = torch.where((a_max > 0) & (w_max > 0), s, torch.ones_like(s)).clamp(1e-4, 1e4)
        producer = _foldable(ir, x, users)
        if producer is None:  # an inserted multiply measured worse than none (module doc)
            done.skipped.append(f"{x.name} ({names})")
            continue
        if float(a_max.max()) < OUTLIER_SPREAD * float(a_max.median()):
            done.declined.append(f"{x.name} ({names})")  # no outlier channels to even out
            continue
        sample = rows[x]
        smoothed = _int8_error(sample / s, [w * s for w in weights], qmax, observer)
        if smoothed >= _int8_error(sample, weights, qmax, observer):
            done.declined.append(f"{x.name} ({names})")
            continue
        weight, bias, rows_first = producer
        with torch.no_grad():
            for m in layers:
                m.weight.mul_(s)
            weight.div_(s[:, None] if rows_first else s)
            if bias is not None:
                bias.div_(s)
        done.folded.append(f"{x.name} → {x.target} ({names})")
    ir.gm.recompile()
    ir.invalidate()
    return done
