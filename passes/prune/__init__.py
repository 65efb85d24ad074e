"""``prune``: structural channel pruning with dependency propagation.

The channel-dependency analysis (:mod:`.deps`) finds which channels of which tensors must
go together; a criterion (:mod:`.importance`) scores them; a ratio or a MACs/params target
(:mod:`.plan`) chooses what goes; :mod:`.pruner` slices the parameters and rewrites the
graph, so the result is a smaller model, not a mask.

>>> import torch, graphopt
>>> model = torch.nn.Sequential(
...     torch.nn.Conv2d(3, 32, 3), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
...     torch.nn.Conv2d(32, 16, 3)).eval()
>>> x = torch.randn(1, 3, 16, 16)
>>> result = graphopt.optimize(model, "prune(ratio=0.5)", example_inputs=(x,))
>>> result.ir.gm.get_submodule("0").out_channels
16
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Literal

import numpy as np

import graphopt
from graphopt import GraphIR, GraphoptError, PassContext

from .blocks import drop_blocks
from .deps import ChannelGraph, analyse
from .importance import criteria, register_criterion, scorer, split_batch
from .plan import Estimator, Selector
from .pruner import ResizeFailed, apply_removal, known_macs, light_copy, observe

__all__ = [
    "ChannelGraph",
    "Prune",
    "PruneResult",
    "analyse",
    "criteria",
    "prune_once",
    "register_criterion",
]

#: how many nodes may be frozen after a failed resize before the pass gives up
MAX_RETRIES = 25
#: relative MACs/params tolerance of the bisection, before measuring the real model
_TOL = 0.005


@dataclass
class PruneResult:
    """What one pruning step did."""

    ir: GraphIR
    ratio: float
    removed_atoms: int
    total_atoms: int
    notes: list[str]
    #: MACs per node of the pruned model
    macs: dict[str, int]

    @property
    def total_macs(self) -> int:
        return sum(self.macs.values())


def prune_once(
    ir: GraphIR,
    *,
    ratio: float = 0.5,
    target: float | None = None,
    metric: str = "macs",
    criterion: str = "l1",
    global_rank: bool = False,
    max_layer_ratio: float = 0.9,
    round_to: int = 8,
    ignore: list[str] | tuple[str, ...] = (),
    data: object = None,
    seed: int = 0,
    macs: dict[str, int] | None = None,
    heads: bool = False,
) -> PruneResult:
    """Prune ``ir`` once and return the pruned copy (``ir`` itself is left untouched).
    ``macs`` are its MACs per node if already measured by :func:`observe`."""
    if macs is None:
        macs = known_macs(ir) or observe(ir)
    g = analyse(ir, ignore, whole_heads=heads)
    notes: list[str] = []
    assert g.prunable is not None
    if not g.prunable.any():
        why = g.frozen_report()
        raise GraphoptError(
            "nothing in this model can be pruned"
            + (f" ({why[0]})" if why else " (it has no convolution, linear or embedding layer)")
            + "; see the prune docs for supported patterns"
        )
    score = scorer(g, criterion, data, seed)
    est = Estimator(ir, g, macs)  # reads g's components afresh after every solve
    goal = None
    if target is not None:
        goal = target * (est.macs0 if metric == "macs" else est.params0)
    for _ in range(MAX_RETRIES):
        sel = Selector(
            g, score(g), round_to=round_to, max_layer_ratio=max_layer_ratio,
            global_rank=global_rank,
        )  # fmt: skip
        if goal is None:
            chosen, removed = ratio, sel.removal(ratio)
        else:
            chosen, removed = _search(sel, est, metric, goal)
        work = light_copy(ir)
        try:
            after = apply_removal(work, g, removed)
        except ResizeFailed as exc:
            node = next(n for n in ir.graph.nodes if n.name == exc.node.name)
            g.freeze_node(node, f"no longer fits after resizing ({_short(exc.cause)})")
            g.solve()
            continue
        if goal is not None:
            chosen, removed, work, after = _correct(
                ir, g, sel, est, metric, goal, (chosen, removed, work, after)
            )
        notes.extend(g.frozen_report())
        return PruneResult(work, chosen, int(removed.sum()), sel.n_atoms, notes, after)
    raise GraphoptError(
        f"pruning kept breaking the model after freezing {MAX_RETRIES} nodes; exclude the "
        "failing layers with ignore=[...]"
    )


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _measure(est: Estimator, metric: str, removed: np.ndarray) -> float:
    return est.macs(removed) if metric == "macs" else est.params(removed)


def _search(sel: Selector, est: Estimator, metric: str, goal: float) -> tuple[float, np.ndarray]:
    """The removal whose estimated MACs/params are closest to ``goal``: bisection on the
    ratio, then one more rounding step in any single group (uniform ratios move every group
    at once, in steps too coarse for small models)."""
    hi = 1.0
    if _measure(est, metric, sel.removal(hi)) > goal * (1 + _TOL):
        reach = _measure(est, metric, sel.removal(hi))
        base = est.macs0 if metric == "macs" else est.params0
        raise GraphoptError(
            f"the {metric} target {goal / base:.3g} cannot be reached: the prunable layers "
            f"allow at most {reach / base:.3g} of the original; raise max_layer_ratio or "
            "lower the target"
        )
    lo = 0.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if _measure(est, metric, sel.removal(mid)) > goal:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-4:
            break
    candidates = [sel.counts(hi), *sel.one_more_step(sel.counts(lo))]
    masks = [sel.mask(c) for c in candidates]
    best = min(masks, key=lambda m: abs(_measure(est, metric, m) - goal))
    return hi, best


_Trial = tuple[float, np.ndarray, GraphIR, dict[str, int]]


def _correct(
    ir: GraphIR,
    g: ChannelGraph,
    sel: Selector,
    est: Estimator,
    metric: str,
    goal: float,
    trial: _Trial,
) -> _Trial:
    """Measure the real model and aim the estimate again while they disagree; return the
    trial closest to the goal."""
    base = est.macs0 if metric == "macs" else est.params0

    def miss(t: _Trial) -> float:
        return abs((sum(t[3].values()) if metric == "macs" else t[2].total_params()) - goal)

    best = aim = trial
    for _ in range(4):
        _, removed, work, macs = aim
        real = sum(macs.values()) if metric == "macs" else work.total_params()
        if abs(real - goal) <= 0.01 * base:
            break
        # the estimate is off by a factor; aim the estimate at the corrected goal
        corrected = goal * _measure(est, metric, removed) / max(real, 1)
        try:
            ratio, candidate = _search(sel, est, metric, corrected)
        except GraphoptError:
            break
        attempt = light_copy(ir)
        try:
            aim = (ratio, candidate, attempt, apply_removal(attempt, g, candidate))
        except ResizeFailed:
            break
        if miss(aim) < miss(best):
            best = aim
    return best


class Prune(graphopt.Pass):
    """Structural channel pruning (and, with ``blocks``, residual-block dropping); see
    ``docs/passes/prune.md``."""

    name = "prune"
    summary = "Remove whole channels (conv filters, linear units, heads) with their dependants."
    exact = False
    after = ("cleanup",)
    # every change ends with a run of the pruned graph (observe), which leaves its shapes
    # and MACs on the nodes; run() passes that on and drops everything else
    keeps = ("shapes",)

    @dataclass
    class Options:
        ratio: float = graphopt.option(
            0.5,
            "fraction of each coupled group's channels to remove",
            ge=0,
            lt=1,
            what="a fraction",
        )
        target: float | None = graphopt.option(
            None,
            "fraction of the original MACs (or params, see metric) to keep; overrides ratio",
            gt=0,
            le=1,
            what="a fraction",
        )
        metric: Literal["macs", "params"] = graphopt.option("macs", "what target measures")
        criterion: str = graphopt.option(
            "l1", "importance: l1, l2, bn_scale, activation, apoz, taylor, random or a plugin's"
        )
        global_rank: bool = graphopt.option(
            False, "rank channels across all layers instead of removing ratio in each"
        )
        max_layer_ratio: float = graphopt.option(
            0.9, "most any one group may lose", gt=0, lt=1, what="a fraction"
        )
        round_to: int = graphopt.option(
            8, "keep channel counts multiples of this (8 suits CPU SIMD and GPU tensor cores)",
            ge=1,
        )  # fmt: skip
        steps: int = graphopt.option(1, "prune in this many steps, re-scoring in between", ge=1)
        ignore: list[str] = graphopt.option([], "node-name globs whose layers stay whole")
        heads: bool = graphopt.option(
            False,
            "remove whole heads of nn.MultiheadAttention instead of the same positions of "
            "every head",
        )
        seed: int = graphopt.option(0, "seed of the random criterion")
        blocks: int = graphopt.option(
            0,
            "first drop this many residual blocks (y = x + f(x) becomes y = x), those adding "
            "least to the residual stream; ratio=0 drops blocks only",
            ge=0,
        )

    def run(self, ir: GraphIR, ctx: PassContext) -> None:
        # The analysis and the graph copies allocate many small objects; Python's cyclic
        # collector would scan the whole heap (torch and the model included) several times
        # during the pass, up to half its time on mobilenet_v2. Nothing here leaks cycles
        # for long: collection resumes when the pass ends.
        paused = gc.isenabled()
        gc.disable()
        try:
            self._run(ir, ctx)
        finally:
            if paused:
                gc.enable()

    def _run(self, ir: GraphIR, ctx: PassContext) -> None:
        o = self.options
        if o.criterion not in criteria():
            known = ", ".join(sorted(criteria()))
            raise GraphoptError(f"unknown pruning criterion '{o.criterion}'; choose one of {known}")
        data = ctx.data
        if data is None and o.criterion in ("activation", "apoz"):
            # no calibration data: the probe inputs (the example inputs) are all there is
            data = [tuple(ctx.probe_inputs)]
            ctx.note(
                f"criterion {o.criterion} scored on the probe inputs; pass data for a real one"
            )
        macs = known_macs(ir) or observe(ir)
        macs0, params0 = sum(macs.values()), ir.total_params()
        if o.blocks:
            macs = self._drop_blocks(ir, ctx, data)
        current = ir
        result = None
        for step in range(1, o.steps + 1):
            if o.target is None and o.ratio == 0:
                break
            kwargs: dict[str, object] = {}
            if o.target is not None:
                base = macs0 if o.metric == "macs" else params0
                now = sum(macs.values()) if o.metric == "macs" else current.total_params()
                kwargs["target"] = o.target ** (step / o.steps) * base / max(now, 1)
            else:
                kwargs["ratio"] = 1 - (1 - o.ratio) ** (1 / o.steps)
            result = prune_once(
                current,
                metric=o.metric,
                criterion=o.criterion,
                global_rank=o.global_rank,
                max_layer_ratio=o.max_layer_ratio,
                round_to=o.round_to,
                ignore=o.ignore,
                data=data,
                seed=o.seed,
                macs=macs,
                heads=o.heads,
                **kwargs,  # type: ignore[arg-type]
            )
            current, macs = result.ir, result.macs
            ctx.stat("channel groups removed", result.removed_atoms)
            if step == o.steps:
                for line in result.notes[:20]:
                    ctx.note(line)
                if len(result.notes) > 20:
                    ctx.note(f"… and {len(result.notes) - 20} more frozen groups")
        fresh = current.has_analysis("shapes")  # observed after its last change
        ir.gm = current.gm
        ir.invalidate()
        if fresh:
            ir.provide("shapes", True)
        macs_now = result.total_macs if result is not None else sum(macs.values())
        ctx.stat("MACs kept %", round(100 * macs_now / max(macs0, 1), 2))
        params_now = ir.total_params()
        ctx.stat("params kept %", round(100 * params_now / max(params0, 1), 2))
        if o.target is not None:
            base, now = (macs0, macs_now) if o.metric == "macs" else (params0, params_now)
            if abs(now / max(base, 1) - o.target) > 0.02:
                ctx.note(
                    f"kept {100 * now / max(base, 1):.1f}% of the {o.metric} instead of the "
                    f"target {100 * o.target:.0f}%: the coupled groups are too coarse or too few "
                    "to get closer (see the frozen groups above)"
                )
        if macs_now == macs0:
            ctx.note("nothing was removed: every group is frozen or too small")

    def _drop_blocks(self, ir: GraphIR, ctx: PassContext, data: object) -> dict[str, int]:
        """Drop ``blocks`` residual branches in place; return the new MACs per node."""
        n_inputs = sum(1 for n in ir.graph.nodes if n.op == "placeholder")
        batches = [split_batch(b, n_inputs)[0] for b in list(data or [])[:4]]  # type: ignore[call-overload]
        dropped = drop_blocks(ir, self.options.blocks, batches or [tuple(ctx.probe_inputs)],
                              self.options.ignore)  # fmt: skip
        ctx.stat("blocks dropped", len(dropped))
        ctx.note(f"dropped the residual branches summed at {', '.join(dropped) or 'nothing'}")
        if len(dropped) < self.options.blocks:
            ctx.note(f"only {len(dropped)} self-contained residual blocks were found")
        return observe(ir)


PASSES = (Prune,)
