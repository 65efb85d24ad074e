"""``depthwise``: replace standard convolutions by a depthwise + pointwise pair, without training.

For a convolution with weight ``W`` of shape ``N×C×k₁×k₂…`` (groups=1, kernel larger than
1×1), each input channel ``c`` contributes ``Σ_n W[n, c] ⋆ x_c``: the ``N×k²`` slice
``W[:, c]`` is a matrix whose rows are the kernels applied to channel ``c``. Its SVD
``U S Vᵀ`` truncated to rank ``T`` gives ``T`` depthwise kernels (rows of ``√S Vᵀ``) and the
pointwise weights (columns of ``U √S``) that mix them into the ``N`` outputs. So the pair
``Conv(C → C·T, k, groups=C)`` then ``Conv(C·T → N, 1)`` computes exactly the original at
``T = min(N, k²)`` and, below that, the best rank-``T`` approximation of every slice
(Eckart–Young). Its MACs relative to the original are ``T/N + T/k²``.

>>> import torch, graphopt
>>> model = torch.nn.Sequential(torch.nn.Conv2d(16, 64, 3, padding=1)).eval()
>>> x = torch.randn(1, 16, 8, 8)
>>> result = graphopt.optimize(model, "depthwise(rank=2)", example_inputs=(x,))
>>> [type(m).__name__ for m in result.ir.gm.modules()][1:]
['Conv2d', 'Conv2d']
>>> result.ledger[-1].macs / result.ledger[0].macs  # 2/64 + 2/9
0.2534722222222222
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

import graphopt
from graphopt import GraphIR, GraphoptError, NamePatterns, PassContext

__all__ = ["Depthwise", "DepthwisePlan", "depthwise_factors", "macs_ratio"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_DEFAULT_MAX_ERROR = 0.1


@dataclass(frozen=True)
class DepthwisePlan:
    """What the pass decided for one convolution module."""

    target: str
    rank: int
    full_rank: int
    macs_ratio: float
    weight_error: float


def _channel_slices(weight: torch.Tensor) -> torch.Tensor:
    """``N×C×k…`` → ``C×N×k²``: one matrix per input channel, rows are output kernels."""
    n, c = weight.shape[:2]
    return weight.detach().double().reshape(n, c, -1).transpose(0, 1)


def _slice_spectrum(slices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Eigen-decomposition of each slice's smaller Gram matrix, largest eigenvalue first.

    Returns ``(σ², basis, right)``: the squared singular values and, when ``right``, the
    right singular vectors (``k²`` side, ``k² ≤ N``), else the left ones. A batched SVD of
    ``C`` tall ``N×k²`` matrices is one to two orders of magnitude slower on CPU than the
    symmetric eigensolver on the ``k²×k²`` (or ``N×N``) Gram matrices, and the factors below
    never divide by an eigenvalue, so nothing is lost at full rank.
    """
    right = slices.shape[-1] <= slices.shape[-2]
    gram = slices.mT @ slices if right else slices @ slices.mT
    values, vectors = torch.linalg.eigh(gram)
    return values.flip(-1).clamp_min(0), vectors.flip(-1), right


def _tail_errors(weight: torch.Tensor) -> torch.Tensor:
    """Relative weight error ‖W − W_T‖/‖W‖ for every T = 0 … full rank (index T)."""
    sigma2 = _slice_spectrum(_channel_slices(weight))[0].sum(0)  # summed over channels
    total = sigma2.sum()
    if total == 0:
        return torch.zeros(sigma2.numel() + 1, dtype=torch.float64)
    kept = torch.cat([sigma2.new_zeros(1), sigma2.cumsum(0)])
    return (1 - kept / total).clamp_min(0).sqrt()


def macs_ratio(rank: int, out_channels: int, kernel_numel: int) -> float:
    """MACs of the depthwise + pointwise pair over those of the original convolution."""
    return rank / out_channels + rank / kernel_numel


