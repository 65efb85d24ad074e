"""The ``graphopt`` command line: optimize, inspect, passes, plugins (and plugin commands)."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import inspect as pyinspect
import json
import os
import sys
import threading
import typing
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from typer.core import TyperGroup

from .errors import GraphoptError, PassCrash, first_line
from .loading import ModelSpec
from .plugins import PluginWarning, Registry, get_registry
from .version import __version__

__all__ = ["app", "main", "run"]

#: width for output that is not a terminal (a file, a pipe, a test): wide, so tables stay whole
PIPE_WIDTH = 200


def _console(stderr: bool = False) -> Console:
    """A console for this call; when not writing to a terminal, wide rather than cut at 80."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else PIPE_WIDTH)


def _disabled(ctx: Any) -> list[str]:
    """Plugins disabled with -p no:NAME, read from the root command's parameters."""
    while ctx is not None and ctx.parent is not None:
        ctx = ctx.parent
    values = (ctx.params.get("plugin") or []) if ctx is not None else []
    names = []
    for value in values:
        if not value.startswith("no:"):
            raise GraphoptError(f"-p takes no:NAME to disable a plugin, not '{value}'")
        names.append(value[3:])
    return names


def _registry(ctx: typer.Context) -> Registry:
    return get_registry(_disabled(ctx))


