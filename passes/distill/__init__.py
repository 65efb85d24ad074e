"""``distill``: recover the accuracy compression cost by training the student towards the teacher.

The teacher is the original model (the pass manager's untouched reference), the student
the compressed model the earlier passes produced. Student nodes are paired with teacher
nodes through provenance (:mod:`.pairing`); the loss is ``α·KD + β·feature + γ·CE`` plus
any plugin loss (:mod:`.losses`); :mod:`.loop` trains, on one process or under torchrun.
``bnrecal`` is the cheap sibling: re-estimate BatchNorm statistics, no training
(:mod:`.bnrecal`).

>>> import torch, graphopt
>>> from graphopt.passes.distill import distill
>>> torch.manual_seed(0) and None
>>> teacher = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
>>> student = torch.nn.Sequential(torch.nn.Linear(4, 3))
>>> x = torch.randn(64, 4)
>>> y = teacher(x).argmax(1)
>>> data = ([(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)], [(x, y)])
>>> run = distill(student, teacher, data, example_inputs=(x[:1],), epochs=2, progress=False)
>>> run.stats["epochs"], run.stats["val accuracy after"] >= run.stats["val accuracy before"]
(2, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

import graphopt
from graphopt import (
    GraphIR,
    GraphoptError,
    LossFn,
    LossInputs,
    PassContext,
    registry_in_effect,
    split_batch,
)
from graphopt.pass_api import RegistryView

from .bnrecal import recalibrate_bn
from .data import NO_DATA, TrainVal, train_val
from .loop import FitResult, evaluate, fit, logits_of
from .losses import adapter, ce_loss, feature_loss, kd_loss, plugin_losses
from .options import DistillOptions
from .pairing import Pair, block_outputs, pair_nodes, tap

__all__ = [
    "PASSES",
    "BNRecal",
    "Distill",
    "DistillOptions",
    "Distilled",
    "FitResult",
    "LossFn",
    "LossInputs",
    "Pair",
    "TrainVal",
    "adapter",
    "block_outputs",
    "ce_loss",
    "distill",
    "evaluate",
    "feature_loss",
    "fit",
    "kd_loss",
    "logits_of",
    "pair_nodes",
    "recalibrate_bn",
    "split_batch",
    "tap",
    "train_val",
]


class Distill(graphopt.Pass):
    """Train the compressed student towards the original model (the teacher)."""

    name = "distill"
    summary = "Recover accuracy by knowledge distillation from the original model (needs data)."
    exact = False
    # training changes weights, never shapes; a prune_targets schedule re-analyses itself
    keeps = ("shapes", "costs")
    # no ordering constraint: prune,distill,prune,distill (gradual), distill(l1_bn=…) before
    # prune(criterion=bn_scale) (network slimming) and quant(form=qat),distill,quant are
    # all sound pipelines

    Options = DistillOptions

    def run(self, ir: GraphIR, ctx: PassContext) -> None:
        o: DistillOptions = self.options
        registry = ctx.registry or registry_in_effect()
        train, val = train_val(ctx.data)
        if not isinstance(ctx.reference, fx.GraphModule):
            raise GraphoptError(
                "distill needs the original model as its teacher; run it through "
                "graphopt.optimize or a PassManager, or call graphopt.passes.distill.distill"
            )
        if o.resume and not o.checkpoint:
            raise GraphoptError("distill(resume=true) needs checkpoint=FOLDER to resume from")
        if o.resume and o.prune_targets:
            raise GraphoptError(
                "distill cannot resume an iterative prune_targets schedule; resume a single "
                "distill step after prune instead"
            )
        extras = plugin_losses(o.losses, registry)
        if not o.prune_targets:
            self._report(fit(ir.gm, ctx.reference, train, val, o, extra_losses=extras,
                             console=ctx.console), ctx, "")  # fmt: skip
            return
        prune, prune_options = _prune_step(o.prune, registry)
        macs0 = ir.total_macs()
        for k, target in enumerate(o.prune_targets, 1):
            relative = target * macs0 / max(ir.total_macs(), 1)
            if relative < 1:
                step = prune(prune.parse_options({**prune_options, "target": relative}))
                sub = PassContext(
                    probe_inputs=ctx.probe_inputs, reference=ctx.reference, data=ctx.data,
                    console=ctx.console, registry=registry,
                )  # fmt: skip
                step.run(ir, sub)
                ir.recompile()
                ir.invalidate()
                ctx.notes.extend(f"round {k} prune: {n}" for n in sub.notes)
            ctx.note(f"round {k}: {ir.total_macs() / macs0:.1%} of the MACs")
            result = fit(ir.gm, ctx.reference, train, val, o, extra_losses=extras,
                         console=ctx.console)  # fmt: skip
            self._report(result, ctx, f"round {k}: ")

    @staticmethod
    def _report(result: FitResult, ctx: PassContext, prefix: str) -> None:
        for note in result.notes:
            ctx.note(prefix + note)
        ctx.stats["epochs"] = ctx.stats.get("epochs", 0) + result.epochs
        ctx.stats["feature pairs"] = len(result.pairs)
        if result.before is not None and result.after is not None:
            kind = result.metric
            if result.teacher is not None:
                ctx.stats[f"teacher val {kind}"] = result.teacher
            ctx.stats.setdefault(f"val {kind} before", result.before)
            ctx.stats[f"val {kind} after"] = result.after
            ctx.note(
                f"{prefix}val {kind}: teacher {result.teacher:.2%}, student "
                f"{result.before:.2%} → {result.after:.2%} in {result.epochs} epochs "
                f"(best at epoch {result.best_epoch})"
            )


def _prune_step(text: str, registry: RegistryView) -> tuple[type[graphopt.Pass], dict[str, Any]]:
    """The pass class and options of the ``prune`` option's step (validated up front)."""
    from graphopt.pipeline import parse

    steps = parse(text)
    if len(steps) != 1:
        raise GraphoptError(
            f"distill(prune={text!r}) must name one pruning step, e.g. prune(criterion=l2)"
        )
    cls = registry.pass_class(steps[0].name)
    if "target" not in {spec.name for spec in cls.option_specs()}:
        raise GraphoptError(
            f"distill(prune={text!r}) names pass '{cls.name}', which has no 'target' option; "
            "give a pass that prunes to a fraction of the MACs, such as prune"
        )
    cls.parse_options(steps[0].options)
    return cls, dict(steps[0].options)


