"""The ``graphopt`` command line: optimize, inspect, passes, plugins (and plugin commands)."""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from typer.core import TyperGroup

from . import __version__
from .errors import GraphoptError, PassCrash, first_line
from .plugins import Registry, get_registry

__all__ = ["app", "main"]

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
        return super().get_command(ctx, cmd_name) or self._plugin_commands(ctx).get(cmd_name)


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
    plugin: Annotated[
        list[str] | None,
        typer.Option("-p", help="Disable a plugin: -p no:NAME (repeatable)."),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    """graphopt: compress PyTorch models with a verified pipeline of graph passes."""


# -- options shared by the commands that load a model ----------------------------------------

Model = Annotated[
    str,
    typer.Argument(
        help="A .pt/.pth/.pt2 file, torchvision:NAME, or package.module:factory.",
        show_default=False,
    ),
]
Weights = Annotated[str | None, typer.Option("--weights", help="State dict to load into MODEL.")]
Trust = Annotated[
    bool,
    typer.Option("--trust-pickle", help="Allow loading a pickled whole module (runs its code)."),
]
Shapes = Annotated[
    list[str] | None,
    typer.Option("--input-shape", help="Example input shape, e.g. 1,3,224,224 (one per input)."),
]
Dtypes = Annotated[
    list[str] | None, typer.Option("--input-dtype", help="Input dtype, e.g. float32 or int64.")
]
Leaves = Annotated[
    list[str] | None,
    typer.Option("--leaf-module", help="Module (class or qualified name) to keep opaque."),
]
Concrete = Annotated[
    list[str] | None,
    typer.Option("--concrete-arg", help="Fix a forward argument while tracing: NAME=VALUE."),
]


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


def _load(
    model: str,
    weights: str | None,
    trust: bool,
    shapes: list[str] | None,
    dtypes: list[str] | None,
    leaves: list[str] | None,
    concrete: list[str] | None,
) -> Any:
    from . import load
    from .loading import parse_shape

    return load(
        model,
        input_shapes=[parse_shape(s) for s in shapes or []],
        input_dtypes=dtypes or [],
        weights=weights,
        trust_pickle=trust,
        leaf_modules=leaves or [],
        concrete_args=_concrete(concrete),
    )


# -- commands --------------------------------------------------------------------------------


@app.command()
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
    weights: Weights = None,
    trust_pickle: Trust = False,
    input_shape: Shapes = None,
    input_dtype: Dtypes = None,
    leaf_module: Leaves = None,
    concrete_arg: Concrete = None,
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
) -> None:
    """Run a pass pipeline on MODEL and write the verified result to -o."""
    from .loading import load_data
    from .lowering import check_output, lower
    from .manager import PassManager
    from .report import ledger_table, write_text_atomic

    registry = _registry(ctx)
    exporter = check_output(output, registry.exporters)
    manager = PassManager(
        passes,
        registry=registry,
        print_after=print_after or [],
        time_passes=time_passes,
        console=_console(stderr=True),
        target_format=exporter.name,
    )
    if report_json:
        check_output_file(report_json)
    batches = load_data(data) if data else None
    with _progress() as progress:
        task = progress.add_task("loading and tracing", total=len(manager.passes) + 2)
        ir = _load(
            model, weights, trust_pickle, input_shape, input_dtype, leaf_module, concrete_arg
        )
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
            result.ir.gm, result.ir.example_inputs, output, result.metadata(), registry.exporters
        )
        progress.update(task, advance=1, description="done")
    _console().print(ledger_table(result.ledger, title=f"{ir.source} → {output}"))
    for entry in result.ledger[1:]:
        for note in entry.notes:
            _console().print(f"  [bold]{entry.step}[/]: {note}")
        if entry.stats:
            stats = ", ".join(f"{k}: {v:g}" for k, v in entry.stats.items())
            _console().print(f"  [bold]{entry.step}[/]: {stats}")
    _console().print(
        f"wrote {output} ({check['format']}); reloaded and checked: relative error "
        f"{check['rel_err']:.1e} against the in-memory model"
    )
    _console().print(f"pipeline: {result.pipeline}")
    if report_json:
        report = {**result.metadata(), "output": output, "check": check}
        write_text_atomic(report_json, json.dumps(report, indent=2))


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
    weights: Weights = None,
    trust_pickle: Trust = False,
    input_shape: Shapes = None,
    input_dtype: Dtypes = None,
    leaf_module: Leaves = None,
    concrete_arg: Concrete = None,
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
    load_args = (trust_pickle, input_shape, input_dtype, leaf_module, concrete_arg)
    ir = _load(model, weights, *load_args)
    before = None
    title = f"{model} against {compare}" if compare else model
    if compare:
        from .views import compare_graphs

        before = _load(compare, None, *load_args)
        matched = compare_graphs(before, ir).matched
        if matched < 0.5:
            _console(stderr=True).print(
                f"note: only {matched:.0%} of the nodes of {model} match a node of {compare} "
                "(reloaded artifacts such as .pt2 lose node names and provenance); for a "
                "faithful comparison run the pipeline with --passes instead",
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
def report(
    model: Model,
    other: Annotated[
        str | None,
        typer.Argument(
            help="A second model (e.g. MODEL optimised) to compare with MODEL.", show_default=False
        ),
    ] = None,
    weights: Weights = None,
    trust_pickle: Trust = False,
    input_shape: Shapes = None,
    input_dtype: Dtypes = None,
    leaf_module: Leaves = None,
    concrete_arg: Concrete = None,
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
) -> None:
    """Measure MODEL (params, MACs, size, CPU latency); with OTHER, compare the two."""
    from .loading import load_data, make_inputs, parse_shape
    from .profiling import agreement, load_for_report, measure, torch_threads
    from .report import print_report, report_json

    if runs < 1 or warmup < 0 or (threads is not None and threads < 1):
        raise GraphoptError("--runs and --threads must be at least 1 and --warmup at least 0")
    if data is not None and other is None:
        raise GraphoptError("--data is for comparing two models; give OTHER as well")
    shapes = [parse_shape(s) for s in input_shape or []]
    inputs = make_inputs(shapes, input_dtype or []) if shapes else None
    args: dict[str, Any] = {
        "trust_pickle": trust_pickle,
        "leaf_modules": leaf_module or [],
        "concrete_args": _concrete(concrete_arg),
    }
    batches = load_data(data) if data else None
    with _progress() as progress, torch_threads(threads):
        progress.add_task(f"measuring {model}", total=None)
        first = load_for_report(model, inputs=inputs, weights=weights, **args)
        reports = [measure(first, runs=runs, warmup=warmup, onnx=onnx)]
        agree = None
        if other is not None:
            second = load_for_report(other, inputs=first.inputs, **args)
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
def plugins(ctx: typer.Context) -> None:
    """List loaded plugins, their versions, and what each contributes."""
    from rich.table import Table

    registry = _registry(ctx)
    registry.cli_app()
    table = Table(title="graphopt plugins")
    for col in ("plugin", "version", "passes", "exporters", "analyses", "commands", "status"):
        table.add_column(col)
    for info in registry.plugins.values():
        table.add_row(
            info.name + (" (built-in)" if info.builtin else ""),
            info.version,
            ", ".join(info.passes),
            ", ".join(info.exporters),
            ", ".join(info.analyses),
            ", ".join(info.commands),
            f"[red]failed: {info.error}[/]" if info.error else "loaded",
        )
    _console().print(table)


# -- entry point -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: bad input ends in one sentence on stderr and status 2."""
    if not os.environ.get("GRAPHOPT_DEBUG"):
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", message="graphopt plugin")
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
