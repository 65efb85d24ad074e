"""Model reports and the compression ledger: what ``graphopt report`` measured (filled in
by :mod:`graphopt.profiling`) and how it is shown: rich tables for people, HTML for
Jupyter, JSON for machines."""

from __future__ import annotations

import html
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .manager import LedgerEntry, ledger_from_metadata
from .measuring import Deviation
from .version import __version__

__all__ = [
    "Latency",
    "ModelReport",
    "Report",
    "artifact_line",
    "human",
    "ledger_html",
    "ledger_table",
    "print_report",
    "report_html",
    "report_json",
    "report_renderable",
    "report_table",
    "write_text_atomic",
]


@dataclass
class Latency:
    """Milliseconds per call: median and quartiles over ``runs`` timed calls."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    runs: int
    warmup: int
    threads: int


@dataclass
class ModelReport:
    """What ``graphopt report`` shows for one model."""

    source: str
    params: int | None
    macs: int | None
    size_bytes: int
    size_kind: str  # "file" or "weights in memory"
    latency: Latency | None
    ort_latency: Latency | None
    metadata: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    weights_bytes: int | None = None  # parameters and buffers (ONNX: initializers)

    def _repr_html_(self) -> str:
        return report_html([self])

    def to_json(self) -> dict[str, Any]:
        """Plain data for ``--json``: the figures, notes, and the stored ledger if any."""
        data = asdict(self)
        meta = data.pop("metadata") or {}
        data["artifact"] = (
            {k: meta.get(k) for k in ("pipeline", "source", "graphopt", "torch", "ledger")}
            if meta
            else None
        )
        return data


def human(n: float) -> str:
    """12_345_678 → '12.35M'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}"


def _change(value: int, base: int) -> str:
    if base == 0 or value == base:
        return ""
    return f" ({100 * (value - base) / base:+.1f}%)"


_LEDGER_HEADER = [
    "pass", "kind", "params", "MACs", "max abs err", "rel err", "top-1 agree", "time"
]  # fmt: skip


def _ledger_cells(ledger: list[LedgerEntry]) -> list[tuple[list[str], bool]]:
    """Each ledger row's cells, and whether it is an exact pass that changed the output."""
    base = ledger[0]
    rows = []
    for e in ledger:
        rows.append(
            (
                [
                    e.step,
                    "" if e is base else ("exact" if e.exact else "lossy"),
                    human(e.params) + _change(e.params, base.params),
                    human(e.macs) + _change(e.macs, base.macs),
                    f"{e.max_abs_err:.2e}",
                    f"{e.rel_err:.2e}",
                    f"{100 * e.top1:.1f}%" if e.top1 is not None else "—",
                    f"{e.seconds:.2f}s" if e is not base else "",
                ],
                e.exact and e.rel_err > 1e-4,
            )
        )
    return rows


def ledger_table(ledger: list[LedgerEntry], title: str = "compression ledger") -> Table:
    """Per pass: params and MACs (with change from the input), deviation, time."""
    table = Table(title=escape(title))
    for i, col in enumerate(_LEDGER_HEADER):
        table.add_column(col, justify="left" if i < 2 else "right")
    for cells, off in _ledger_cells(ledger):
        row: list[str | Text] = [Text(c) for c in cells]  # a step's "[a,b]" is not markup
        if off:  # an exact pass that moved the output: show its error in red
            row[4] = Text(cells[4], style="red")
        table.add_row(*row)
    return table