class BNRecal(graphopt.Pass):
    """Re-estimate BatchNorm running statistics on the user's data (no training)."""

    name = "bnrecal"
    summary = "Recompute BatchNorm running statistics on a few batches (needs data)."
    exact = False
    keeps = ("shapes", "costs")
    before = ("fold",)  # after fold there are no statistics left to fix

    @dataclass
    class Options:
        batches: int = graphopt.option(
            100, "how many training batches to average the statistics over", ge=1
        )

    def run(self, ir: GraphIR, ctx: PassContext) -> None:
        if ctx.data is None:
            raise GraphoptError(NO_DATA.replace("distill needs training", "bnrecal needs"))
        train, _ = train_val(ctx.data)
        used = recalibrate_bn(ir.gm, train, self.options.batches)
        if used == 0:
            ctx.note("no BatchNorm with running statistics: nothing to recalibrate")
        ctx.stat("batches", used)


@dataclass
class Distilled:
    """What :func:`distill` returns: the trained student and the pass's report."""

    ir: GraphIR
    stats: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def distill(
    student: nn.Module | GraphIR,
    teacher: nn.Module,
    data: Any,
    *,
    example_inputs: Sequence[Any] | None = None,
    registry: graphopt.Registry | None = None,
    console: Any = None,
    **options: Any,
) -> Distilled:
    """Distil ``teacher`` into a copy of ``student`` outside a pipeline (neither is changed).

    Use it when the student did not come out of a graphopt pipeline, e.g. a narrower
    version of the same architecture: nodes pair by name (and provenance) as in the pass.
    ``options`` are the ``distill`` pass's options; ``data`` as for the pass.
    """
    if isinstance(student, GraphIR):
        ir = student.copy()
    elif example_inputs is None:
        raise GraphoptError("distill() needs example_inputs when the student is a plain module")
    else:
        ir = GraphIR.trace(student, example_inputs).copy()
    teacher_gm = teacher if isinstance(teacher, fx.GraphModule) else GraphIR.trace(teacher, ()).gm
    p = Distill(Distill.parse_options(options))
    registry = registry or registry_in_effect()
    ctx = PassContext(
        probe_inputs=ir.example_inputs,
        reference=teacher_gm,
        data=data,
        console=console,
        registry=registry,
    )
    with registry.in_effect():
        p.run(ir, ctx)
    ir.recompile()
    ir.invalidate()
    return Distilled(ir, dict(ctx.stats), list(ctx.notes))


PASSES = (Distill, BNRecal)
