"""The ``quant`` pass: options, and the order in which it plans, calibrates, searches, rewrites."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.fx as fx

import graphopt
from graphopt import GraphIR, GraphoptError, PassContext, deviation, run_model
from graphopt.errors import first_line
from graphopt.lowering import ARTIFACT_TOLERANCE, ONNX_TRANSLATIONS

from .convert import QParams, to_int8, to_qdq
from .expand import expand_composites, plain_linears
from .forms import check_combination, is_token_model, pick_form
from .linear import (
    INT4_GROUPS,
    dynamic_aten,
    dynamic_int8,
    dynamic_onnx,
    linears,
    weight_only,
)
from .observers import MinMaxObserver, activation_qparams, make_observer
from .onnxops import DYNAMIC_LINEAR, TRANSLATIONS
from .plan import Plan, Site, calibrate, input_batches, make_plan, skip_matches
from .qat import to_qat, weights_from_qat
from .report import REPORT_KEY, QuantReport, report_target, sensitivity
from .search import Rounding, Simulator
from .smooth import smooth
from .target import Target, accuracy_metric, labelled, meet_target, resolve_metric

__all__ = ["DEFAULT_MARGIN_DB", "DEFAULT_MIN_SQNR", "Quant"]

#: output SQNR (dB) plain ``quant`` keeps, keeping the cheapest ops in float for it
DEFAULT_MIN_SQNR = 25.0
#: the default target is searched this many dB above DEFAULT_MIN_SQNR on the calibration
#: samples: on unseen inputs vit_b_16 landed 0.2 dB below what its calibration samples gave
DEFAULT_MARGIN_DB = 0.5
#: all-int8 output SQNR (dB) below which plain ``quant`` warns loudly
WARN_BELOW_SQNR = 20.0
#: ledger counter for each kind of quantized op
_COUNTER = {"layer": "layers quantized", "add": "adds quantized", "cat": "concats quantized"}


class Quant(graphopt.Pass):
    name = "quant"
    summary = (
        "Quantize to int8 (static, dynamic, weight-only int8/int4, QAT) on real int8 kernels, "
        "keeping an accuracy target."
    )
    exact = False
    keeps = ("shapes",)
    after = ("fold", "cleanup")

    @dataclass
    class Options:
        mode: Literal["auto", "static", "dynamic", "weight_only"] = graphopt.option(
            "auto",
            "auto: dynamic for token models (integer inputs into an embedding), else static; "
            "static: calibrated int8 activations; dynamic: int8 Linear/LSTM, activations "
            "quantized on the fly; weight_only: int8/int4 Linear weights, float activations",
        )
        form: Literal["auto", "int8", "qdq", "aten", "onnx", "qat"] = graphopt.option(
            "auto",
            "auto: what the output format holds (int8 for .pt, qdq or onnx for .onnx, "
            "exportable for .pt2/folder); int8: fbgemm kernels (.pt only); qdq: "
            "quantize/dequantize form (ONNX, .pt2); aten: aten int8 kernels (exportable); "
            "onnx: dynamic int8 as ONNX DynamicQuantizeLinear + MatMulInteger (.onnx only); "
            "qat: trainable fake-quant",
        )
        min_sqnr: float | None = graphopt.option(
            None,
            f"keep the cheapest ops float so the output SQNR stays ≥ this many dB (default "
            f"{DEFAULT_MIN_SQNR:g}; 0 turns the target off)",
            ge=0,
            what="a number of decibels",
        )
        max_drop: float | None = graphopt.option(
            None,
            "keep the cheapest ops float so accuracy on labelled data (or metric) drops ≤ this",
            ge=0,
            what="a number of accuracy points",
        )
        metric: str | None = graphopt.option(
            None, "package.module:callable scoring a model (higher is better), for max_drop"
        )
        smooth: float | None = graphopt.option(
            0.5,
            "SmoothQuant α: move activation outliers into the weights of the Linears they "
            "feed, where it folds into a LayerNorm/Linear and lowers their int8 error; none: off",
            ge=0,
            le=1,
            what="an α",
        )
        bits: Literal[8, 4] = graphopt.option(8, "mode=weight_only: int8 or int4 weights")
        group_size: int = graphopt.option(
            128,
            "mode=weight_only bits=4: inputs sharing one int4 scale",
            check=lambda v: v in INT4_GROUPS,
            check_msg=" or ".join(map(str, INT4_GROUPS)),
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
            True,
            "7-bit activations (static and dynamic; in ONNX dynamic int8, weights whose "
            "adjacent pairs sum to ≤ 128 codes), so int8 kernels on CPUs without VNNI cannot "
            "overflow; false: full 8-bit, more accurate, for VNNI/AMX CPUs",
        )
        onnx_int8: bool = graphopt.option(
            False, "form=qdq: signed int8 activations instead of uint8 (S8S8 in onnxruntime)"
        )
        batches: int = graphopt.option(32, "calibration batches to use at most", ge=1)
        skip: list[str] = graphopt.option([], "node or module name globs to keep in float")
        skip_types: list[str] = graphopt.option([], "module class names to keep in float")
        sensitivity: bool = graphopt.option(True, "measure each quantized op's output SQNR")
        expand: bool = graphopt.option(
            True, "expand torch.nn attention/transformer layers so their Linears quantize"
        )

    def check_target(self, target_format: str | None) -> None:
        opts = self.options
        check_combination(opts.form, opts.mode, target_format)
        if opts.metric is not None and opts.max_drop is None:
            raise GraphoptError("quant(metric=…) scores the max_drop target; give max_drop too")
        if opts.form == "qat" and (opts.min_sqnr or opts.max_drop is not None):
            raise GraphoptError(
                "quant(form=qat) makes a model to train, which no accuracy target applies to; "
                "put the target on the quant that converts it after training"
            )

    def run(self, ir: GraphIR, ctx: PassContext) -> None:
        opts = self.options
        self.check_target(ctx.target_format)
        if _is_int8(ir.gm):
            raise GraphoptError(
                "the model is already quantized to int8; run quant on the float model"
            )
        linears = plain_linears(ir)
        if linears:
            ctx.note(f"{linears} Linear-like module(s) (Linear subclasses, HF Conv1D) made Linear")
        if opts.expand:
            _expand(ir, ctx)
        mode = self._mode(ir, ctx)
        check_combination(opts.form, mode, ctx.target_format)
        form, why = pick_form(opts.form, mode, ctx.target_format)
        if why:
            ctx.note(f"mode={mode}: picked {why}; set form= to choose another")
        if mode == "static":
            self._static(ir, ctx, form)
        else:
            self._linear_only(ir, ctx, mode, form)
        ir.recompile()
        # A pickled GraphModule names its tracer class; the default one keeps the .pt
        # artifact loadable where graphopt is not installed.
        ir.gm._tracer_cls = ir.graph._tracer_cls = None

    # -- mode and data --------------------------------------------------------------------------

    def _mode(self, ir: GraphIR, ctx: PassContext) -> str:
        mode = self.options.mode
        if mode != "auto":
            return mode
        if not is_token_model(ir):
            return "static"
        ctx.note("token model (integer inputs into an embedding): picked mode=dynamic")
        return "dynamic"

    def _qrange(self) -> tuple[int, int]:
        return (0, 127) if self.options.reduce_range else (0, 255)

    def _onnx_pair_max(self) -> int | None:
        """ONNX's DynamicQuantizeLinear has 8-bit activations only, so ``reduce_range``
        bounds the weights instead: each adjacent pair of codes sums to at most 128 in
        magnitude, so the uint8 × int8 pair sums of CPUs without VNNI stay within int16.
        (onnxruntime's ``reduce_range`` takes 7-bit weights for that; the pair bound keeps
        about half a bit more: a channel's largest pair is rarely twice its largest weight.)"""
        return 127 if self.options.reduce_range else None

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
            ctx.console.print(f"[bold red]warning:[/] {message}", highlight=False)
        ctx.note("WARNING: calibrated on random inputs (no data given)")
        return random_batches(ir.example_inputs, min(self.options.batches, 8))

    def _skip(self, ir: GraphIR, floats: Iterable[str] = ()) -> Any:
        opts, names = self.options, set(floats)
        return lambda n: n.name in names or skip_matches(n, ir, opts.skip, opts.skip_types)

    def _linear_target(
        self,
        ir: GraphIR,
        ctx: PassContext,
        mode: str,
        form: str,
        target: Target,
        report: QuantReport,
    ) -> list[str]:
        """Meet the accuracy target in a Linear-only mode; the Linears to keep float."""
        opts = self.options
        if ctx.data is not None:
            batches = self._batches(ir, ctx)
        else:
            batches = random_batches(ir.example_inputs, self.options.batches)
            ctx.note(
                "target measured on random inputs (no data given): normal floats, integers "
                "drawn between the example input's smallest and largest"
            )
        plan = Plan()
        for node in linears(ir, self._skip(ir)):
            plan.sites[node] = Site(node, "layer", label="Linear")
        if mode == "weight_only":
            rounding = Rounding("bf16", bits=opts.bits, group_size=opts.group_size)
        elif form == "onnx":
            rounding = Rounding(
                "dynamic", (0, 255), per_channel=opts.per_channel,
                pair_max=self._onnx_pair_max(),
            )  # fmt: skip
        else:
            inputs = "per_row" if form == "aten" else "dynamic"
            rounding = Rounding(inputs, self._qrange(), per_channel=opts.per_channel)
        sim = Simulator(ir.gm, plan, {}, rounding)
        outcome = meet_target(ir, plan, sim, batches, target)
        report_target(target, outcome, plan, report, ctx, warn_below=WARN_BELOW_SQNR)
        return [n.name for n in outcome.floats]

    def _smooth(
        self, ir: GraphIR, ctx: PassContext, batches: list[tuple[Any, ...]], *, static: bool
    ) -> None:
        alpha = self.options.smooth
        if alpha is None:
            return
        opts, qmax = self.options, self._qrange()[1]
        observer = (
            partial(
                make_observer, opts.observer, percentile=opts.percentile, symmetric=False,
                qmin=0, qmax=qmax,
            )
            if static
            else MinMaxObserver  # dynamic kernels quantize over each tensor's extremes
        )  # fmt: skip
        with _model_runs():
            done = smooth(ir, batches, alpha, self._skip(ir), qmax=qmax, observer=observer)
        if done.folded:
            ctx.stat("Linear inputs smoothed", len(done.folded))
            ctx.note(
                f"smooth={alpha:g}: moved activation outliers into the Linears reading "
                f"{len(done.folded)} LayerNorm/Linear output(s); declined where it would not "
                f"lower the int8 error ({len(done.declined)}); {len(done.skipped)} input(s) "
                "had nothing to fold the scale into"
            )

    # -- static ---------------------------------------------------------------------------------

    def _static(self, ir: GraphIR, ctx: PassContext, form: str) -> None:
        opts = self.options
        _fold_batchnorm(ir, ctx)
        trained = weights_from_qat(ir)
        batches = self._batches(ir, ctx)
        self._smooth(ir, ctx, batches, static=True)
        float_gm = copy.deepcopy(ir.gm)
        plan = make_plan(ir, opts.skip, opts.skip_types)
        for name in plan.skipped:
            ctx.note(f"kept {name} in float: matches skip/skip_types")
        if not plan.sites:
            raise GraphoptError(
                "quant found no conv, linear, add or concat to quantize; check skip and "
                "skip_types, or use mode=dynamic for Linear/LSTM models"
            )
        qparams = self._calibrate(float_gm, ir, plan, batches, ctx, trained)
        _propagate(plan, qparams)
        report = QuantReport(form, "static", skipped=list(plan.skipped), demoted=plan.demoted)
        target = self._target(ir, ctx) if form != "qat" else None
        if target is not None:
            rounding = Rounding("static", self._qrange(), per_channel=opts.per_channel)
            sim = Simulator(ir.gm, plan, qparams, rounding)
            outcome = meet_target(ir, plan, sim, batches, target)
            report_target(target, outcome, plan, report, ctx, warn_below=WARN_BELOW_SQNR)
            if outcome.floats:
                floats = [n.name for n in outcome.floats]
                plan = make_plan(ir, opts.skip, opts.skip_types, floats=floats)
                _propagate(plan, qparams)
        report.quantized = [n.name for n in plan.sites]
        report.qparams = {n.name: (q.scale, q.zero_point) for n, q in qparams.items()}
        if form == "int8":
            results = to_int8(ir, plan, qparams, per_channel=opts.per_channel)
        elif form == "qdq":
            results = to_qdq(ir, plan, qparams, per_channel=opts.per_channel, signed=opts.onnx_int8)
        else:
            results = to_qat(
                ir, plan, qparams, self._qrange(), per_channel=opts.per_channel,
                symmetric=opts.symmetric,
            )  # fmt: skip
        ir.recompile()
        _copy_meta(ir)
        for site in plan.sites.values():
            ctx.stat(_COUNTER[site.kind])
        if opts.sensitivity and form != "qat":
            report.sensitivity = sensitivity(float_gm, ir.gm, plan, results, batches[0])
            for s in report.sensitivity[:3]:
                ctx.note(f"most sensitive: {s.node} ({s.op}) SQNR {s.sqnr_db:.1f} dB")
        if form == "qdq":
            reference = run_model(float_gm, batches[0])
            ir.gm.meta[ARTIFACT_TOLERANCE] = _artifact_tolerance(reference, batches[0], ir.gm)
        ir.gm.meta[REPORT_KEY] = dataclasses.asdict(report)

    def _target(self, ir: GraphIR, ctx: PassContext) -> Target | None:
        """The accuracy target of these options (None: off)."""
        opts = self.options
        automatic = opts.min_sqnr is None and opts.max_drop is None
        min_sqnr = DEFAULT_MIN_SQNR if automatic else opts.min_sqnr
        if min_sqnr is not None and min_sqnr <= 0:
            min_sqnr = None
        target = Target(
            min_sqnr=min_sqnr, max_drop=opts.max_drop, automatic=automatic,
            margin_db=DEFAULT_MARGIN_DB if automatic else 0.0,
        )  # fmt: skip
        if opts.max_drop is not None:
            if opts.metric is not None:
                metric: Any = opts.metric
                target.metric = resolve_metric(metric) if isinstance(metric, str) else metric
                target.metric_name = f"metric {getattr(target.metric, '__name__', metric)}"
            else:
                data = labelled(ctx.data or [], len(ir.example_inputs), opts.batches)
                if not data:
                    raise GraphoptError(
                        "quant(max_drop=…) needs labelled data ((inputs, target) batches with "
                        "integer class targets) or a metric=package.module:callable"
                    )
                target.metric = accuracy_metric(data)
        if target.min_sqnr is None and target.max_drop is None:
            return None
        return target

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
        with _model_runs():
            calibrate(float_gm, batches, observers, _progress(ctx, len(batches) * passes))
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

    # -- Linear-only modes ----------------------------------------------------------------------

    def _linear_only(self, ir: GraphIR, ctx: PassContext, mode: str, form: str) -> None:
        opts = self.options
        if opts.smooth is not None and mode == "dynamic":
            data = self._batches(ir, ctx) if ctx.data is not None else None
            self._smooth(ir, ctx, data or random_batches(ir.example_inputs, 4), static=False)
        skip = self._skip(ir)
        report = QuantReport(form, mode)
        target = self._target(ir, ctx)
        if target is not None:
            floats = self._linear_target(ir, ctx, mode, form, target, report)
            skip = self._skip(ir, floats)
        fallback: list[str] = []
        reference = None
        if mode == "weight_only":
            done, fallback = weight_only(ir, skip, bits=opts.bits, group_size=opts.group_size)
            kind = f"weight-only int{opts.bits}"
        elif form == "onnx":
            probe = random_batches(ir.example_inputs, 1)[0]
            reference = (run_model(ir.gm, probe), probe)
            pair_max = self._onnx_pair_max()
            done = dynamic_onnx(ir, skip, per_channel=opts.per_channel, pair_max=pair_max)
            bound = ", adjacent pairs bounded for CPUs without VNNI" if pair_max else ""
            kind = f"dynamic, ONNX integer ops, 8-bit weights{bound}"
            lstms = ir.nodes(module_type=torch.nn.LSTM)
            if lstms:
                ctx.note(
                    f"{len(lstms)} LSTM call(s) stay float in ONNX (dynamic int8 LSTM has no "
                    "ONNX integer form here); write -o model.pt for int8 LSTMs"
                )
        elif form == "aten":
            done, kind = dynamic_aten(ir, skip), "dynamic, per-row int8 (aten)"
        else:
            done = dynamic_int8(
                ir, skip, per_channel=opts.per_channel, reduce_range=opts.reduce_range
            )
            kind = "dynamic" if opts.reduce_range else "dynamic, 8-bit activations"
        if not done:
            raise GraphoptError(
                f"quant(mode={mode}) found no Linear{' or LSTM' if form == 'int8' else ''} "
                "module to quantize; use mode=static for conv models"
            )
        if fallback:
            ctx.note(
                f"int4 kernel needs out_features % 16 == 0 and in_features % {opts.group_size} "
                f"== 0: int8 weights for {', '.join(fallback)}"
            )
        ctx.stat(f"layers quantized ({kind})", len(done))
        report.quantized = done
        ir.recompile()
        ir.invalidate()
        if reference is not None:
            ir.gm.meta[ONNX_TRANSLATIONS] = dict(TRANSLATIONS)
            ir.gm.meta[ARTIFACT_TOLERANCE] = _artifact_tolerance(*reference, ir.gm)
        ir.gm.meta[REPORT_KEY] = dataclasses.asdict(report)


def random_batches(example: tuple[Any, ...], n: int) -> list[tuple[Any, ...]]:
    """``n`` seeded random batches shaped like ``example``: normal floats, and integers
    drawn between the example's smallest and largest (token ids stay valid ids)."""
    gen = torch.Generator().manual_seed(0)

    def like(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dtype == torch.bool or x.numel() == 0:
            return x
        if x.is_floating_point():
            return torch.randn(x.shape, generator=gen, dtype=x.dtype)
        lo, hi = int(x.min()), int(x.max())
        return torch.randint(lo, hi + 1, x.shape, generator=gen, dtype=x.dtype)

    return [tuple(like(x) for x in example) for _ in range(n)]


@contextlib.contextmanager
def _model_runs() -> Iterator[None]:
    """Running the model on the user's batches: its failure is the data's, one sentence."""
    try:
        yield
    except GraphoptError:
        raise
    except Exception as exc:
        raise GraphoptError(
            f"the model fails on a calibration batch ({type(exc).__name__}: "
            f"{first_line(exc)}); give batches of the model's input shape"
        ) from None


def _expand(ir: GraphIR, ctx: PassContext) -> None:
    expansion = expand_composites(ir)
    if expansion.expanded:
        done = ", ".join(f"{n} {k}" for k, n in sorted(expansion.expanded.items()))
        ctx.note(f"expanded {done} into their ops, so their Linears quantize")
    for line in expansion.kept:
        ctx.note(f"kept {line}")


def _is_int8(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` already runs int8 kernels (static, dynamic or weight-only)."""
    int8_aten = {torch._int_mm, torch.ops.aten._weight_int8pack_mm.default}
    int8_aten |= {torch.ops.aten._weight_int4pack_mm_for_cpu.default, DYNAMIC_LINEAR}
    for node in gm.graph.nodes:
        if node.target is torch.quantize_per_tensor or node.target in int8_aten:
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


def _artifact_tolerance(reference: Any, inputs: tuple[Any, ...], gm: fx.GraphModule) -> float:
    """How far another runtime's int8 kernels may land from this model: 3× its own error
    (against ``reference``, the float model's output on ``inputs``).

    Two int8 implementations round a few values differently (division or multiplication by
    the scale, accumulation order), and each such one-step difference travels through the
    later layers, so they agree to the order of the quantization noise, not to 1e-3.
    """
    noise = deviation(run_model(gm, inputs), reference).rel_err
    return max(1e-3, 3 * noise)
