"""One pruning step: analyse, score, choose, remove and check, with a retry that freezes
the node a removal broke."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch.fx as fx

from graphopt import GraphIR, GraphoptError

from .deps import analyse
from .graph import ChannelGraph
from .importance import scorer
from .ops import RuleSet, rules
from .options import PruneOptions
from .plan import Estimator, Selector
from .pruner import ResizeFailed, apply_removal, known_macs, light_copy, observe
from .report import frozen_report
from .solve import solve

__all__ = ["PruneResult", "prune_once"]

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
    options: PruneOptions,
    *,
    data: object = None,
    macs: dict[str, int] | None = None,
    rule_set: RuleSet | None = None,
) -> PruneResult:
    """Prune ``ir`` once as ``options`` say (``ratio``, or ``target`` of ``metric``,
    ``criterion``, ``global_rank``, ``max_layer_ratio``, ``round_to``, ``ignore``,
    ``heads``, ``seed``; ``steps`` and ``blocks`` are the pass's business) and return the
    pruned copy (``ir`` itself is left untouched). ``data`` feeds data-driven criteria;
    ``macs`` are ``ir``'s MACs per node if already measured by :func:`.pruner.observe`;
    ``rule_set`` replaces the built-in and plugin op rules."""
    o = options
    if macs is None:
        macs = known_macs(ir) or observe(ir)
    found = rules() if rule_set is None else rule_set
    g = analyse(ir, o.ignore, whole_heads=o.heads, rule_set=found)
    if not g.prunable.any():
        why = frozen_report(g)
        raise GraphoptError(
            "nothing in this model can be pruned"
            + (f" ({why[0]})" if why else " (it has no convolution, linear or embedding layer)")
            + "; see the prune docs for supported patterns"
        )
    score = scorer(g, o.criterion, data, o.seed)
    est = Estimator(ir, g, macs, found)  # reads g's components afresh after every solve
    goal = None
    if o.target is not None:
        goal = o.target * (est.macs0 if o.metric == "macs" else est.params0)
    failures: dict[str, int] = {}
    last = ""
    for _ in range(MAX_RETRIES):
        sel = Selector(
            g, score(g), round_to=o.round_to, max_layer_ratio=o.max_layer_ratio,
            global_rank=o.global_rank,
        )  # fmt: skip
        if goal is None:
            chosen, removed = o.ratio, sel.removal(o.ratio)
        else:
            chosen, removed = _search(sel, est, o.metric, goal)
        work = light_copy(ir)
        try:
            after = apply_removal(work, g, removed, found)
        except ResizeFailed as exc:
            node = next(n for n in ir.graph.nodes if n.name == exc.node.name)
            last = f"at node '{node.name}' ({_short(exc.cause)})"
            failures[node.name] = failures.get(node.name, 0) + 1
            # failing again where it was frozen: the size that no longer fits comes from
            # further up, so freeze the nodes feeding it, twice as far back each time
            for culprit in _upstream(node, 2 ** failures[node.name] - 1):
                g.freeze_node(culprit, f"no longer fits after resizing {last}")
            solve(g)
            continue
        if goal is not None:
            trial = (chosen, removed, work, after)
            chosen, removed, work, after = _correct(ir, g, sel, est, found, o.metric, goal, trial)
        notes = frozen_report(g)
        return PruneResult(work, chosen, int(removed.sum()), sel.n_atoms, notes, after)
    raise GraphoptError(
        f"pruning kept breaking the model {last} after {MAX_RETRIES} retries freezing what "
        "it reads; exclude the failing layers with ignore=[...]"
    )


def _upstream(node: fx.Node, hops: int) -> list[fx.Node]:
    """``node`` and the nodes at most ``hops`` steps up its inputs."""
    found, frontier = [node], [node]
    for _ in range(hops):
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in found]
        found += list(dict.fromkeys(frontier))
    return found


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
    rule_set: RuleSet,
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
            aim = (ratio, candidate, attempt, apply_removal(attempt, g, candidate, rule_set))
        except ResizeFailed:
            break
        if miss(aim) < miss(best):
            best = aim
    return best
