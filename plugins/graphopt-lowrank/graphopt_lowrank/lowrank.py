"""The ``lowrank`` pass: factor Linear and conv layers through a truncated SVD.

A layer whose weight, read as a matrix, is ``W`` (``out × in``; for a convolution
``N × C·k…``) is replaced by two layers whose product is the best rank-``r`` approximation
``W_r = U_r S_r V_rᵀ`` (Eckart–Young):

* ``Linear(in → out)`` becomes ``Linear(in → r, no bias)`` then ``Linear(r → out)``;
* ``Conv(C → N, k)`` becomes ``Conv(C → r, k)`` with the original stride, padding, dilation
  and padding mode, then ``Conv(r → N, 1)``.

The first layer gets ``√S_r V_rᵀ``, the second ``U_r √S_r`` and the bias. The MACs of the
pair over those of the original are ``r/out + r/in``, so a layer is only worth factoring
below ``r = in·out/(in + out)``; layers where the chosen rank saves nothing are kept.

>>> import torch, graphopt, graphopt_lowrank
>>> registry = graphopt.load_registry(autoload=False, extra=[graphopt_lowrank])
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU()).eval()
>>> ir = graphopt.trace(model, (torch.randn(2, 64),))
>>> result = graphopt.PassManager("lowrank(macs_ratio=0.5)", registry=registry).run(ir)
>>> [str(n.target) for n in result.ir.nodes(op="call_module")]
['0_lr_a', '0_lr_b', '1']
>>> result.ledger[-1].macs / result.ledger[0].macs  # rank 16: 16/64 + 16/64
0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

import graphopt

__all__ = ["LowRank", "factor_matrix", "factor_ratio", "singular_energy"]

_DEFAULT_ENERGY = 0.9
# exact module types only: a subclass may override forward and compute something else
_LINEAR = (nn.Linear,)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def factor_ratio(rank: int, rows: int, cols: int) -> float:
    """MACs (and weights) of the rank-``rank`` pair over those of the ``rows × cols`` layer."""
    return rank / rows + rank / cols


def _gram_basis(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Squared singular values (largest first) and singular vectors of ``matrix`` from the
    eigen-decomposition of its smaller Gram matrix; ``right`` says which side they span.

    For a 4096 × 25088 classifier weight this is a 4096² symmetric eigenproblem instead of
    a full SVD, and the factors built from it never divide by a singular value.
    """
    rows, cols = matrix.shape
    right = cols <= rows
    gram = matrix.T @ matrix if right else matrix @ matrix.T
    values, vectors = torch.linalg.eigh(gram)
    return values.flip(0).clamp_min(0), vectors.flip(1), right


def singular_energy(matrix: torch.Tensor) -> torch.Tensor:
    """Fraction of ``‖W‖²`` kept at each rank: entry ``r`` is ``Σ_{i<r} σᵢ² / Σ σᵢ²``."""
    return _energy(_gram_basis(matrix.detach().double())[0])


def _energy(sigma2: torch.Tensor) -> torch.Tensor:
    total = sigma2.sum()
    kept = torch.cat([sigma2.new_zeros(1), sigma2.cumsum(0)])
    return kept / total if total > 0 else torch.ones_like(kept)