def _html_table(header: list[str], rows: list[list[str]], caption: str, *, left: int = 1) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td style="text-align:{"left" if i < left else "right"}">{html.escape(c)}</td>'
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return (
        f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


def ledger_html(ledger: list[LedgerEntry], title: str = "compression ledger") -> str:
    """The ledger as an HTML table (for Jupyter)."""
    rows = [cells for cells, _ in _ledger_cells(ledger)]
    return _html_table(_LEDGER_HEADER, rows, title, left=2)


def _latency(lat: Any) -> str:
    return f"{lat.median_ms:.2f} ms [{lat.p25_ms:.2f}–{lat.p75_ms:.2f}]"


def _ratio(a: Any, b: Any) -> str:
    a, b = (getattr(v, "median_ms", v) for v in (a, b))
    return f"{b / a:.3f}×" if a and b is not None else "—"


def _report_cells(
    reports: list[ModelReport], agreement: Deviation | None
) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows and caption lines of a report: the one source of the rich table, the
    HTML table and nothing else."""
    pair = len(reports) == 2
    header = ["", *(r.source for r in reports), *(["B/A"] if pair else [])]
    rows: list[tuple[str, list[Any], Callable[[Any], str]]] = [
        ("params", [r.params for r in reports], human),
        ("MACs", [r.macs for r in reports], human),
        ("size", [r.size_bytes for r in reports], lambda v: human(v) + "B"),
        ("weights", [r.weights_bytes for r in reports], lambda v: human(v) + "B"),
        ("eager CPU latency", [r.latency for r in reports], _latency),
        ("onnxruntime latency", [r.ort_latency for r in reports], _latency),
    ]
    body = []
    for label, values, fmt in rows:
        cells = [fmt(v) if v is not None else "—" for v in values]
        body.append([label, *cells, *([_ratio(*values)] if pair else [])])
    body.insert(3, ["size of", *[r.size_kind for r in reports], *([""] if pair else [])])
    captions = []
    if agreement is not None:
        top1 = f"{100 * agreement.top1:.1f}%" if agreement.top1 is not None else "—"
        captions.append(
            f"B against A: max abs err {agreement.max_abs_err:.2e}, "
            f"rel err {agreement.rel_err:.2e}, top-1 agreement {top1}"
        )
    timed = next((t for r in reports for t in (r.latency, r.ort_latency) if t is not None), None)
    if timed is not None:
        captions.append(
            f"latency: median [quartiles] of {timed.runs} runs after {timed.warmup} warm-up, "
            f"{timed.threads} threads"
        )
    return header, body, captions


def report_table(reports: list[ModelReport], agreement: Deviation | None = None) -> Table:
    """Rows of measurements, one column per model, and B/A ratios when there are two."""
    header, body, _ = _report_cells(reports, agreement)
    table = Table(title="graphopt report")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in body:
        table.add_row(*row)
    return table


def report_renderable(reports: list[ModelReport], agreement: Deviation | None = None) -> Group:
    """The table and, below it at full width, the agreement and how latency was taken."""
    _, _, captions = _report_cells(reports, agreement)
    lines = [Text(c, style="dim") for c in captions]
    return Group(report_table(reports, agreement), *lines)


def report_html(reports: list[ModelReport], agreement: Deviation | None = None) -> str:
    """The same report as HTML tables (for Jupyter), with each artifact's ledger."""
    header, body, captions = _report_cells(reports, agreement)
    parts = [
        _html_table(header, body, "graphopt report"),
        "<p><small>" + "<br>".join(html.escape(c) for c in captions) + "</small></p>",
    ]
    for r in reports:
        line = artifact_line(r)
        ledger = ledger_from_metadata(r.metadata or {})
        if line and ledger:
            parts.append(f"<p>{html.escape(line)}</p>")
            parts.append(ledger_html(ledger, title=f"compression ledger of {r.source}"))
    return "".join(parts)


@dataclass
class Report:
    """Measurements of one or two models (and their agreement), shown as a rich table in a
    terminal and as an HTML table in Jupyter."""

    models: list[ModelReport]
    agreement: Deviation | None = None

    def __rich__(self) -> Group:
        return report_renderable(self.models, self.agreement)

    def _repr_html_(self) -> str:
        return report_html(self.models, self.agreement)

    def to_json(self) -> dict[str, Any]:
        """The ``graphopt report --json`` document."""
        return report_json(self.models, self.agreement)


def artifact_line(report: ModelReport) -> str | None:
    """Who wrote an artifact, from what, with which pipeline; None for a plain model."""
    meta = report.metadata
    if not meta:
        return None
    return (
        f"{report.source}: written by graphopt {meta.get('graphopt', '?')} with torch "
        f"{meta.get('torch', '?')} from {meta.get('source') or '?'}, "
        f"pipeline {meta.get('pipeline')!r}"
    )


def print_report(
    console: Console,
    reports: list[ModelReport],
    agreement: Deviation | None = None,
    *,
    data: str | None = None,
) -> None:
    """The ``graphopt report`` output: the table, notes, and each artifact's ledger."""
    console.print(report_renderable(reports, agreement))
    if agreement is not None:
        console.print(f"  agreement measured on {data or 'the probe input of A'}", highlight=False)
    for r in reports:
        for note in r.notes:
            console.print(f"  {r.source}: {note}", highlight=False, markup=False)
        line = artifact_line(r)
        if line:
            console.print(line, highlight=False, markup=False)
            ledger = ledger_from_metadata(r.metadata or {})
            if ledger:
                console.print(ledger_table(ledger, title=f"compression ledger of {r.source}"))


def report_json(reports: list[ModelReport], agreement: Deviation | None = None) -> dict[str, Any]:
    """The ``graphopt report --json`` document."""
    import torch

    data: dict[str, Any] = {
        "graphopt": __version__,
        "torch": torch.__version__,
        "models": [r.to_json() for r in reports],
    }
    if agreement is not None:
        data["agreement"] = asdict(agreement)
    if len(reports) == 2:
        a, b = reports
        data["ratios"] = {
            "params": _ratio(a.params, b.params),
            "macs": _ratio(a.macs, b.macs),
            "size": _ratio(a.size_bytes, b.size_bytes),
            "weights": _ratio(a.weights_bytes, b.weights_bytes),
            "latency": _ratio(a.latency, b.latency),
            "ort_latency": _ratio(a.ort_latency, b.ort_latency),
        }
    return data


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".graphopt-", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
