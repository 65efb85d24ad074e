"""Rendering the compression ledger: a rich table for people, JSON for machines."""

from __future__ import annotations

import os
import tempfile

from rich.table import Table

from .manager import LedgerEntry

__all__ = ["human", "ledger_table", "write_text_atomic"]


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


def ledger_table(ledger: list[LedgerEntry], title: str = "compression ledger") -> Table:
    """Per pass: params and MACs (with change from the input), deviation, time."""
    table = Table(title=title)
    for col, justify in [
        ("pass", "left"),
        ("kind", "left"),
        ("params", "right"),
        ("MACs", "right"),
        ("max abs err", "right"),
        ("rel err", "right"),
        ("top-1 agree", "right"),
        ("time", "right"),
    ]:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    base = ledger[0]
    for e in ledger:
        kind = "" if e is base else ("exact" if e.exact else "lossy")
        err_style = "red" if e.exact and e.rel_err > 1e-4 else ""
        table.add_row(
            e.step,
            kind,
            human(e.params) + _change(e.params, base.params),
            human(e.macs) + _change(e.macs, base.macs),
            f"[{err_style}]{e.max_abs_err:.2e}[/]" if err_style else f"{e.max_abs_err:.2e}",
            f"{e.rel_err:.2e}",
            f"{100 * e.top1:.1f}%" if e.top1 is not None else "—",
            f"{e.seconds:.2f}s" if e is not base else "",
        )
    return table


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".graphopt-", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
