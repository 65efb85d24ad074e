"""The pass manager: runs a validated pipeline on a copy of the model and keeps a ledger.

After every pass it lints the graph, runs it on probe inputs (or takes the ``outputs``
analysis a pass that has just run it left), and records the deviation from the original
model (max abs error, relative error, top-1 agreement for classifiers), params,
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
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.fx as fx

from .errors import GraphoptError, PassCrash, first_line
from .ir import GraphIR
from .measuring import Deviation, deviation, run_model, weights_bytes
from .pass_api import Pass, PassContext
from .pipeline import check_order, format_pipeline, format_step, parse, resolve
from .plugins import Registry, get_registry
from .version import __version__

__all__ = [
    "REPRODUCER_LIMIT",
    "Deviation",
    "LedgerEntry",
    "PassManager",
    "Result",
    "deviation",
    "human_bytes",
    "ledger_from_metadata",
    "run_model",
]

#: relative error above which an exact pass is reported as having changed the model
EXACT_TOLERANCE = 1e-4
#: largest model weights a crash reproducer keeps when no folder was asked for (bytes)
REPRODUCER_LIMIT = 32_000_000


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
        """The row as plain data, as the artifact's metadata stores it."""
        data = asdict(self)
        data["options"] = {k: _jsonable(v) for k, v in self.options.items()}
        return data


def ledger_from_metadata(metadata: dict[str, Any]) -> list[LedgerEntry]:
    """The compression ledger stored in an artifact's metadata, as :class:`LedgerEntry` rows
    (keys a newer graphopt may have added are ignored)."""
    known = {f.name for f in fields(LedgerEntry)}
    return [
        LedgerEntry(**{k: v for k, v in row.items() if k in known})
        for row in metadata.get("ledger") or []
    ]


@dataclass
class Result:
    """What a pipeline run produced: the optimised IR and its ledger."""

    ir: GraphIR
    pipeline: str
    ledger: list[LedgerEntry]
    #: what ``ir`` returned for its example inputs in the ledger's last run (None when the
    #: ledger probed other inputs): lowering checks the written artifact against it
    outputs: Any = None

    def metadata(self) -> dict[str, Any]:
        """What lowering stores beside the artifact: pipeline, ledger, versions."""
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


