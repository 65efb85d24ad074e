"""``prune``: structural channel pruning with dependency propagation.

Each op's rule (:mod:`.ops`) says how it couples channels; the analysis (:mod:`.deps`)
builds the element graph (:mod:`.graph`) from them and solves it into atoms and groups
(:mod:`.solve`); a criterion (:mod:`.importance`) scores them; a ratio or a MACs/params
target (:mod:`.plan`) chooses what goes; :mod:`.pruner` slices the parameters and lets each
rule resize its node, so the result is a smaller model, not a mask. :mod:`.step` is one
such round, :mod:`.report` says what stayed whole and why.

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

import dataclasses
import gc
from typing import Any

import graphopt
from graphopt import GraphIR, GraphoptError, PassContext

from .blocks import drop_blocks
from .deps import ChannelGraph, analyse
from .importance import criteria, register_criterion
from .ops import OpRule, RuleSet, rules
from .options import PruneOptions
from .pruner import known_macs, observe
from .step import PruneResult, prune_once

__all__ = [
    "ChannelGraph",
    "OpRule",
    "Prune",
    "PruneOptions",
    "PruneResult",
    "RuleSet",
    "analyse",
    "criteria",
    "prune_once",
    "register_criterion",
    "rules",
]


class Prune(graphopt.Pass):
    """Structural channel pruning (and, with ``blocks``, residual-block dropping); see
    ``docs/passes/prune.md``."""

    name = "prune"
    summary = "Remove whole channels (conv filters, linear units, heads) with their dependants."
    exact = False
    after = ("cleanup",)
    # every change ends with a run of the pruned graph (observe), which leaves its shapes
    # and MACs on the nodes and its outputs; run() passes them on and drops everything else
    keeps = ("shapes", "outputs")

    Options = PruneOptions
    options: PruneOptions

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
        rule_set = rules()
        for step in range(1, o.steps + 1):
            if o.target is None and o.ratio == 0:
                break
            if o.target is not None:
                base = macs0 if o.metric == "macs" else params0
                now = sum(macs.values()) if o.metric == "macs" else current.total_params()
                this = dataclasses.replace(
                    o, target=o.target ** (step / o.steps) * base / max(now, 1)
                )
            else:
                this = dataclasses.replace(o, ratio=1 - (1 - o.ratio) ** (1 / o.steps))
            result = prune_once(current, this, data=data, macs=macs, rule_set=rule_set)
            current, macs = result.ir, result.macs
            ctx.stat("channel groups removed", result.removed_atoms)
            if step == o.steps:
                for line in result.notes[:20]:
                    ctx.note(line)
                if len(result.notes) > 20:
                    ctx.note(f"… and {len(result.notes) - 20} more frozen groups")
        fresh = current.has_analysis("shapes")  # observed after its last change
        outputs = current.analysis("outputs") if current.has_analysis("outputs") else None
        ir.gm = current.gm
        ir.invalidate()
        if fresh:
            ir.provide("shapes", True)
        if fresh and outputs is not None:
            ir.provide("outputs", outputs)
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

    def _drop_blocks(self, ir: GraphIR, ctx: PassContext, data: Any) -> dict[str, int]:
        """Drop ``blocks`` residual branches in place; return the new MACs per node."""
        n_inputs = sum(1 for n in ir.graph.nodes if n.op == "placeholder")
        batches = [graphopt.split_batch(b, n_inputs)[0] for b in list(data or [])[:4]]
        dropped = drop_blocks(ir, self.options.blocks, batches or [tuple(ctx.probe_inputs)],
                              self.options.ignore)  # fmt: skip
        ctx.stat("blocks dropped", len(dropped))
        ctx.note(f"dropped the residual branches summed at {', '.join(dropped) or 'nothing'}")
        if len(dropped) < self.options.blocks:
            ctx.note(f"only {len(dropped)} self-contained residual blocks were found")
        return observe(ir)


PASSES = (Prune,)
