"""What the accuracy target measures, and the search that meets it on one model.

``min_sqnr`` is the SQNR ``10·log10(Σx² / Σ(x − x̂)²)`` of the model's output (every output
tensor, all elements) against the float model's, on the *evaluation samples*: the first
calibration batches that hold :data:`EVAL_SAMPLES` samples and :data:`EVAL_VALUES` output
values (at most :data:`EVAL_MAX_SAMPLES` samples, at least one batch). ``max_drop``
is the most the score may fall, in points: top-1 accuracy in % on the labelled calibration
batches (``(inputs, target)`` pairs), or the value of the user's metric callable.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphopt import GraphIR, GraphoptError, run_model
from graphopt.errors import first_line

from .plan import Plan
from .search import (
    Evaluation,
    Simulator,
    choose_floats,
    float_order,
    impacts,
    output_noise,
    tensor_leaves,
    to_db,
)

__all__ = ["EVAL_SAMPLES", "EVAL_VALUES", "Target", "TargetOutcome", "eval_set", "meet_target"]

#: the output SQNR is measured on the first batches holding this many samples …
EVAL_SAMPLES = 8
#: … and this many output values (a classifier with few classes needs more samples) …
EVAL_VALUES = 1024
#: … but no more samples than this
EVAL_MAX_SAMPLES = 64
#: samples each op's impact (the search's ranking) is measured on
IMPACT_SAMPLES = 2


def eval_set(
    gm: fx.GraphModule, batches: list[tuple[Any, ...]]
) -> tuple[list[tuple[Any, ...]], list[Any]]:
    """The first batches holding :data:`EVAL_SAMPLES` samples and :data:`EVAL_VALUES`
    output values, or :data:`EVAL_MAX_SAMPLES` samples, or all of them; and the float
    model's outputs on them."""
    chosen: list[tuple[Any, ...]] = []
    refs: list[Any] = []
    samples = values = 0
    for batch in batches:
        enough = samples >= EVAL_SAMPLES and values >= EVAL_VALUES
        if chosen and (enough or samples >= EVAL_MAX_SAMPLES):
            break
        chosen.append(batch)
        refs.append(run_model(gm, batch))
        samples += _samples(batch)
        values += sum(t.numel() for t in tensor_leaves(refs[-1]))
    return chosen, refs


def labelled(data: Any, n_inputs: int, limit: int) -> list[tuple[tuple[Any, ...], torch.Tensor]]:
    """``(inputs, labels)`` from ``(inputs, target)`` batches with integer class targets
    (``inputs`` a tensor, or a tuple of the model's inputs); [] if the data has no labels."""
    out: list[tuple[tuple[Any, ...], torch.Tensor]] = []
    for batch in data:
        if len(out) >= limit:
            break
        if not isinstance(batch, list | tuple) or len(batch) != 2:
            return []
        inputs, label = batch
        if isinstance(inputs, torch.Tensor) and n_inputs == 1:
            inputs = (inputs,)
        integer = isinstance(label, torch.Tensor) and not label.is_floating_point()
        if not integer or not isinstance(inputs, list | tuple) or len(inputs) != n_inputs:
            return []
        out.append((tuple(inputs), label))
    return out


def resolve_metric(spec: str) -> Callable[[Any], float]:
    """A metric given as ``package.module:callable`` (called with the model, returns a score)."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise GraphoptError(
            f"quant(metric={spec}) cannot be imported ({first_line(exc)}); give "
            "package.module:callable, importable from the current directory"
        ) from None
    if not callable(fn):
        raise GraphoptError(f"quant(metric={spec}) is not callable; name a function")
    return fn


def accuracy_metric(data: list[tuple[tuple[Any, ...], torch.Tensor]]) -> Callable[[Any], float]:
    """Top-1 accuracy in % of a model's first output over labelled batches."""

    def score(model: Any) -> float:
        right = total = 0
        with torch.no_grad():
            for inputs, label in data:
                out = model(*inputs)
                logits = out if isinstance(out, torch.Tensor) else out[0]
                right += int((logits.argmax(-1) == label).sum())
                total += label.numel()
        return 100.0 * right / max(total, 1)

    return score


