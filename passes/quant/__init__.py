"""``quant``: int8 quantization with calibration, lowered to real int8 kernels.

The pass finds the ops that have int8 kernels (conv and linear layers fused with a
following ReLU, adds, concats) and the ops that compute on int8 values directly (pooling,
ReLU/ReLU6, reshapes, splits), calibrates the range of every value that enters int8 on the
user's data, and rewrites the graph into one of three forms:

* ``form=int8`` (default): PyTorch's x86/fbgemm int8 kernels. The result is an ordinary
  ``torch.fx.GraphModule`` of torch classes, so the ``.pt`` artifact runs without graphopt.
* ``form=qdq``: float ops between quantize/dequantize pairs with int8 weights: the
  reference form for simulation, and what ``-o model.onnx`` turns into an ONNX QDQ model
  that onnxruntime runs with its int8 kernels.
* ``form=qat``: the same quantization points as trainable fake-quant with a straight-through
  estimator, for training (``distill``); a later ``quant`` converts the trained model using
  the ranges learnt.

Weights are int8, symmetric, per output channel; activations uint8 per tensor, asymmetric
or symmetric; the formulas are in :mod:`graphopt.passes.quant.observers`. With
``mode=dynamic`` only ``Linear`` and ``LSTM`` change, to dynamic int8 kernels that quantize
activations on the fly (no calibration).

>>> import torch, graphopt
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
>>> x = torch.randn(4, 3, 16, 16)
>>> result = graphopt.optimize(model, "quant", example_inputs=(x,), data=[(x,)])
>>> [type(m).__name__ for m in result.ir.gm.children()]
['ConvReLU2d']
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx

import graphopt
from graphopt import GraphIR, GraphoptError, PassContext, deviation
from graphopt.lowering import ARTIFACT_TOLERANCE
from graphopt.manager import run_model

from .convert import QParams, dynamic_int8, to_int8, to_qdq
from .observers import activation_qparams, make_observer
from .plan import Plan, Site, calibrate, input_batches, make_plan, record, skip_matches
from .qat import to_qat, weights_from_qat

__all__ = ["LayerSensitivity", "Quant", "QuantReport", "quant_report", "sqnr_db"]

#: ledger counter for each kind of quantized op
_COUNTER = {"layer": "layers quantized", "add": "adds quantized", "cat": "concats quantized"}
#: key of the :class:`QuantReport` in ``GraphModule.meta`` after the pass
REPORT_KEY = "graphopt.quant"


@dataclass(frozen=True)
class LayerSensitivity:
    """SQNR of one quantized op's output against the float model's, on calibration data."""

    node: str
    op: str
    sqnr_db: float


@dataclass
class QuantReport:
    """What the pass did: quantized ops, their qparams and their sensitivity, worst first."""

    form: str
    mode: str
    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    qparams: dict[str, tuple[float, int]] = field(default_factory=dict)
    sensitivity: list[LayerSensitivity] = field(default_factory=list)


def quant_report(gm: fx.GraphModule) -> QuantReport | None:
    """The :class:`QuantReport` the pass left on ``gm`` (kept there as plain data, so that a
    pickled model does not need graphopt), or None."""
    raw = gm.meta.get(REPORT_KEY)
    if raw is None:
        return None
    rows = [LayerSensitivity(**r) for r in raw["sensitivity"]]
    return QuantReport(**{**raw, "sensitivity": rows})


def sqnr_db(signal: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σx² / Σ(x−x̂)²)`` in decibels."""
    noise = float((signal.double() - approx.double()).pow(2).sum())
    power = float(signal.double().pow(2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(power / noise) if power > 0 else -math.inf


class Quant(graphopt.Pass):
    name = "quant"
    summary = "Quantize to int8 (static, dynamic or QAT), calibrated on data; int8 kernels."
    exact = False
    keeps = ("shapes",)
    after = ("fold", "cleanup")

    @dataclass
    class Options:
        form: Literal["int8", "qdq", "qat"] = graphopt.option(
            "int8",
            "int8: PyTorch int8 kernels; qdq: quantize/dequantize reference form (for ONNX); "
            "qat: trainable fake-quant",
        )
        mode: Literal["static", "dynamic"] = graphopt.option(
            "static", "static: calibrated activations; dynamic: int8 Linear/LSTM only"
        )
        observer: Literal["minmax", "moving_average", "percentile", "mse"] = graphopt.option(
            "mse", "how calibration picks each activation's range"
        )
        percentile: float = graphopt.option(
            99.99,
            "percentile kept by observer=percentile",
            gt=50,
            le=100,
            what="a percentile",
        )
        symmetric: bool = graphopt.option(False, "symmetric activations (zero point in the middle)")
        per_channel: bool = graphopt.option(True, "one weight scale per output channel")
        reduce_range: bool = graphopt.option(
            True, "7-bit activations, so int8 kernels on CPUs without VNNI cannot overflow"
        )
        onnx_int8: bool = graphopt.option(
            False, "form=qdq: signed int8 activations instead of uint8 (S8S8 in onnxruntime)"
        )
        batches: int = graphopt.option(32, "calibration batches to use at most", ge=1)
        skip: list[str] = graphopt.option([], "node or module name globs to keep in float")
        skip_types: list[str] = graphopt.option([], "module class names to keep in float")
        sensitivity: bool = graphopt.option(True, "measure each quantized op's output SQNR")

    def run(self, ir: GraphIR, ctx: PassContext) -> None:
        opts = self.options
        if _is_int8(ir.gm):
            raise GraphoptError(
                "the model is already quantized to int8; run quant on the float model"
            )
        if opts.mode == "dynamic":
            self._dynamic(ir, ctx)
            return
        _fold_batchnorm(ir, ctx)
        trained = weights_from_qat(ir)
        float_gm = copy.deepcopy(ir.gm)
        plan = make_plan(ir, opts.skip, opts.skip_types)
        for name in plan.skipped:
            ctx.note(f"kept {name} in float: matches skip/skip_types")
        if not plan.sites:
            raise GraphoptError(
                "quant found no conv, linear, add or concat to quantize; check skip and "
                "skip_types, or use mode=dynamic for Linear/LSTM models"
            )
        batches = self._batches(ir, ctx)
        qparams = self._calibrate(float_gm, ir, plan, batches, ctx, trained)
        _propagate(plan, qparams)
        report = QuantReport(opts.form, opts.mode, skipped=list(plan.skipped))
        report.quantized = [n.name for n in plan.sites]
        report.qparams = {n.name: (q.scale, q.zero_point) for n, q in qparams.items()}
        if opts.form == "int8":
            results = to_int8(ir, plan, qparams, per_channel=opts.per_channel)
        elif opts.form == "qdq":
            results = to_qdq(ir, plan, qparams, per_channel=opts.per_channel, signed=opts.onnx_int8)
        else:
            results = to_qat(
                ir,
                plan,
                qparams,
                self._qrange(),
                per_channel=opts.per_channel,
                symmetric=opts.symmetric,
            )
        ir.recompile()
        _copy_meta(ir)
        # A pickled GraphModule names its tracer class; the default one keeps the .pt
        # artifact loadable where graphopt is not installed.
        ir.gm._tracer_cls = ir.graph._tracer_cls = None
        for site in plan.sites.values():
            ctx.stat(_COUNTER[site.kind])
        if opts.sensitivity and opts.form != "qat":
            report.sensitivity = _sensitivity(float_gm, ir.gm, plan, results, batches[0])
            for s in report.sensitivity[:3]:
                ctx.note(f"most sensitive: {s.node} ({s.op}) SQNR {s.sqnr_db:.1f} dB")
        if opts.form == "qdq":
            ir.gm.meta[ARTIFACT_TOLERANCE] = _artifact_tolerance(float_gm, ir.gm, batches[0])
        ir.gm.meta[REPORT_KEY] = dataclasses.asdict(report)

    # -- pieces ---------------------------------------------------------------------------------

    def _qrange(self) -> tuple[int, int]:
        return (0, 127) if self.options.reduce_range else (0, 255)

    def _batches(self, ir: GraphIR, ctx: PassContext) -> list[tuple[Any, ...]]:
        n_inputs = len(ir.example_inputs)
        if ctx.data is not None:
            try:
                batches = input_batches(ctx.data, n_inputs, self.options.batches)
            except (TypeError, IndexError, KeyError):
                batches = []
            if not batches:
                raise GraphoptError(
                    "the calibration data yields no usable batches; give an iterable of input "
                    "tensors, input tuples or (inputs, target) pairs"
                )
            return batches
        message = (
            "quant: no calibration data given (--data or data=); calibrating on random "
            "normal inputs, so activation ranges and accuracy will be poor"
        )
        warnings.warn(message, UserWarning, stacklevel=2)
        if ctx.console is not None:
            ctx.console.print(f"[bold red]warning:[/] {message}")
        ctx.note("WARNING: calibrated on random inputs (no data given)")
        gen = torch.Generator().manual_seed(0)
        n = min(self.options.batches, 8)
        return [
            tuple(
                torch.randn(x.shape, generator=gen, dtype=x.dtype)
                if isinstance(x, torch.Tensor) and x.is_floating_point()
                else x
                for x in ir.example_inputs
            )
            for _ in range(n)
        ]

    def _calibrate(
        self,
        float_gm: fx.GraphModule,
        ir: GraphIR,
        plan: Plan,
        batches: list[tuple[Any, ...]],
        ctx: PassContext,
        trained: dict[str, QParams],
    ) -> dict[fx.Node, QParams]:
        opts = self.options
        qmin, qmax = self._qrange()
        by_name = {n.name: n for n in float_gm.graph.nodes}
        observers = {
            by_name[node.name]: make_observer(
                opts.observer,
                percentile=opts.percentile,
                symmetric=opts.symmetric,
                qmin=qmin,
                qmax=qmax,
            )
            for node in plan.observed
        }
        passes = 2 if any(o.two_pass for o in observers.values()) else 1
        try:
            calibrate(float_gm, batches, observers, _progress(ctx, len(batches) * passes))
        except GraphoptError:
            raise
        except Exception as exc:
            raise GraphoptError(
                f"the model fails on a calibration batch ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); give batches of the "
                "model's input shape"
            ) from None
        qparams: dict[fx.Node, QParams] = {}
        for node in plan.observed:
            if node.name in trained:
                qparams[node] = trained[node.name]
                continue
            obs = observers[by_name[node.name]]
            if not obs.seen():
                raise GraphoptError(
                    f"calibration saw no finite values at '{node.name}'; check the data, or "
                    f"skip it with quant(skip=[{node.name}])"
                )
            scale, zp = activation_qparams(
                *obs.range(), symmetric=opts.symmetric, qmin=qmin, qmax=qmax
            )
            qparams[node] = QParams(scale, zp)
        return qparams

    def _dynamic(self, ir: GraphIR, ctx: PassContext) -> None:
        opts = self.options
        if opts.form != "int8":
            raise GraphoptError(
                f"quant(mode=dynamic) has only the int8 form, not form={opts.form}; drop form"
            )
        done = dynamic_int8(
            ir,
            lambda n: skip_matches(n, ir, opts.skip, opts.skip_types),
            per_channel=opts.per_channel,
        )
        if not done:
            raise GraphoptError(
                "quant(mode=dynamic) found no Linear or LSTM module to quantize; use "
                "mode=static for conv models"
            )
        ir.recompile()
        ir.gm._tracer_cls = ir.graph._tracer_cls = None
        ctx.stat("layers quantized (dynamic)", len(done))
        ir.gm.meta[REPORT_KEY] = dataclasses.asdict(QuantReport(opts.form, "dynamic", done))


def _is_int8(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` already runs int8 kernels (static or dynamic)."""
    for node in gm.graph.nodes:
        if node.target is torch.quantize_per_tensor:
            return True
        if getattr(node.target, "namespace", None) in ("quantized", "quantized_decomposed"):
            return True
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in gm.modules())


def _fold_batchnorm(ir: GraphIR, ctx: PassContext) -> None:
    """Fold BatchNorm into the layer before it first (int8 kernels have no BatchNorm)."""
    from graphopt.passes.fold import Fold

    bns = ir.nodes(module_type=torch.nn.modules.batchnorm._BatchNorm)
    if not bns:
        return
    sub = PassContext(probe_inputs=ctx.probe_inputs)
    Fold().run(ir, sub)
    ir.recompile()
    ir.invalidate()
    folded = int(sub.stats.get("BN folded", 0))
    if folded:
        ctx.stat("BN folded first", folded)
        ctx.note(f"folded {folded} BatchNorm layer(s) first (add fold before quant to see them)")


def _propagate(plan: Plan, qparams: dict[fx.Node, QParams]) -> None:
    """Give each site, fused activation and int8 passthrough the scale of the value it holds."""
    for site in plan.sites.values():
        assert site.observe is not None
        qparams[site.node] = qparams[site.observe]
        qparams[site.result] = qparams[site.observe]
    graph_order = sorted(plan.quantized, key=_order_key(plan))
    for node in graph_order:
        if node not in qparams and node.args and isinstance(node.args[0], fx.Node):
            src = node.args[0]
            if src in qparams:
                qparams[node] = qparams[src]


def _order_key(plan: Plan) -> Any:
    index: dict[fx.Node, int] = {}
    if plan.sites:
        graph = next(iter(plan.sites)).graph
        index = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: index.get(n, 0)


def _copy_meta(ir: GraphIR) -> None:
    """New nodes get the shape of the value they carry (int8 tensors cannot be faked)."""
    for node in ir.graph.nodes:
        if "val" not in node.meta and node.args and isinstance(node.args[0], fx.Node):
            src = node.args[0]
            if "val" in src.meta:
                node.meta["val"] = src.meta["val"]


def _progress(ctx: PassContext, total: int) -> Any:
    def ticks() -> Generator[None, None, None]:
        console = ctx.console
        if console is None or not console.is_terminal:
            while True:
                yield
        from rich.progress import Progress

        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("quant: calibrating", total=total)
            while True:
                yield
                progress.advance(task)

    return ticks


def _artifact_tolerance(
    float_gm: fx.GraphModule, gm: fx.GraphModule, inputs: tuple[Any, ...]
) -> float:
    """How far another runtime's int8 kernels may land from this model: 3× its own error.

    Two int8 implementations round a few values differently (division or multiplication by
    the scale, accumulation order), and each such one-step difference travels through the
    later layers, so they agree to the order of the quantization noise, not to 1e-3.
    """
    noise = deviation(run_model(gm, inputs), run_model(float_gm, inputs)).rel_err
    return max(1e-3, 3 * noise)


def _sensitivity(
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


PASSES = (Quant,)