def depthwise_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise (``C·T×1×k…``) and pointwise (``N×C·T×1…``) weights of the rank-T pair.

    Channel ``c``'s kernels are outputs ``c·T … c·T+T−1`` of the depthwise conv, the order a
    grouped convolution with ``groups=C`` uses. With ``v`` the top singular vectors of the
    slice ``A`` (right side), ``A v vᵀ`` is its best rank-T approximation; the projection
    ``A v = U S`` is computed directly, and the singular values are split evenly (``√S`` on
    each side) so both factors have comparable scales.
    """
    n, c, *kernel = weight.shape
    slices = _channel_slices(weight)  # C×N×k²
    rank = min(rank, min(slices.shape[-2:]))
    _, basis, right = _slice_spectrum(slices)
    basis = basis[..., :rank]
    if right:  # basis: C×k²×T right vectors; U·S = A·v
        mixed, kernels = slices @ basis, basis.mT  # C×N×T, C×T×k²
        sigma = mixed.norm(dim=-2)  # C×T
    else:  # basis: C×N×T left vectors; S·Vᵀ = uᵀ·A
        mixed, kernels = basis, basis.mT @ slices
        sigma = kernels.norm(dim=-1)
    root = sigma.sqrt()
    scale = torch.where(root > 0, root, torch.ones_like(root))
    if right:
        kernels, mixed = kernels * root.unsqueeze(-1), mixed / scale.unsqueeze(-2)
    else:
        kernels, mixed = kernels / scale.unsqueeze(-1), mixed * root.unsqueeze(-2)
    dw = kernels.reshape(c * rank, 1, *kernel)
    pw = mixed.permute(1, 0, 2).reshape(n, c * rank, *([1] * len(kernel)))
    return dw.to(weight.dtype), pw.to(weight.dtype)


class Depthwise(graphopt.Pass):
    """The ``depthwise`` pass: see the module docstring and ``docs/passes/depthwise.md``."""

    name = "depthwise"
    summary = (
        "Replace k×k convolutions by depthwise (multiplier T) + pointwise pairs from per-channel "
        "SVDs; lossy below full rank."
    )
    exact = False

    @dataclass
    class Options:
        max_error: float | None = graphopt.option(
            None,
            "per layer, the smallest T whose relative weight error stays within this budget "
            f"({_DEFAULT_MAX_ERROR} when neither rank nor macs_ratio is given)",
            ge=0,
            lt=1,
            what="a relative error",
        )
        rank: int | None = graphopt.option(
            None,
            "fixed channel multiplier T for every layer (capped at full rank min(N, k²)); "
            "replaces max_error",
            ge=1,
        )
        macs_ratio: float | None = graphopt.option(
            None,
            "per layer, the largest T whose MACs are at most this fraction of the original's; "
            "replaces max_error",
            gt=0,
            le=1,
            what="a fraction",
        )
        only_if_saves: bool = graphopt.option(
            True, "leave alone layers where the pair would not have fewer MACs"
        )
        ignore: tuple[str, ...] = graphopt.option(
            (), "convolutions to leave alone: module paths or node names, glob patterns allowed"
        )

    def run(self, ir: GraphIR, ctx: PassContext) -> None:
        opts = self.options
        self._check_rule()
        groups = self._eligible(ir, ctx)
        costs = ir.costs()  # before any rewrite: the original MACs of every convolution
        replaced = 0
        for target, nodes in groups.items():
            conv = cast(_ConvNd, ir.gm.get_submodule(target))
            plan = self._plan(target, conv)
            if plan is None:
                ctx.note(f"kept {target}: no rank meets macs_ratio={opts.macs_ratio}")
                continue
            if opts.only_if_saves and plan.macs_ratio >= 1:
                ctx.note(
                    f"kept {target}: T={plan.rank} (weight error {plan.weight_error:.3g}) would "
                    f"cost {plan.macs_ratio:.2f}× its MACs"
                )
                continue
            macs = sum(costs[node.name].macs for node in nodes)
            saved = round(macs * (1 - plan.macs_ratio))
            self._substitute(ir, nodes, conv, plan)
            replaced += 1
            ctx.stat("layers replaced")
            ctx.stat("MACs saved", saved)
            ctx.note(
                f"{target}: T={plan.rank}/{plan.full_rank}, MACs ×{plan.macs_ratio:.3f} "
                f"(saved {saved:,}), relative weight error {plan.weight_error:.3g}"
            )
        if replaced:
            ctx.note(
                "depthwise is lossy: follow it with distill (or at least BatchNorm "
                "recalibration on real data) to recover accuracy"
            )

    # -- decisions ----------------------------------------------------------------------------

    def _check_rule(self) -> None:
        opts = self.options
        rules = [
            name
            for name, given in (
                ("rank", opts.rank is not None),
                ("macs_ratio", opts.macs_ratio is not None),
                ("max_error", opts.max_error is not None),
            )
            if given
        ]
        if len(rules) > 1:
            raise GraphoptError(
                f"depthwise got {' and '.join(rules)}, which each choose T; give only one of "
                "rank, macs_ratio or max_error"
            )

    def _eligible(self, ir: GraphIR, ctx: PassContext) -> dict[str, list[fx.Node]]:
        """Standard convolutions (groups=1, kernel > 1), grouped by module so a module called
        twice is replaced once and both calls share the new pair."""
        ignore = NamePatterns(self.options.ignore)
        groups: dict[str, list[fx.Node]] = {}
        for node in ir.nodes(op="call_module"):
            module = ir.module(node)
            if type(module) not in _CONVS:
                continue
            conv = cast(_ConvNd, module)
            if ignore.matches(str(node.target), node.name):
                ctx.note(f"kept {node.target}: ignored")
                continue
            if conv.groups != 1 or math.prod(conv.kernel_size) == 1:
                continue
            if len(node.args) != 1 or node.kwargs:
                ctx.note(f"kept {node.target}: called with more than one input")
                continue
            if conv._forward_hooks or conv._forward_pre_hooks or parametrize.is_parametrized(conv):
                ctx.note(f"kept {node.target}: it has hooks or parametrizations that would be lost")
                continue
            groups.setdefault(str(node.target), []).append(node)
        ignore.check_all_used("depthwise", "convolution")
        return groups

    def _plan(self, target: str, conv: _ConvNd) -> DepthwisePlan | None:
        opts = self.options
        n, kernel = conv.out_channels, math.prod(conv.kernel_size)
        errors = _tail_errors(conv.weight)
        full = errors.numel() - 1
        if opts.rank is not None:
            rank = min(opts.rank, full)
        elif opts.macs_ratio is not None:
            rank = min(math.floor(opts.macs_ratio / macs_ratio(1, n, kernel) + 1e-9), full)
            if rank < 1:
                return None
        else:
            # Smallest T within budget; a tiny slack absorbs float error at full rank.
            budget = _DEFAULT_MAX_ERROR if opts.max_error is None else opts.max_error
            within = (errors <= budget + 1e-12).nonzero()
            rank = max(int(within[0]), 1)
        return DepthwisePlan(target, rank, full, macs_ratio(rank, n, kernel), float(errors[rank]))

    # -- rewriting ----------------------------------------------------------------------------

    def _substitute(
        self, ir: GraphIR, nodes: list[fx.Node], conv: _ConvNd, plan: DepthwisePlan
    ) -> None:
        dw_weight, pw_weight = depthwise_factors(conv.weight, plan.rank)
        c = conv.in_channels
        kind: Any = type(conv)  # Conv1d/2d/3d, whose constructors share a signature
        depthwise = kind(
            c,
            c * plan.rank,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=c,
            bias=False,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        pointwise = kind(
            c * plan.rank,
            conv.out_channels,
            1,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            depthwise.weight.copy_(dw_weight)
            pointwise.weight.copy_(pw_weight)
            if conv.bias is not None and pointwise.bias is not None:
                pointwise.bias.copy_(conv.bias)
        depthwise.train(conv.training)
        pointwise.train(conv.training)
        ir.replace_calls(nodes, [("dw", depthwise), ("pw", pointwise)])


PASSES = (Depthwise,)
