"""Importance criteria and their group-aware aggregation.

A criterion returns *saliency maps*: for some parameters an elementwise tensor of the
parameter's shape (``|w|`` for L1, ``|w·∂L/∂w|`` for Taylor …) and/or for some activation
nodes a tensor of the activation's shape without the batch dim (mean ``|x|`` …). Each map
is summed along every dim but one to score the indices of that dim, normalised by its mean
so that layers of different scale are comparable, and the score of an atom is the mean over
every parameter and activation dim it touches: everything coupled votes.

Plugins add criteria through the ``graphopt_register_prune_criteria`` hook; a criterion
gets a :class:`CriterionInput` and returns a :class:`Saliency`::

    @graphopt.hookimpl
    def graphopt_register_prune_criteria(register):
        register("l4", lambda ci: Saliency(params={k: p**4 for k, p in ci.params.items()}))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt import (
    Criterion,
    CriterionInput,
    GraphoptError,
    Saliency,
    registry_in_effect,
    split_batch,
)
from graphopt.threads import one_thread

from .graph import ChannelGraph

__all__ = [
    "CriterionInput",
    "Saliency",
    "atom_scores",
    "criteria",
    "register_criterion",
]


_BUILTIN: dict[str, Criterion] = {}
_EXTRA: dict[str, Criterion] = {}


def register_criterion(name: str, fn: Criterion) -> None:
    """Add a criterion by name from Python (plugins use the hook instead)."""
    _EXTRA[name] = fn


def criteria() -> dict[str, Criterion]:
    """Built-in criteria, those registered from Python, and those plugins contribute through
    the ``graphopt_register_prune_criteria`` hook (in the registry in effect, so that
    ``-p no:NAME`` disables a plugin's criterion)."""
    found = {**_BUILTIN, **_EXTRA}
    for name, fn in registry_in_effect().criteria.items():
        if name in found:
            raise GraphoptError(
                f"pruning criterion '{name}' is registered twice; disable one of the plugins "
                "with -p no:NAME"
            )
        found[name] = fn
    return found


def _builtin(name: str) -> Callable[[Criterion], Criterion]:
    def deco(fn: Criterion) -> Criterion:
        _BUILTIN[name] = fn
        return fn

    return deco


@_builtin("l1")
def _l1(ci: CriterionInput) -> Saliency:
    return Saliency(params=dict(ci.params), power=1)


@_builtin("l2")
def _l2(ci: CriterionInput) -> Saliency:
    return Saliency(params=dict(ci.params), power=2)


@_builtin("bn_scale")
def _bn_scale(ci: CriterionInput) -> Saliency:
    scales = {k: v.detach().abs() for k, v in ci.params.items() if k in ci.norm_params}
    return Saliency(params=scales or _l1(ci).params)


@_builtin("random")
def _random(ci: CriterionInput) -> Saliency:
    gen = torch.Generator().manual_seed(ci.seed)
    return Saliency(params={k: torch.rand(v.shape, generator=gen) for k, v in ci.params.items()})


@_builtin("taylor")
def _taylor(ci: CriterionInput) -> Saliency:
    gm = ci.ir.gm
    named = dict(gm.named_parameters())
    wanted = {k: named[k] for k in ci.params if k in named}
    acc = {k: torch.zeros_like(p) for k, p in wanted.items()}
    flags = {k: p.requires_grad for k, p in wanted.items()}
    for p in wanted.values():
        p.requires_grad_(True)
    try:
        for inputs, target in _batches(ci, "taylor"):
            gm.zero_grad()
            out = _run(gm, inputs)
            _loss(out, target).backward()
            for k, p in wanted.items():
                if p.grad is not None:
                    acc[k] += (p.detach() * p.grad).abs()
    finally:
        gm.zero_grad()
        for k, p in wanted.items():
            p.requires_grad_(flags[k])
    return Saliency(params=acc)


def _activation_stat(stat: Callable[[torch.Tensor], torch.Tensor], name: str) -> Criterion:
    def crit(ci: CriterionInput) -> Saliency:
        wanted = set(ci.activation_nodes)
        sums: dict[str, torch.Tensor] = {}

        class Recorder(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                out = super().run_node(n)
                if n.name in wanted and isinstance(out, torch.Tensor) and out.dim() > 1:
                    s = stat(out.detach().float()).sum(0)
                    sums[n.name] = sums[n.name] + s if n.name in sums else s
                return out

        with torch.no_grad():
            for inputs, _ in _batches(ci, name):
                Recorder(ci.ir.gm).run(*inputs)
        return Saliency(activations=sums)

    return crit


_BUILTIN["activation"] = _activation_stat(torch.abs, "activation")
# APoZ: a channel that is mostly zero after its activation matters little
_BUILTIN["apoz"] = _activation_stat(lambda x: (x != 0).float(), "apoz")


def _batches(ci: CriterionInput, crit: str) -> Iterable[tuple[tuple[Any, ...], Any]]:
    if ci.data is None:
        raise GraphoptError(
            f"criterion '{crit}' needs data; pass data=... (calibration batches) or use "
            "criterion=l1"
        )
    n_inputs = sum(1 for n in ci.ir.graph.nodes if n.op == "placeholder")
    for batch in ci.data:
        yield split_batch(batch, n_inputs)


def _run(gm: torch.nn.Module, inputs: tuple[Any, ...]) -> Any:
    return gm(*inputs)


def _loss(out: Any, target: Any) -> torch.Tensor:
    if isinstance(out, tuple | list):
        out = out[0]
    if target is not None and out.dim() == 2 and not target.is_floating_point():
        return F.cross_entropy(out, target)
    if target is not None and target.shape == out.shape:
        return F.mse_loss(out, target.to(out.dtype))
    return out.float().pow(2).mean()


def atom_scores(g: ChannelGraph, sal: Saliency) -> np.ndarray:
    """Score per component (NaN where nothing scored it), aggregated over coupled dims."""
    ncomp = len(g.prunable)
    # the scored dims of each saliency map, so that each map is prepared once
    dims_of: dict[tuple[str, str], list[tuple[int, np.ndarray]]] = {}
    for key, start, size in g.spaces_touching(g.prunable):
        comps = g.comp[start : start + size]
        if key[0] == "p":
            dims_of.setdefault(("p", key[1]), []).append((key[2], comps))
        elif key[2] is None and key[3] > 0:  # the batch dim was summed away
            dims_of.setdefault(("n", key[1]), []).append((key[3] - 1, comps))
    where: list[np.ndarray] = []
    values: list[np.ndarray] = []
    with one_thread():  # a few small reductions per tensor
        for (kind, name), wanted in dims_of.items():
            t = (sal.params if kind == "p" else sal.activations).get(name)
            if t is None:
                continue
            t = t.detach().float()
            if sal.power is not None and kind == "p":
                # |w|**p once per tensor, then summed along each dim (a norm along a leading
                # dim is several times slower than a sum there)
                t = t.abs() if sal.power == 1 else t.abs() ** sal.power
            for d, comps in wanted:
                if t.dim() <= d or t.shape[d] != len(comps):
                    continue
                dims = [i for i in range(t.dim()) if i != d]
                v = (t.sum(dim=dims) if dims else t).double().numpy()
                mean = v.mean()
                where.append(comps)
                values.append(v / mean if mean > 0 else np.ones_like(v))
    at = np.concatenate(where) if where else np.zeros(0, dtype=np.int64)
    total = np.bincount(at, np.concatenate(values) if values else None, minlength=ncomp)
    count = np.bincount(at, minlength=ncomp)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count


def scorer(
    g: ChannelGraph, criterion: str, data: Any, seed: int
) -> Callable[[ChannelGraph], np.ndarray]:
    """Run the named criterion once; the returned function scores the components of ``g``
    (and of ``g`` again after more of it was frozen)."""
    table = criteria()
    if criterion not in table:
        raise GraphoptError(
            f"unknown pruning criterion '{criterion}'; choose one of {', '.join(sorted(table))}"
        )
    # the weights of layers (their rows and columns) and normalisation scales: biases and
    # running statistics say little about a channel's importance
    weights = {k[1] for k in g.producers | g.consumers | g.norm_scales}
    params = {}
    nodes = set()
    for key, _, _ in g.spaces_touching(g.prunable):
        if key[0] == "p" and key[1] in weights:
            params[key[1]] = g.tensor(key[1])
        elif key[0] == "n":
            nodes.add(key[1])
    norm = {k[1] for k in g.norm_scales}
    ci = CriterionInput(g.ir, params, sorted(nodes), data, seed, norm)
    sal = table[criterion](ci)
    fallback = _l1(ci) if criterion == "bn_scale" else None

    def score(graph: ChannelGraph) -> np.ndarray:
        scores = atom_scores(graph, sal)
        if fallback is not None:
            # layers without a normalisation scale fall back on their weights' L1 norm
            scores = np.where(np.isnan(scores), atom_scores(graph, fallback), scores)
        return np.nan_to_num(scores, nan=1.0)

    return score