def factor_matrix(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B @ A`` the best rank-``rank`` approximation of ``matrix``.

    ``A`` is ``rank × cols`` (the first layer), ``B`` is ``rows × rank`` (the second); the
    singular values are split evenly between them. Computed in float64, returned in the
    input's dtype.
    """
    work = matrix.detach().double()
    _, basis, right = _gram_basis(work)
    first, second = _factors(work, basis, right, min(rank, *work.shape))
    return first.to(matrix.dtype), second.to(matrix.dtype)


def _factors(
    work: torch.Tensor, basis: torch.Tensor, right: bool, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    basis = basis[:, :rank]
    if right:  # basis = V_r; W V_r = U_r S_r
        second, first = work @ basis, basis.T
        sigma = second.norm(dim=0)
    else:  # basis = U_r; U_rᵀ W = S_r V_rᵀ
        second, first = basis, basis.T @ work
        sigma = first.norm(dim=1)
    root = sigma.sqrt()
    safe = torch.where(root > 0, root, torch.ones_like(root))
    if right:
        return first * root[:, None], second / safe[None, :]
    return first / safe[:, None], second * root[None, :]


@dataclass(frozen=True)
class _Plan:
    target: str
    rank: int
    max_rank: int
    ratio: float
    energy: float
    work: torch.Tensor  # the float64 weight matrix and its decomposition, computed once
    basis: torch.Tensor
    right: bool


class LowRank(graphopt.Pass):
    """Factor Linear and conv layers into two thinner layers by a truncated SVD."""

    name = "lowrank"
    summary = (
        "Factor Linear layers into two Linears and k×k convs into a rank-r k×k conv plus a "
        "1×1 conv (truncated SVD); lossy."
    )
    exact = False

    @dataclass
    class Options:
        energy: float | None = graphopt.option(
            None,
            "per layer, the smallest rank keeping this fraction of the squared singular values "
            f"({_DEFAULT_ENERGY} unless macs_ratio is given)",
            gt=0,
            le=1,
            what="a fraction",
        )
        macs_ratio: float | None = graphopt.option(
            None,
            "per layer, the largest rank whose pair costs at most this fraction of the layer's "
            "MACs; replaces energy",
            gt=0,
            lt=1,
            what="a fraction",
        )
        layers: Literal["all", "linear", "conv"] = graphopt.option(
            "all", "which layer kinds to factor"
        )
        ignore: tuple[str, ...] = graphopt.option(
            (), "layers to leave alone: module paths or node names, glob patterns allowed"
        )

    def run(self, ir: graphopt.GraphIR, ctx: graphopt.PassContext) -> None:
        opts = self.options
        if opts.macs_ratio is not None and opts.energy is not None:
            raise graphopt.GraphoptError(
                "lowrank got both energy and macs_ratio, which each choose the rank; give only "
                "one of them"
            )
        sites = self._candidates(ir, ctx)
        costs = ir.costs()  # MACs of the original layers, before any rewrite
        replaced = 0
        for target, nodes in sites.items():
            layer = ir.gm.get_submodule(target)
            plan = self._plan(target, layer)
            if plan.rank < 1:
                ctx.note(f"kept {target}: even rank 1 costs more than macs_ratio={opts.macs_ratio}")
                continue
            if plan.ratio >= 1:
                ctx.note(
                    f"kept {target}: rank {plan.rank}/{plan.max_rank} would cost "
                    f"{plan.ratio:.2f}× its MACs"
                )
                continue
            macs = sum(costs[node.name].macs for node in nodes)
            saved = round(macs * (1 - plan.ratio))
            self._rewrite(ir, nodes, layer, plan)
            replaced += 1
            ctx.stat("layers factored")
            ctx.stat("MACs saved", saved)
            error = math.sqrt(max(0.0, 1 - plan.energy))
            ctx.note(
                f"{target}: rank {plan.rank}/{plan.max_rank}, MACs ×{plan.ratio:.3f} (saved "
                f"{saved:,}), energy kept {plan.energy:.3f}, relative weight error {error:.3g}"
            )
        if replaced:
            ctx.note(
                "lowrank is lossy: follow it with distill (or fine-tuning) to recover accuracy"
            )

    # -- which layers -------------------------------------------------------------------------

    def _candidates(
        self, ir: graphopt.GraphIR, ctx: graphopt.PassContext
    ) -> dict[str, list[torch.fx.Node]]:
        """Layer modules to factor, each with its call sites (a shared module is factored once
        and every call uses the new pair)."""
        kinds = {"all": _LINEAR + _CONVS, "linear": _LINEAR, "conv": _CONVS}[self.options.layers]
        ignore = graphopt.NamePatterns(self.options.ignore)
        sites: dict[str, list[torch.fx.Node]] = {}
        for node in ir.nodes(op="call_module"):
            layer = ir.module(node)
            if type(layer) not in kinds:
                continue
            ignored = ignore.matches(str(node.target), node.name)
            reason = _unsupported(layer, node) or ("ignored" if ignored else None)
            if reason:
                ctx.note(f"kept {node.target}: {reason}")
                continue
            sites.setdefault(str(node.target), []).append(node)
        ignore.check_all_used("lowrank", "Linear or conv layer")
        return sites

    def _plan(self, target: str, layer: Any) -> _Plan:
        work = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
        rows, cols = work.shape
        sigma2, basis, right = _gram_basis(work)
        energy = _energy(sigma2)
        max_rank = energy.numel() - 1
        if self.options.macs_ratio is not None:
            rank = min(
                math.floor(self.options.macs_ratio / factor_ratio(1, rows, cols) + 1e-9), max_rank
            )
        else:
            # smallest rank within the threshold; the slack absorbs rounding at full energy
            wanted = _DEFAULT_ENERGY if self.options.energy is None else self.options.energy
            rank = int((energy >= wanted - 1e-12).nonzero()[0])
            rank = max(rank, 1)
        ratio = factor_ratio(rank, rows, cols)
        return _Plan(target, rank, max_rank, ratio, float(energy[rank]), work, basis, right)

    # -- rewriting ----------------------------------------------------------------------------

    def _rewrite(
        self, ir: graphopt.GraphIR, nodes: list[torch.fx.Node], layer: Any, plan: _Plan
    ) -> None:
        weight = layer.weight
        first_w, second_w = _factors(plan.work, plan.basis, plan.right, plan.rank)
        factory = {"device": weight.device, "dtype": weight.dtype}
        has_bias = layer.bias is not None
        if isinstance(layer, nn.Linear):
            first: Any = nn.Linear(layer.in_features, plan.rank, bias=False, **factory)
            second: Any = nn.Linear(plan.rank, layer.out_features, bias=has_bias, **factory)
        else:
            kind = type(layer)
            first = kind(
                layer.in_channels,
                plan.rank,
                layer.kernel_size,
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                bias=False,
                padding_mode=layer.padding_mode,
                **factory,
            )
            second = kind(plan.rank, layer.out_channels, 1, bias=has_bias, **factory)
        with torch.no_grad():
            first.weight.copy_(first_w.reshape(first.weight.shape))
            second.weight.copy_(second_w.reshape(second.weight.shape))
            if has_bias:
                second.bias.copy_(layer.bias)
        first.train(layer.training)
        second.train(layer.training)
        ir.replace_calls(nodes, [("lr_a", first), ("lr_b", second)])


def _unsupported(layer: Any, node: torch.fx.Node) -> str | None:
    """Why a Linear/conv call site cannot be factored, or None."""
    if isinstance(layer, _CONVS) and layer.groups != 1:
        return "grouped convolution"
    if len(node.args) != 1 or node.kwargs:
        return "called with more than one input"
    if layer._forward_hooks or layer._forward_pre_hooks or parametrize.is_parametrized(layer):
        return "it has hooks or parametrizations that would be lost"
    return None
