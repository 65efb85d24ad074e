"""PNG charts of what compression did: channels per layer before and after, accuracy (or
agreement) against MACs across settings, and per-layer sensitivity.

They need matplotlib (``pip install 'graphopt[plot]'``); everything else in graphopt works
without it. Each function writes the file atomically and returns nothing; the data behind
the channels chart is :func:`layer_widths`, usable without matplotlib.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import GraphoptError
from .ir import GraphIR
from .views import STATUS_COLOURS, compare_graphs

__all__ = [
    "LayerWidth",
    "layer_widths",
    "plot_channels",
    "plot_sensitivity",
    "plot_tradeoff",
]


@dataclass(frozen=True)
class LayerWidth:
    """Output width (channels, features, embedding size) of one layer, before and after."""

    name: str
    kind: str
    before: int
    after: int


def _width(ir: GraphIR, row: dict[str, Any]) -> int | None:
    """The output width of a weighted layer: its declared size for conv/linear/embedding
    modules, else the channel dimension of its output."""
    if row["op"] == "call_module":
        module = ir.gm.get_submodule(str(row["target"]))
        for attr in ("out_channels", "out_features", "embedding_dim", "embed_dim"):
            value = getattr(module, attr, None)
            if isinstance(value, int):
                return value
        if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.LayerNorm):
            return None
    shape = row["shape"]
    return int(shape[1]) if shape and len(shape) >= 2 else None


def layer_widths(before: GraphIR, after: GraphIR) -> list[LayerWidth]:
    """Per weighted layer of ``after`` (in graph order), its width and the width of the layer
    it came from in ``before`` (matched as :func:`graphopt.views.compare_graphs` does)."""
    comparison = compare_graphs(before, after)
    rows_before = {r["name"]: r for r in before.rows()}
    out = []
    for row in after.rows():
        prev = comparison.before.get(row["name"])
        if prev is None or not prev["params"] or prev["op"] not in ("call_module",):
            continue
        now, then = _width(after, row), _width(before, rows_before[prev["name"]])
        if now is not None and then is not None:
            out.append(LayerWidth(row["name"], str(row["module"] or row["target"]), then, now))
    return out


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise GraphoptError(
            "plots need matplotlib; install it with pip install 'graphopt[plot]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> None:
    if not path.lower().endswith(".png"):
        raise GraphoptError(f"plots are written as PNG; name the file '*.png', not '{path}'")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise GraphoptError(f"cannot write '{path}': its directory does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".graphopt-", suffix=".png", dir=folder)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        fig.clf()
        _pyplot().close(fig)


def plot_channels(before: GraphIR, after: GraphIR, path: str, *, title: str = "") -> None:
    """Bars of each weighted layer's width before (grey) and after (orange) to ``path``."""
    widths = layer_widths(before, after)
    if not widths:
        raise GraphoptError("the model has no conv, linear or embedding layers to chart")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(widths) + 2), 4.0))
    xs = range(len(widths))
    ax.bar(xs, [w.before for w in widths], color="#c8c8c8", label="before", width=0.8)
    ax.bar(xs, [w.after for w in widths], color=STATUS_COLOURS["pruned"], label="after", width=0.5)
    ax.set_xticks(list(xs), [w.name for w in widths], rotation=90, fontsize=7)
    ax.set_ylabel("output channels / features")
    kept = sum(w.after for w in widths) / max(1, sum(w.before for w in widths))
    ax.set_title(title or f"width per layer: {kept:.0%} of the channels kept")
    ax.legend()
    ax.margins(x=0.01)
    _save(fig, path)


def plot_tradeoff(
    points: Sequence[tuple[float, float, str]],
    path: str,
    *,
    xlabel: str = "MACs",
    ylabel: str = "accuracy",
    title: str = "",
) -> None:
    """A line through ``(x, y, label)`` points — e.g. accuracy against MACs across pruning
    ratios — each point annotated with its label."""
    if not points:
        raise GraphoptError("give at least one point to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    ordered = sorted(points)
    ax.plot([p[0] for p in ordered], [p[1] for p in ordered], "o-", color="#4e79a7")
    for x, y, label in ordered:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{ylabel} against {xlabel}")
    _save(fig, path)


def plot_sensitivity(
    drops: Sequence[tuple[str, float]], path: str, *, ylabel: str = "accuracy drop", title: str = ""
) -> None:
    """Bars of how much a metric drops when each layer alone is compressed, worst first."""
    if not drops:
        raise GraphoptError("give at least one layer to plot")
    plt = _pyplot()
    ordered = sorted(drops, key=lambda d: -d[1])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * len(ordered) + 2), 4.0))
    ax.bar(range(len(ordered)), [d[1] for d in ordered], color=STATUS_COLOURS["removed"])
    ax.set_xticks(range(len(ordered)), [d[0] for d in ordered], rotation=90, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title or "sensitivity per layer")
    _save(fig, path)