@dataclass
class Target:
    """The accuracy to keep: output SQNR, a score drop, or both (both must hold)."""

    min_sqnr: float | None = None
    max_drop: float | None = None
    metric: Callable[[Any], float] | None = None
    metric_name: str = "top-1 accuracy %"
    automatic: bool = False  #: the default floor rather than the user's target
    #: dB the search adds to ``min_sqnr`` on the evaluation samples, so the target also holds
    #: on inputs calibration never saw (the default target's; a user's target is taken as is)
    margin_db: float = 0.0

    @property
    def aim_db(self) -> float | None:
        """The SQNR the search must reach on the evaluation samples."""
        return None if self.min_sqnr is None else self.min_sqnr + self.margin_db

    def describe(self) -> str:
        parts = []
        if self.min_sqnr is not None:
            parts.append(f"output SQNR ≥ {self.min_sqnr:g} dB")
        if self.max_drop is not None:
            parts.append(f"{self.metric_name} drop ≤ {self.max_drop:g}")
        return " and ".join(parts)


@dataclass
class TargetOutcome:
    """What the search found: the float sites, the figures reached, the cost."""

    floats: list[fx.Node] = field(default_factory=list)
    met: bool = True
    sqnr_db: float = math.nan  #: simulated output SQNR of the chosen model
    base_score: float | None = None  #: the float model's metric
    score: float | None = None  #: the chosen model's metric
    all_int8_sqnr_db: float = math.nan
    impact_db: dict[str, float] = field(default_factory=dict)  #: site → SQNR when alone int8
    evaluations: int = 0
    samples: int = 0
    #: the part of the sites' MACs that the float sites run (what keeping them costs)
    float_macs_share: float = 0.0


class _Model(torch.nn.Module):
    """A callable nn.Module running the simulator with some sites in int8 (for metrics)."""

    def __init__(self, sim: Simulator, enabled: frozenset[fx.Node]) -> None:
        super().__init__()
        self._sim, self._enabled = sim, enabled

    def forward(self, *inputs: Any) -> Any:
        return self._sim.run_with(self._enabled, inputs)