class _Group(TyperGroup):
    """Adds the subcommands that plugins contribute beside graphopt's own."""

    def _plugin_commands(self, ctx: Any) -> dict[str, Any]:
        plugin_app = _registry(ctx).cli_app()
        if not plugin_app.registered_commands:
            return {}
        return dict(typer.main.get_group(plugin_app).commands)

    def list_commands(self, ctx: Any) -> list[str]:
        return [*super().list_commands(ctx), *self._plugin_commands(ctx)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        found = super().get_command(ctx, cmd_name) or self._plugin_commands(ctx).get(cmd_name)
        commands = _registry(ctx).commands
        if found is None and commands.faults:
            # the command may be one a failed plugin would have added: say so
            raise GraphoptError(commands.unknown(cmd_name))
        return found


app = typer.Typer(
    cls=_Group,
    help="graphopt: compress PyTorch models with a verified pipeline of graph passes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        import torch

        _console().print(f"graphopt {__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    plugin: Annotated[
        list[str] | None,
        typer.Option("-p", help="Disable a plugin: -p no:NAME (repeatable)."),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    """graphopt: compress PyTorch models with a verified pipeline of graph passes."""
    # every command works with the registry -p chose (graphopt.load gives IRs its analyses)
    ctx.with_resource(_registry(ctx).in_effect())


# -- options shared by the commands that load a model ----------------------------------------

Model = Annotated[
    str,
    typer.Argument(
        help="A .pt/.pth/.pt2 file, torchvision:NAME, timm:NAME, hf:TYPE, hf:DIR or "
        "package.module:factory (zoo options after '?', e.g. hf:bert?num_hidden_layers=2).",
        show_default=False,
    ),
]

#: the model-loading options, each declared once; :func:`_model_options` gives them to a command
_MODEL_OPTIONS: list[tuple[str, Any, Any]] = [
    (
        "weights",
        Annotated[str | None, typer.Option("--weights", help="State dict to load into MODEL.")],
        None,
    ),
    (
        "trust_pickle",
        Annotated[
            bool,
            typer.Option(
                "--trust-pickle", help="Allow loading a pickled whole module (runs its code)."
            ),
        ],
        False,
    ),
    (
        "input_shape",
        Annotated[
            list[str] | None,
            typer.Option(
                "--input-shape", help="Example input shape, e.g. 1,3,224,224 (one per input)."
            ),
        ],
        None,
    ),
    (
        "input_dtype",
        Annotated[
            list[str] | None,
            typer.Option("--input-dtype", help="Input dtype, e.g. float32 or int64."),
        ],
        None,
    ),
    (
        "leaf_module",
        Annotated[
            list[str] | None,
            typer.Option("--leaf-module", help="Module (class or qualified name) to keep opaque."),
        ],
        None,
    ),
    (
        "concrete_arg",
        Annotated[
            list[str] | None,
            typer.Option(
                "--concrete-arg", help="Fix a forward argument while tracing: NAME=VALUE."
            ),
        ],
        None,
    ),
    (
        "capture",
        Annotated[
            str,
            typer.Option(
                "--capture",
                help="How to capture MODEL: auto (torch.fx, then torch.export), fx or export.",
            ),
        ],
        "auto",
    ),
]


def _model_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` the model-loading options; it receives them as one :class:`ModelSpec`
    in its ``spec`` parameter (whose ``spec`` field is left empty for the command to fill)."""
    signature = pyinspect.signature(command)
    kept = [p for p in signature.parameters.values() if p.name != "spec"]
    added = [
        pyinspect.Parameter(
            name, pyinspect.Parameter.KEYWORD_ONLY, annotation=kind, default=default
        )
        for name, kind, default in _MODEL_OPTIONS
    ]

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        values = {name: kwargs.pop(name) for name, _, _ in _MODEL_OPTIONS}
        from .loading import parse_shape

        if values["capture"] not in ("auto", "fx", "export"):
            raise GraphoptError(f"--capture must be auto, fx or export, not '{values['capture']}'")
        kwargs["spec"] = ModelSpec(
            "",
            weights=values["weights"],
            trust_pickle=values["trust_pickle"],
            input_shapes=[parse_shape(v) for v in values["input_shape"] or []],
            input_dtypes=values["input_dtype"] or [],
            leaf_modules=values["leaf_module"] or [],
            concrete_args=_concrete(values["concrete_arg"]),
            capture=values["capture"],
        )
        command(*args, **kwargs)

    hints = typing.get_type_hints(command, include_extras=True)
    params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in kept]
    run.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*params, *added], return_annotation=None
    )
    run.__annotations__ = {p.name: p.annotation for p in run.__signature__.parameters.values()}  # type: ignore[attr-defined]
    return run


def _concrete(values: list[str] | None) -> dict[str, Any] | None:
    if not values:
        return None
    parsed: dict[str, Any] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise GraphoptError(f"--concrete-arg takes NAME=VALUE, not '{item}'")
        try:
            parsed[name] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[name] = raw
    return parsed


def _load(spec: ModelSpec, model: str) -> Any:
    return replace(spec, spec=model).load()


# -- commands --------------------------------------------------------------------------------


@app.command()
@_model_options
def optimize(
    ctx: typer.Context,
    model: Model,
    passes: Annotated[
        str, typer.Option("--passes", help="Pipeline, e.g. 'cleanup,fold' or 'prune(ratio=0.5)'.")
    ],
    output: Annotated[
        str,
        typer.Option("-o", "--output", help="Output: .pt2, .pt, .onnx, or a directory."),
    ],
    format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="Output format by name (default: from -o's suffix); 'hf' writes a "
            "transformers save_pretrained folder.",
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", help="Calibration/training data: tensor file or module:callable."),
    ] = None,
    print_after: Annotated[
        list[str] | None,
        typer.Option("--print-after", help="Print the graph after this pass (or 'all')."),
    ] = None,
    time_passes: Annotated[
        bool, typer.Option("--time-passes", help="Print time per pass.")
    ] = False,
    report_json: Annotated[
        str | None, typer.Option("--report-json", help="Also write the report as JSON here.")
    ] = None,
    reproducer: Annotated[
        str | None,
        typer.Option(
            "--reproducer",
            help="If a pass crashes, write its reproducer here, model weights included "
            "(default: the temporary directory, weights only up to 32 MB).",
        ),
    ] = None,
    *,
    spec: ModelSpec,
) -> None:
    """Run a pass pipeline on MODEL and write the verified result to -o."""
    from .loading import load_data
    from .lowering import check_output, lower
    from .manager import PassManager
    from .report import ledger_table, write_text_atomic

    registry = _registry(ctx)
    exporter = check_output(output, registry.exporters, format)
    manager = PassManager(
        passes,
        registry=registry,
        print_after=print_after or [],
        time_passes=time_passes,
        console=_console(stderr=True),
        repro_dir=_reproducer_dir(reproducer),
        target_format=exporter.name,
    )
    if report_json:
        check_output_file(report_json)
    batches = load_data(data) if data else None
    with _progress() as progress:
        task = progress.add_task("loading and tracing", total=len(manager.passes) + 2)
        ir = _load(spec, model)
        if exporter.check is not None:
            exporter.check(ir.gm)  # a model the format can never hold: before any pass
        progress.update(task, advance=1, description=f"running {manager.passes[0].name}")
        names = [p.name for p in manager.passes]
        done = [0]  # ledger entries seen after the input row (a pass may appear twice)

        def step(entry: Any) -> None:
            if entry.step == "(input)":
                return
            done[0] += 1
            index = done[0]
            nxt = f"running {names[index]}" if index < len(names) else f"writing {exporter.name}"
            progress.update(task, advance=1, description=nxt)

        result = manager.run(ir, data=batches, on_step=step)
        if int(os.environ.get("RANK", "0")) != 0:
            return  # under torchrun, the first process alone writes and reports
        check = lower(
            result.ir.gm,
            result.ir.example_inputs,
            output,
            result.metadata(),
            registry.exporters,
            format,
            expected=result.outputs,
        )
        progress.update(task, advance=1, description="done")
    _console().print(ledger_table(result.ledger, title=f"{ir.source} → {output}"))
    for entry in result.ledger[1:]:
        for note in entry.notes:
            _console().print(f"  [bold]{escape(entry.step)}[/]: {escape(note)}")
        if entry.stats:
            stats = ", ".join(f"{k}: {v:g}" for k, v in entry.stats.items())
            _console().print(f"  [bold]{escape(entry.step)}[/]: {escape(stats)}")
    sizes = check.get("also_checked_at")
    also = f" (also at {', '.join(f'{n} {v}' for n, v in sizes.items())})" if sizes else ""
    free = f"; free dims: {', '.join(check['free_dims'])}" if check.get("free_dims") else ""
    _console().print(
        f"wrote {output} ({check['format']}{free}); reloaded and checked: relative error "
        f"{check['rel_err']:.1e} against the in-memory model{also}",
        markup=False,
    )
    _console().print(f"pipeline: {result.pipeline}", markup=False, highlight=False)
    if report_json:
        report = {**result.metadata(), "output": output, "check": check}
        write_text_atomic(report_json, json.dumps(report, indent=2))


def _reproducer_dir(path: str | None) -> str | None:
    """``--reproducer DIR``: refused now if it could not be made (it is made on a crash)."""
    if path is None:
        return None
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise GraphoptError(
            f"cannot write a reproducer into '{path}': '{existing}' is not a writable "
            "directory; give another --reproducer DIR"
        )
    return path


def check_output_file(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise GraphoptError(f"cannot write '{path}': its directory is missing or not writable")


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=_console(stderr=True),
        transient=True,
        disable=not sys.stderr.isatty(),
    )


@app.command()
@_model_options
def inspect(
    ctx: typer.Context,
    model: Model,
    format: Annotated[
        str, typer.Option("--format", "-f", help="table, json, dot, svg or html.")
    ] = "table",
    output: Annotated[
        str | None, typer.Option("-o", "--output", help="Write to this file instead of stdout.")
    ] = None,
    compare: Annotated[
        str | None,
        typer.Option("--compare", help="Show MODEL as the result of OTHER: colour what changed."),
    ] = None,
    passes: Annotated[
        str | None,
        typer.Option("--passes", help="Run this pipeline first and show its result against MODEL."),
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="Data for the --passes pipeline.")
    ] = None,
    plot: Annotated[
        str | None,
        typer.Option("--plot", help="With --passes/--compare: chart of channels per layer (PNG)."),
    ] = None,
    *,
    spec: ModelSpec,
) -> None:
    """Show MODEL's graph: nodes with shapes, params and MACs; as a picture or a page."""
    from .report import write_text_atomic
    from .views import FORMATS, render

    if format not in FORMATS:
        raise GraphoptError(f"--format must be {', '.join(FORMATS)}, not '{format}'")
    if compare and passes:
        raise GraphoptError("give --compare or --passes, not both")
    if plot and not (compare or passes):
        raise GraphoptError("--plot charts a before/after pair; give --passes or --compare too")
    for path in (output, plot):
        if path:
            check_output_file(path)
    ir = _load(spec, model)
    before = None
    title = f"{model} against {compare}" if compare else model
    if compare:
        from .views import compare_graphs

        before = _load(replace(spec, weights=None), compare)
        matched = compare_graphs(before, ir).matched
        if matched < 0.5:
            _console(stderr=True).print(
                f"note: only {matched:.0%} of the nodes of {model} match a node of {compare} "
                "(nodes are matched by name, and a model of another structure or a reloaded "
                ".pt file names them differently); for a faithful comparison run the "
                "pipeline with --passes instead",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
    elif passes:
        from .loading import load_data
        from .manager import PassManager

        manager = PassManager(passes, registry=_registry(ctx), console=_console(stderr=True))
        before = ir
        ir = manager.run(ir, data=load_data(data) if data else None).ir
        title = f"{model} after {manager.pipeline}"
    if plot and before is not None:
        from .plots import plot_channels

        plot_channels(before, ir, plot)
    if format == "table":
        table = ir.summary()
        if output:
            with open(output, "w") as f:
                Console(file=f, width=160).print(table)
        else:
            _console().print(table)
        return
    text = render(ir, format, before, title=title)
    if output:
        write_text_atomic(output, text)
    else:
        sys.stdout.write(text + "\n")


@app.command()
@_model_options
def report(
    model: Model,
    other: Annotated[
        str | None,
        typer.Argument(
            help="A second model (e.g. MODEL optimised) to compare with MODEL.", show_default=False
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", help="Batches to compare the two models on (default: probe input)."),
    ] = None,
    runs: Annotated[int, typer.Option("--runs", help="Timed runs per latency figure.")] = 20,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs before timing.")] = 3,
    threads: Annotated[
        int | None, typer.Option("--threads", help="CPU threads (default: torch's default).")
    ] = None,
    onnx: Annotated[
        bool, typer.Option("--onnx/--no-onnx", help="Also time the model in onnxruntime.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    *,
    spec: ModelSpec,
) -> None:
    """Measure MODEL (params, MACs, size, CPU latency); with OTHER, compare the two."""
    from .loading import load_data
    from .profiling import agreement, load_for_report, measure, torch_threads
    from .report import print_report, report_json

    if runs < 1 or warmup < 0 or (threads is not None and threads < 1):
        raise GraphoptError("--runs and --threads must be at least 1 and --warmup at least 0")
    if data is not None and other is None:
        raise GraphoptError("--data is for comparing two models; give OTHER as well")
    batches = load_data(data) if data else None
    with _progress() as progress, torch_threads(threads):
        progress.add_task(f"measuring {model}", total=None)
        first = load_for_report(replace(spec, spec=model))
        reports = [measure(first, runs=runs, warmup=warmup, onnx=onnx)]
        agree = None
        if other is not None:
            second = load_for_report(replace(spec, spec=other, weights=None), inputs=first.inputs)
            reports.append(measure(second, runs=runs, warmup=warmup, onnx=onnx))
            agree = agreement(first, second, batches)
    if as_json:
        sys.stdout.write(json.dumps(report_json(reports, agree), indent=2) + "\n")
    else:
        print_report(_console(), reports, agree, data=data)


@app.command("passes")
def list_passes(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Show one pass in full.")] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="table or markdown.")] = "table",
) -> None:
    """List every registered pass with its options and help."""
    from rich.table import Table

    registry = _registry(ctx)
    classes = (
        [registry.pass_class(name)]
        if name
        else [registry.passes[k] for k in sorted(registry.passes)]
    )
    if format == "markdown":
        sys.stdout.write(passes_markdown(classes, registry) + "\n")
        return
    if format != "table":
        raise GraphoptError(f"--format must be table or markdown, not '{format}'")
    table = Table(title="registered passes", show_lines=True)
    table.add_column("pass")
    table.add_column("kind")
    table.add_column("plugin")
    table.add_column("what it does / options")
    for cls in classes:
        lines = [cls.summary]
        for spec in cls.option_specs():
            lines.append(
                f"  [cyan]{spec.name}[/]: {spec.type_name} = {_fmt(spec.default)} — {spec.help}"
            )
        if cls.after:
            lines.append(f"  runs after: {', '.join(cls.after)}")
        if cls.before:
            lines.append(f"  runs before: {', '.join(cls.before)}")
        table.add_row(
            cls.name,
            "exact" if cls.exact else "lossy",
            registry.pass_owner[cls.name],
            "\n".join(lines),
        )
    _console().print(table)


def _fmt(value: Any) -> str:
    from .pass_api import format_value

    return format_value(value)


def passes_markdown(classes: list[Any], registry: Registry) -> str:
    """The pass reference as Markdown (used to generate docs/passes.md)."""
    parts = []
    for cls in classes:
        kind = "exact" if cls.exact else "lossy"
        parts.append(f"## `{cls.name}` ({kind}, from `{registry.pass_owner[cls.name]}`)\n")
        parts.append(cls.summary + "\n")
        specs = cls.option_specs()
        if specs:
            parts.append("| option | type | default | help |\n|---|---|---|---|")
            for s in specs:
                parts.append(f"| `{s.name}` | {s.type_name} | `{_fmt(s.default)}` | {s.help} |")
            parts.append("")
        if cls.after or cls.before:
            order = [f"after {a}" for a in cls.after] + [f"before {b}" for b in cls.before]
            parts.append("Ordering: runs " + ", ".join(order) + ".\n")
    return "\n".join(parts)


@app.command()
def plugins(
    ctx: typer.Context,
    format: Annotated[str, typer.Option("--format", "-f", help="table or json.")] = "table",
) -> None:
    """List loaded plugins, their versions, what each contributes, and which failed."""
    from rich.table import Table
    from rich.text import Text

    if format not in ("table", "json"):
        raise GraphoptError(f"--format must be table or json, not '{format}'")
    registry = _registry(ctx)
    registry.cli_app()
    kinds = ("passes", "exporters", "analyses", "commands", "criteria", "losses", "prune_rules")
    if format == "json":
        rows = [
            {
                "plugin": info.name,
                "distribution": info.distribution,
                "version": info.version,
                "builtin": info.builtin,
                **{kind: getattr(info, kind) for kind in kinds},
                "status": info.status,
                "faults": [f.sentence() for f in info.faults],
            }
            for info in registry.plugins.values()
        ]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(title="graphopt plugins", show_lines=True)
    headers = (
        "passes", "exporters", "analyses", "commands", "prune criteria", "distill losses",
        "prune rules",
    )  # fmt: skip
    for col in ("plugin", "version", *headers, "status"):
        table.add_column(col)
    for info in registry.plugins.values():
        name = info.name + (" (built-in)" if info.builtin else "")
        if info.distribution and not info.builtin:
            name += f"\n[dim]{info.distribution}[/]"
        table.add_row(
            name,
            info.version,
            *(", ".join(getattr(info, kind)) for kind in kinds),
            Text("failed", style="red") if info.faults else "loaded",
        )
    _console().print(table)
    for fault in registry.faults:  # why each failed plugin failed, in full
        _console().print(Text(fault.sentence(), style="red"), soft_wrap=True)


# -- entry point -------------------------------------------------------------------------------


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """A plugin's failure in graphopt's voice: one line on stderr, no source location."""
    if issubclass(category, PluginWarning):
        _console(stderr=True).print(
            f"warning: {message}", highlight=False, markup=False, soft_wrap=True
        )
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: bad input ends in one sentence on stderr and status 2; a
    plugin's failure is one line naming it."""
    if not os.environ.get("GRAPHOPT_DEBUG"):
        warnings.filterwarnings("ignore")
    warnings.filterwarnings("always", category=PluginWarning)
    warnings.showwarning = _show_warning
    try:
        app(args=argv)
    except (GraphoptError, PassCrash) as exc:
        _console(stderr=True).print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except Exception as exc:
        if os.environ.get("GRAPHOPT_DEBUG"):
            raise
        _console(stderr=True).print(
            f"internal error: {type(exc).__name__}: {first_line(exc)} (this is a graphopt bug; "
            "rerun with GRAPHOPT_DEBUG=1 for the traceback and report it)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        sys.exit(1)


def run() -> None:
    """The ``graphopt`` console script (and ``python -m graphopt``): :func:`main`, then a
    quick exit with the status it gave.

    A process that has loaded torch and a large model spends seconds tearing its objects
    down one by one, which nobody waits for: here it waits for its other threads, runs the
    exit handlers (``atexit``, ``weakref.finalize``), flushes the standard streams (C's
    too) and ends. (:func:`main` itself returns, or raises ``SystemExit``, for callers in
    Python.)"""
    try:
        main()
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # as the interpreter would
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):  # what native libraries wrote with C's stdio
        ctypes.CDLL(None).fflush(None)
    os._exit(code or 0)
