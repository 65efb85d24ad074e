"""What the quant pass reports: per-op sensitivity, the accuracy target, ops kept float.

The report is kept on the quantized ``GraphModule`` as plain data (``gm.meta``), so a pickled
model does not need graphopt; :func:`quant_report` reads it back.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphopt import PassContext

from .plan import Plan, Site, record
from .target import Target, TargetOutcome

__all__ = [
    "REPORT_KEY",
    "FloatChoice",
    "LayerSensitivity",
    "QuantReport",
    "quant_report",
    "sqnr_db",
]

#: key of the :class:`QuantReport` in ``GraphModule.meta`` after the pass
REPORT_KEY = "graphopt.quant"


@dataclass(frozen=True)
class LayerSensitivity:
    """SQNR of one quantized op's output against the float model's, on calibration data."""

    node: str
    op: str
    sqnr_db: float


@dataclass(frozen=True)
class FloatChoice:
    """An op the accuracy target kept in float, and why."""

    node: str
    op: str
    reason: str


@dataclass
class QuantReport:
    """What the pass did: quantized ops, their qparams and their sensitivity, worst first."""

    form: str
    mode: str
    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    qparams: dict[str, tuple[float, int]] = field(default_factory=dict)
    sensitivity: list[LayerSensitivity] = field(default_factory=list)
    demoted: list[str] = field(default_factory=list)  #: adds/concats int8 would not speed up
    target: str = ""  #: the accuracy target, e.g. "output SQNR ≥ 20 dB"
    target_met: bool = True
    sqnr_db: float = math.nan  #: output SQNR on the evaluation samples (simulated int8)
    kept_float: list[FloatChoice] = field(default_factory=list)  #: ops the target kept float
    float_macs_share: float = 0.0  #: the part of the quantizable ops' MACs those ops run
    impact: list[LayerSensitivity] = field(default_factory=list)  #: SQNR with one op int8


def quant_report(gm: fx.GraphModule) -> QuantReport | None:
    """The :class:`QuantReport` the pass left on ``gm`` (kept there as plain data, so that a
    pickled model does not need graphopt), or None."""
    raw = gm.meta.get(REPORT_KEY)
    if raw is None:
        return None
    rows = {k: [LayerSensitivity(**r) for r in raw.get(k, [])] for k in ("sensitivity", "impact")}
    floats = [FloatChoice(**r) for r in raw.get("kept_float", [])]
    return QuantReport(**{**raw, **rows, "kept_float": floats})


def sqnr_db(signal: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σx² / Σ(x−x̂)²)`` in decibels."""
    noise = float((signal.double() - approx.double()).pow(2).sum())
    power = float(signal.double().pow(2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(power / noise) if power > 0 else -math.inf


def report_target(
    target: Target,
    outcome: TargetOutcome,
    plan: Plan,
    report: QuantReport,
    ctx: PassContext,
    *,
    warn_below: float,
) -> None:
    """Put what the accuracy search did in the report and the ledger; warn loudly when the
    default target had to act on a model whose all-int8 SQNR was below ``warn_below`` dB,
    or when a target was not met."""
    report.target, report.target_met = target.describe(), outcome.met
    report.sqnr_db, report.float_macs_share = outcome.sqnr_db, outcome.float_macs_share
    labels = {n.name: s.label for n, s in plan.sites.items()}
    report.impact = sorted(
        (LayerSensitivity(k, labels[k], v) for k, v in outcome.impact_db.items()),
        key=lambda r: r.sqnr_db,
    )
    for node in outcome.floats:
        alone = outcome.impact_db.get(node.name, math.nan)
        why = f"quantized alone, output SQNR {alone:.1f} dB"
        report.kept_float.append(FloatChoice(node.name, labels[node.name], why))
    where = f"on {outcome.samples} calibration sample(s), {outcome.evaluations} evaluation(s)"
    if target.margin_db and target.aim_db is not None:
        where += f"; searched at {target.aim_db:g} dB there, a margin for unseen inputs"
    reached = f"output SQNR {outcome.sqnr_db:.1f} dB"
    if outcome.score is not None and outcome.base_score is not None:
        reached += f", {target.metric_name} {outcome.score:.2f} (float {outcome.base_score:.2f})"
    if not outcome.floats:
        ctx.note(f"target {target.describe()}: met with every op in int8 ({reached}, {where})")
    else:
        names = ", ".join(f"{c.node} ({c.op}; {c.reason})" for c in report.kept_float)
        verdict = "met" if outcome.met else "NOT met"
        ctx.note(
            f"target {target.describe()}: {verdict} keeping {len(outcome.floats)} op(s) in "
            f"float ({outcome.float_macs_share:.1%} of the quantizable MACs): {names}; "
            f"{reached}, all-int8 {outcome.all_int8_sqnr_db:.1f} dB ({where})"
        )
        ctx.stat("ops kept float (target)", len(outcome.floats))
    if math.isfinite(outcome.sqnr_db):
        ctx.stat("output SQNR dB", round(outcome.sqnr_db, 2))
    if target.automatic and outcome.all_int8_sqnr_db < warn_below:
        worst = ", ".join(f"{r.node} ({r.op}, {r.sqnr_db:.1f} dB)" for r in report.impact[:3])
        warn(
            ctx,
            f"quant: with every op in int8 the output SQNR is {outcome.all_int8_sqnr_db:.1f} dB "
            f"(below {warn_below:g} dB); the worst layers alone in int8: {worst}. Kept "
            f"{len(outcome.floats)} op(s) in float to reach {outcome.sqnr_db:.1f} dB; set "
            "quant(min_sqnr=…) for another target",
        )
    if not outcome.met:
        warn(ctx, f"quant: the target {target.describe()} was not met ({reached})")


def warn(ctx: PassContext, message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)
    if ctx.console is not None:
        ctx.console.print(f"[bold red]warning:[/] {message}", highlight=False)
    ctx.note("WARNING: " + message.removeprefix("quant: "))


def sensitivity(
    float_gm: fx.GraphModule,
    gm: fx.GraphModule,
    plan: Plan,
    results: dict[fx.Node, fx.Node],
    inputs: tuple[Any, ...],
) -> list[LayerSensitivity]:
    """SQNR of each quantized op's output against the float model's, worst first.

    A layer quantized over the range of the clamp after it (ReLU6) is compared after that
    clamp, which both graphs keep under the same name.
    """
    want_float: dict[str, Site] = {}
    want_quant = {new.name: old.name for old, new in results.items()}
    for site in plan.sites.values():
        assert site.observe is not None
        want_float[site.observe.name] = site
        if site.observe is not site.result:
            want_quant[site.observe.name] = site.observe.name
    ref: dict[str, torch.Tensor] = {}
    got: dict[str, torch.Tensor] = {}

    def keep_float(node: fx.Node, value: Any) -> None:
        if node.name in want_float and isinstance(value, torch.Tensor):
            ref[node.name] = value.detach().float().clone()  # later in-place ops (ReLU, SiLU)

    def keep_quant(node: fx.Node, value: Any) -> None:
        if node.name in want_quant and isinstance(value, torch.Tensor):
            v = value.dequantize() if value.is_quantized else value
            got[want_quant[node.name]] = v.detach().float().clone()

    record(float_gm, inputs, keep_float)
    record(gm, inputs, keep_quant)
    rows = []
    for name, site in want_float.items():
        if name in ref and name in got and ref[name].shape == got[name].shape:
            rows.append(LayerSensitivity(site.node.name, site.label, sqnr_db(ref[name], got[name])))
    return sorted(rows, key=lambda r: r.sqnr_db)