class PassManager:
    """Parses, validates and runs a pipeline; see the module docstring.

    ``print_after`` names passes (or ``"all"``) after which the graph's code is printed;
    ``time_passes`` prints a timing table at the end. When a pass crashes a reproducer
    bundle is written to ``repro_dir``, with the model weights whatever their size; without
    ``repro_dir`` it goes to the temporary directory and keeps the weights only up to
    ``reproducer_limit`` bytes. ``reproducer=False`` skips it and the per-pass copy it
    needs.
    ``target_format`` names the exporter the result will be written with (e.g. ``"onnx"``):
    every pass checks it at once (``Pass.check_target``) and sees it as
    ``ctx.target_format``.
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
        reproducer_limit: int = REPRODUCER_LIMIT,
        target_format: str | None = None,
    ) -> None:
        self.registry = registry or get_registry()
        if isinstance(pipeline, str):
            self.passes = resolve(parse(pipeline), self.registry)
        else:
            check_order(pipeline)
            self.passes = list(pipeline)
        self.print_after = set(print_after)
        self.time_passes = time_passes
        self.repro_dir = repro_dir
        self.console = console
        self.reproducer = reproducer
        self.reproducer_limit = reproducer_limit
        self.target_format = target_format
        for p in self.passes:
            p.check_target(target_format)

    @property
    def pipeline(self) -> str:
        """The pipeline as canonical text."""
        return format_pipeline(self.passes)

    def run(
        self,
        ir: GraphIR,
        *,
        data: Any = None,
        probe_inputs: tuple[Any, ...] | None = None,
        on_step: Callable[[LedgerEntry], None] | None = None,
    ) -> Result:
        """Run the pipeline on a copy of ``ir``; ``ir`` and its model are left untouched.
        While it runs, :func:`graphopt.registry_in_effect` is this manager's registry."""
        with self.registry.in_effect():
            return self._run(ir, data, probe_inputs, on_step)

    def _run(
        self,
        ir: GraphIR,
        data: Any,
        probe_inputs: tuple[Any, ...] | None,
        on_step: Callable[[LedgerEntry], None] | None,
    ) -> Result:
        # the reference is only read (ctx.reference is the untouched original), so it may
        # share the caller's tensors; the passes rewrite a deep copy of their own
        reference = ir.copy(share_tensors=True)
        work = ir.copy()
        work.analyses = self.registry.analyses
        if ir.has_analysis("shapes"):  # it lives in the nodes' metadata, which copies carry
            work.provide("shapes", True)
        probe = probe_inputs if probe_inputs is not None else ir.example_inputs
        ref_out = _outputs(reference, probe_inputs)
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
        for index, p in enumerate(self.passes):
            ctx = PassContext(
                probe_inputs=probe,
                reference=reference.gm,
                data=data,
                console=self.console,
                registry=self.registry,
                target_format=self.target_format,
            )
            # the model before the pass, for a reproducer; before the first pass that is the
            # reference, whose tensors no pass writes (a deep copy of the model otherwise)
            before = (reference if index == 0 else work.copy()) if self.reproducer else None
            start = time.perf_counter()
            try:
                p.run(work, ctx)
                work.recompile()
            except GraphoptError:
                raise
            except Exception as exc:
                where = self._write_reproducer(ir, before, p, exc)
                raise self._crash(p, exc, where) from exc
            seconds = time.perf_counter() - start
            work.invalidate(keep=p.keeps)
            work.history.append(format_step(p))
            entry, prev_out = self._measure(work, p, ctx, probe_inputs, ref_out, prev_out, seconds)
            ledger.append(entry)
            if on_step:
                on_step(entry)
            if "all" in self.print_after or p.name in self.print_after:
                self._print_graph(work, p)
        if self.time_passes:
            self._print_times(ledger)
        return Result(work, self.pipeline, ledger, prev_out if probe_inputs is None else None)

    def _crash(self, p: Pass, exc: BaseException, bundle: tuple[str, str] | None) -> PassCrash:
        """The crash of ``p``, saying where its reproducer went and, for a plugin's pass,
        whose fault it is likely to be."""
        owner = self.registry.passes.owner(p.name)
        third_party = (
            owner is not None and not owner.builtin and self.registry.passes.get(p.name) is type(p)
        )
        blame = f" of plugin '{owner.name}'" if owner is not None and third_party else ""
        where = f"; {bundle[1]}" if bundle else ""
        if owner is not None and third_party:
            where += f"; {owner.advice()}"
        return PassCrash(p.name, exc, bundle[0] if bundle else None, where=where, blame=blame)

    def _measure(
        self,
        work: GraphIR,
        p: Pass,
        ctx: PassContext,
        probe_inputs: tuple[Any, ...] | None,
        ref_out: Any,
        prev_out: Any,
        seconds: float,
    ) -> tuple[LedgerEntry, Any]:
        """The ledger entry of ``p`` (deviation from the original model) and the outputs."""
        try:
            out = _outputs(work, probe_inputs)
        except Exception as exc:
            failure = RuntimeError(f"the rewritten model fails to run: {first_line(exc)}")
            raise self._crash(p, failure, None) from exc
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
    ) -> tuple[str, str] | None:
        """Save what reproduces a crash: the pipeline, the inputs, versions, the traceback,
        and the input model and the model before the pass (with their weights when a
        folder was given or they are within ``reproducer_limit``; as code otherwise).
        Returns the bundle's path and the phrase saying where it is and how large."""
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        asked = self.repro_dir is not None
        parent = self.repro_dir if asked else tempfile.gettempdir()
        assert parent is not None
        models = {"input_model": original.gm}
        if before is not None:
            models["before_pass"] = before.gm
        weights = sum(weights_bytes(gm) for gm in models.values())
        keep = asked or weights <= self.reproducer_limit
        try:
            os.makedirs(parent, exist_ok=True)
            root = tempfile.mkdtemp(prefix=f"graphopt-repro-{p.name}-{stamp}-", dir=parent)
            for name, gm in models.items():
                if keep:
                    torch.save(_detached(gm), os.path.join(root, f"{name}.pt"))
                else:
                    _write_text(root, f"{name}.py", gm.code)
            torch.save(original.example_inputs, os.path.join(root, "inputs.pt"))
            _write_text(root, "pipeline.txt", self.pipeline + "\n")
            _write_text(root, "versions.json", json.dumps(_versions(), indent=2))
            _write_text(root, "traceback.txt", "".join(traceback.format_exception(exc)))
            _write_text(root, "README.txt", self._readme(original, p, exc, keep, weights))
        except Exception:
            return None
        size = human_bytes(sum(os.path.getsize(os.path.join(root, f)) for f in os.listdir(root)))
        left_out = (
            ""
            if keep
            else f", without the model weights ({human_bytes(weights)} > "
            f"{human_bytes(self.reproducer_limit)}: keep them with --reproducer DIR)"
        )
        return root, f"a reproducer ({size}{left_out}) was written to {root}"

    def _readme(
        self, original: GraphIR, p: Pass, exc: BaseException, kept: bool, weights: int
    ) -> str:
        shapes = [
            ",".join(map(str, t.shape))
            for t in original.example_inputs
            if isinstance(t, torch.Tensor)
        ]
        shape_args = " ".join(f"--input-shape {s}" for s in shapes)
        text = f"Pass '{p.name}' crashed: {first_line(exc)}\n\n"
        if kept:
            return text + (
                "Reproduce the crash with the failing pass alone:\n"
                f"  graphopt optimize before_pass.pt --trust-pickle {shape_args} "
                f"--passes '{format_step(p)}' -o out.pt\n"
                "or the whole pipeline from the input model:\n"
                f"  graphopt optimize input_model.pt --trust-pickle {shape_args} "
                f"--passes '{self.pipeline}' -o out.pt\n"
            )
        source = original.source or "MODEL"
        return text + (
            f"The model weights ({human_bytes(weights)}) were left out; input_model.py and "
            "before_pass.py hold the graphs' code. Reproduce the crash, with a full "
            "reproducer in DIR:\n"
            f"  graphopt optimize {source} {shape_args} --passes '{self.pipeline}' "
            "-o out.pt --reproducer DIR\n"
        )


def _outputs(ir: GraphIR, probe_inputs: tuple[Any, ...] | None) -> Any:
    """What ``ir``'s model returns for the probe inputs: for its own example inputs (no
    ``probe_inputs``) the ``outputs`` analysis, which a pass that has just run the rewritten
    graph may have left; otherwise a run."""
    if probe_inputs is None and "outputs" in ir.analyses:
        return ir.analysis("outputs")
    return run_model(ir.gm, probe_inputs if probe_inputs is not None else ir.example_inputs)


def _write_text(folder: str, name: str, text: str) -> None:
    with open(os.path.join(folder, name), "w") as f:
        f.write(text)


def human_bytes(n: float) -> str:
    """A size for people: ``512 B``, ``12.3 kB``, ``97.8 MB``, ``1.5 GB`` (powers of 1000)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _detached(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose node metadata holds no fake tensors (which cannot be pickled)."""
    clone = copy.deepcopy(gm)
    for node in clone.graph.nodes:
        node.meta.pop("val", None)
    return clone


def _versions() -> dict[str, str]:
    import torchvision

    return {
        "graphopt": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
