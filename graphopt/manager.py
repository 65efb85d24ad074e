"""The pass manager: runs a validated pipeline on a copy of the model and keeps a ledger.

After every pass it lints the graph, runs it on probe inputs, and records the deviation from
the original model (max abs error, relative error, top-1 agreement for classifiers), params,
MACs and time: the *compression ledger*. It never mutates the caller's model: the first
thing it does is copy it. When a pass crashes it writes a reproducer bundle.

>>> import torch, graphopt
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(), torch.nn.ReLU())
>>> ir = graphopt.GraphIR.trace(model.eval(), (torch.randn(2, 4),))
>>> result = graphopt.PassManager("cleanup").run(ir)
>>> result.pipeline, result.ledger[-1].max_abs_err
('cleanup', 0.0)
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .errors import GraphoptError, PassCrash, first_line
from .ir import GraphIR
from .pass_api import Pass, PassContext
from .pipeline import format_pipeline, format_step, parse, resolve
from .plugins import Registry, get_registry

__all__ = ["Deviation", "LedgerEntry", "PassManager", "Result", "deviation", "run_model"]

#: relative error above which an exact pass is reported as having changed the model
EXACT_TOLERANCE = 1e-4


@dataclass
class Deviation:
    """How far one model's outputs are from another's on the same inputs."""

    max_abs_err: float
    rel_err: float
    top1: float | None


@dataclass
class LedgerEntry:
    """One row of the compression ledger: the state of the model after a pass."""

    step: str
    exact: bool
    params: int
    macs: int
    max_abs_err: float
    rel_err: float
    top1: float | None
    seconds: float
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["options"] = {k: _jsonable(v) for k, v in self.options.items()}
        return data


@dataclass
class Result:
    """What a pipeline run produced: the optimised IR and its ledger."""

    ir: GraphIR
    pipeline: str
    ledger: list[LedgerEntry]

    def metadata(self) -> dict[str, Any]:
        """What lowering stores beside the artifact: pipeline, ledger, versions."""
        from . import __version__

        return {
            "graphopt": __version__,
            "torch": torch.__version__,
            "source": self.ir.source,
            "pipeline": self.pipeline,
            "ledger": [e.to_json() for e in self.ledger],
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


def run_model(gm: torch.nn.Module, inputs: tuple[Any, ...]) -> Any:
    """Run a model for checking: eval mode, no grad; the training flag is restored after."""
    modes = [(m, m.training) for m in gm.modules()]
    for m, _ in modes:  # not gm.eval(): exported programs refuse it, the flag is what matters
        m.training = False
    try:
        with torch.no_grad():
            return gm(*inputs)
    finally:
        for m, mode in modes:
            m.training = mode


def _float_leaves(out: Any) -> list[torch.Tensor]:
    leaves = pytree.tree_leaves(out)
    return [t.detach().float() for t in leaves if isinstance(t, torch.Tensor)]


def deviation(out: Any, ref: Any) -> Deviation:
    """Max abs error, relative error (‖out−ref‖/‖ref‖) and top-1 agreement of two outputs.

    Top-1 agreement is reported when the first output is a batch of logits (N×C, C>1).
    """
    a, b = _float_leaves(out), _float_leaves(ref)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        shapes = [tuple(x.shape) for x in a], [tuple(y.shape) for y in b]
        raise GraphoptError(
            f"the optimised model's outputs {shapes[0]} no longer match the original's "
            f"{shapes[1]}; the pipeline changed the output shape"
        )
    if not a:
        return Deviation(0.0, 0.0, None)
    max_abs = max(
        float((x - y).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b, strict=True)
    )
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b, strict=True)) ** 0.5
    den = sum(float(y.pow(2).sum()) for y in b) ** 0.5
    rel = num / den if den > 0 else (0.0 if num == 0 else float("inf"))
    top1 = None
    if a[0].dim() == 2 and a[0].shape[1] > 1:
        top1 = float((a[0].argmax(1) == b[0].argmax(1)).float().mean())
    return Deviation(max_abs, rel, top1)


class PassManager:
    """Parses, validates and runs a pipeline; see the module docstring.

    ``print_after`` names passes (or ``"all"``) after which the graph's code is printed;
    ``time_passes`` prints a timing table at the end; ``repro_dir`` is where a crash
    reproducer bundle goes (default: the current directory; ``reproducer=False`` skips it
    and the per-pass copy it needs). ``target_format`` names the exporter the result will
    be written with (e.g. ``"onnx"``): every pass checks it at once (``Pass.check_target``)
    and sees it as ``ctx.target_format``.
    """

    def __init__(
        self,
        pipeline: str | list[Pass],
        *,
        registry: Registry | None = None,
        print_after: Iterable[str] = (),
        time_passes: bool = False,
        repro_dir: str | None = None,
        console: Any = None,
        reproducer: bool = True,
        target_format: str | None = None,
    ) -> None:
        self.registry = registry or get_registry()
        if isinstance(pipeline, str):
            self.passes = resolve(parse(pipeline), self.registry)
        else:
            from .pipeline import check_order

            check_order(pipeline)
            self.passes = list(pipeline)
        self.print_after = set(print_after)
        self.time_passes = time_passes
        self.repro_dir = repro_dir
        self.console = console
        self.reproducer = reproducer
        self.target_format = target_format
        for p in self.passes:
            p.check_target(target_format)

    @property
    def pipeline(self) -> str:
        return format_pipeline(self.passes)

    def run(
        self,
        ir: GraphIR,
        *,
        data: Any = None,
        probe_inputs: tuple[Any, ...] | None = None,
        on_step: Callable[[LedgerEntry], None] | None = None,
    ) -> Result:
        """Run the pipeline on a copy of ``ir``; ``ir`` and its model are left untouched."""
        reference = ir.copy()
        work = ir.copy()
        probe = probe_inputs if probe_inputs is not None else ir.example_inputs
        ref_out = run_model(reference.gm, probe)
        ledger = [
            LedgerEntry(
                "(input)",
                True,
                work.total_params(),
                work.total_macs(),
                0.0,
                0.0,
                1.0 if deviation(ref_out, ref_out).top1 is not None else None,
                0.0,
            )
        ]
        if on_step:
            on_step(ledger[0])
        prev_out = ref_out  # an exact pass is judged against the step before it
        for p in self.passes:
            ctx = PassContext(
                probe_inputs=probe,
                reference=reference.gm,
                data=data,
                console=self.console,
                target_format=self.target_format,
            )
            before = work.copy() if self.reproducer else None
            start = time.perf_counter()
            try:
                p.run(work, ctx)
                work.recompile()
            except GraphoptError:
                raise
            except Exception as exc:
                bundle = self._write_reproducer(ir, before, p, exc)
                raise PassCrash(p.name, exc, bundle) from exc
            seconds = time.perf_counter() - start
            work.invalidate(keep=p.keeps)
            work.history.append(format_step(p))
            entry, prev_out = self._measure(work, p, ctx, probe, ref_out, prev_out, seconds)
            ledger.append(entry)
            if on_step:
                on_step(entry)
            if "all" in self.print_after or p.name in self.print_after:
                self._print_graph(work, p)
        if self.time_passes:
            self._print_times(ledger)
        return Result(work, self.pipeline, ledger)

    def _measure(
        self,
        work: GraphIR,
        p: Pass,
        ctx: PassContext,
        probe: tuple[Any, ...],
        ref_out: Any,
        prev_out: Any,
        seconds: float,
    ) -> tuple[LedgerEntry, Any]:
        """The ledger entry of ``p`` (deviation from the original model) and the outputs."""
        try:
            out = run_model(work.gm, probe)
        except Exception as exc:
            failure = RuntimeError(f"the rewritten model fails to run: {first_line(exc)}")
            raise PassCrash(p.name, failure, None) from exc
        dev = deviation(out, ref_out)
        notes = list(ctx.notes)
        step_err = dev.rel_err if prev_out is ref_out else deviation(out, prev_out).rel_err
        if p.exact and step_err > EXACT_TOLERANCE:
            notes.append(
                f"exact pass changed the output: relative error {step_err:.2e} against the "
                f"previous step exceeds {EXACT_TOLERANCE:.0e}"
            )
        entry = LedgerEntry(
            step=format_step(p),
            exact=p.exact,
            params=work.total_params(),
            macs=work.total_macs(),
            max_abs_err=dev.max_abs_err,
            rel_err=dev.rel_err,
            top1=dev.top1,
            seconds=seconds,
            options={s.name: getattr(p.options, s.name) for s in p.option_specs()},
            notes=notes,
            stats=dict(ctx.stats),
        )
        return entry, out

    def _print_graph(self, work: GraphIR, p: Pass) -> None:
        from rich.console import Console
        from rich.syntax import Syntax

        console = self.console or Console(stderr=True)
        console.rule(f"after {format_step(p)}")
        console.print(Syntax(work.gm.code.strip(), "python", theme="ansi_dark"))

    def _print_times(self, ledger: list[LedgerEntry]) -> None:
        from rich.console import Console
        from rich.table import Table

        console = self.console or Console(stderr=True)
        total = sum(e.seconds for e in ledger) or 1.0
        table = Table(title="time per pass")
        table.add_column("pass")
        table.add_column("seconds", justify="right")
        table.add_column("share", justify="right")
        for e in ledger[1:]:
            table.add_row(e.step, f"{e.seconds:.3f}", f"{100 * e.seconds / total:.1f}%")
        console.print(table)

    def _write_reproducer(
        self, original: GraphIR, before: GraphIR | None, p: Pass, exc: BaseException
    ) -> str | None:
        """Save what reproduces a crash: input model, model before the pass, inputs, pipeline."""
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        root = os.path.join(self.repro_dir or os.getcwd(), f"graphopt-repro-{p.name}-{stamp}")
        try:
            os.makedirs(root, exist_ok=True)
            torch.save(_detached(original.gm), os.path.join(root, "input_model.pt"))
            if before is not None:
                torch.save(_detached(before.gm), os.path.join(root, "before_pass.pt"))
            torch.save(original.example_inputs, os.path.join(root, "inputs.pt"))
            shapes = [
                ",".join(map(str, t.shape))
                for t in original.example_inputs
                if isinstance(t, torch.Tensor)
            ]
            with open(os.path.join(root, "pipeline.txt"), "w") as f:
                f.write(self.pipeline + "\n")
            with open(os.path.join(root, "versions.json"), "w") as f:
                json.dump(_versions(), f, indent=2)
            with open(os.path.join(root, "traceback.txt"), "w") as f:
                f.write("".join(traceback.format_exception(exc)))
            shape_args = " ".join(f"--input-shape {s}" for s in shapes)
            with open(os.path.join(root, "README.txt"), "w") as f:
                f.write(
                    f"Pass '{p.name}' crashed: {first_line(exc)}\n\n"
                    "Reproduce the crash with the failing pass alone:\n"
                    f"  graphopt optimize before_pass.pt --trust-pickle {shape_args} "
                    f"--passes '{format_step(p)}' -o out.pt\n"
                    "or the whole pipeline from the input model:\n"
                    f"  graphopt optimize input_model.pt --trust-pickle {shape_args} "
                    f"--passes '{self.pipeline}' -o out.pt\n"
                )
        except Exception:
            return None
        return root


def _detached(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose node metadata holds no fake tensors (which cannot be pickled)."""
    clone = copy.deepcopy(gm)
    for node in clone.graph.nodes:
        node.meta.pop("val", None)
    return clone


def _versions() -> dict[str, str]:
    import torchvision

    from . import __version__

    return {
        "graphopt": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