def meet_target(
    ir: GraphIR,
    plan: Plan,
    sim: Simulator,
    batches: list[tuple[Any, ...]],
    target: Target,
) -> TargetOutcome:
    """Find the cheapest sites of ``plan`` to keep float so that ``target`` holds, trying
    them on ``sim`` (see :mod:`graphopt.passes.quant.search`)."""
    probe, refs = eval_set(ir.gm, batches)
    sites = list(plan.sites)
    cost: dict[fx.Node, float] = {}  # filled with the ranking (not needed when all-int8 meets)
    outcome = TargetOutcome(samples=sum(_samples(b) for b in probe))
    if target.max_drop is not None:
        assert target.metric is not None
        outcome.base_score = _score(target.metric, ir.gm)

    def evaluate(floats: tuple[fx.Node, ...]) -> Evaluation:
        enabled = frozenset(sites) - set(floats)
        signal = noise = 0.0
        for inputs, ref in zip(probe, refs, strict=True):
            s, n = output_noise(ref, sim.run_with(enabled, inputs))
            signal, noise = signal + s, noise + n
        figures = {"sqnr_db": to_db(signal, noise)}
        if not floats:
            outcome.all_int8_sqnr_db = figures["sqnr_db"]
        met = target.aim_db is None or figures["sqnr_db"] >= target.aim_db
        if target.max_drop is not None and met:
            assert target.metric is not None and outcome.base_score is not None
            figures["score"] = _score(target.metric, _Model(sim, enabled))
            met = outcome.base_score - figures["score"] <= target.max_drop
        return Evaluation(floats, figures, met)

    ranking_cache: list[fx.Node] = []
    share: dict[fx.Node, float] = {}  # each site's part of the summed impacts

    def ranking() -> list[fx.Node]:
        if not ranking_cache:
            # a ranking needs less precision than a verdict: IMPACT_SAMPLES samples
            few = _first_samples(probe, IMPACT_SAMPLES)
            few_refs = [run_model(ir.gm, b) for b in few]
            noise = impacts(sim, sites, few, few_refs)
            signal = sum(output_noise(r, r)[0] for r in few_refs)
            outcome.impact_db = {n.name: to_db(signal, noise[n]) for n in sites}
            cost.update(site_costs(ir, plan))
            ranking_cache.extend(float_order(noise, cost))
            total = sum(noise.values()) or 1.0
            share.update({n: v / total for n, v in noise.items()})
        return ranking_cache

    def guess(order: list[fx.Node]) -> int:
        """The shortest prefix of ``order`` whose float-keeping the additive noise model says
        meets the SQNR target (the all-int8 noise, less the shares of the sites kept
        float)."""
        first, aim = outcome.all_int8_sqnr_db, target.aim_db
        if aim is None or not math.isfinite(first):
            return 1
        left = 1.0
        for k, node in enumerate(order, 1):
            left -= share[node]
            if first - 10 * math.log10(max(left, 1e-12)) >= aim:
                return k
        return len(order)

    best, tried = choose_floats(ranking, evaluate, guess, cost=cost.__getitem__)
    if sites and len(best.floats) == len(sites):
        all_int8 = tried[0].figures["sqnr_db"]
        raise GraphoptError(
            f"quant's target ({target.describe()}) holds only with every op in float "
            f"(all-int8 gives {all_int8:.1f} dB output SQNR); lower the target, or calibrate "
            "on real data with --data/data="
        )
    outcome.floats = list(best.floats)
    outcome.met = best.met
    outcome.sqnr_db = best.figures["sqnr_db"]
    outcome.score = best.figures.get("score")
    outcome.evaluations = len(tried)
    if best.floats:
        macs = {n: _macs(ir, n) for n in sites}
        outcome.float_macs_share = sum(macs[n] for n in best.floats) / (sum(macs.values()) or 1)
    return outcome


def site_costs(ir: GraphIR, plan: Plan) -> dict[fx.Node, float]:
    """What keeping each site float costs, estimated: its multiply-accumulates (which run in
    float rather than int8) plus its output's elements (the dequantize/quantize pair at the
    border of a float op; what a float add or concat costs)."""
    return {node: _macs(ir, node) + _elements(ir, site.result) for node, site in plan.sites.items()}


def _macs(ir: GraphIR, node: fx.Node) -> float:
    cost = ir.costs().get(node.name)
    return float(cost.macs) if cost is not None else 0.0


def _elements(ir: GraphIR, node: fx.Node) -> int:
    shape = ir.shape(node)
    return max(math.prod(shape), 1) if shape is not None else 1


def _first_samples(batches: list[tuple[Any, ...]], k: int) -> list[tuple[Any, ...]]:
    """The first ``k`` samples of ``batches`` (a batch is cut when all its tensors share
    the batch dimension, else taken whole)."""
    out: list[tuple[Any, ...]] = []
    seen = 0
    for batch in batches:
        n, take = _samples(batch), k - seen
        sizes = {t.shape[0] for t in batch if isinstance(t, torch.Tensor) and t.dim()}
        if take < n and sizes == {n}:
            batch = tuple(t[:take] if isinstance(t, torch.Tensor) and t.dim() else t for t in batch)
            n = take
        out.append(batch)
        seen += n
        if seen >= k:
            break
    return out


def _samples(batch: tuple[Any, ...]) -> int:
    first = batch[0] if batch else None
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def _score(metric: Callable[[Any], float], model: Any) -> float:
    try:
        return float(metric(model))
    except GraphoptError:
        raise
    except Exception as exc:
        raise GraphoptError(
            f"the quant metric failed on the model ({type(exc).__name__}: {first_line(exc)}); "
            "it must take a model and return a number"
        ) from None
