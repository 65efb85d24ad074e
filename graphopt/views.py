"""Pictures of a graph: a layered layout computed here, drawn as SVG, DOT, or a
self-contained HTML page with pan, zoom, search and per-node details.

Given the graph before a pipeline as well, each node of the graph after it is classified
against the node it came from (the node of the same name, else its provenance,
:data:`graphopt.ORIGIN`): *pruned* (same operation, fewer parameters or channels),
*quantized* (an integer or fake-quantized operation), *replaced* (another operation),
*changed* (same operation, other parameters or shape), *new* (no origin in the graph before)
or *unchanged*; nodes of the graph before that nothing stands for any more are listed as
*removed*.

>>> import torch, graphopt
>>> from graphopt.views import compare_graphs, render_svg
>>> ir = graphopt.trace(torch.nn.Sequential(torch.nn.Linear(4, 2)), (torch.randn(1, 4),))
>>> render_svg(ir).startswith("<svg")
True
>>> compare_graphs(ir, ir).counts()
{'unchanged': 3}
"""

from __future__ import annotations

import html
import itertools
import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .ir import GraphIR

__all__ = [
    "FORMATS",
    "STATUS_COLOURS",
    "Comparison",
    "GraphView",
    "Layout",
    "compare_graphs",
    "layered_layout",
    "render",
    "render_dot",
    "render_html",
    "render_json",
    "render_svg",
]

#: fill colour per node status (the legend of every view)
STATUS_COLOURS = {
    "unchanged": "#f4f4f4",
    "pruned": "#f28e2b",
    "quantized": "#b07aa1",
    "replaced": "#4e79a7",
    "changed": "#edc948",
    "new": "#59a14f",
    "removed": "#e15759",
}

NODE_W, NODE_H, GAP_X, GAP_Y, MARGIN = 190, 46, 24, 40, 30


@dataclass
class Comparison:
    """Per-node status of the graph after a pipeline against the graph before it."""

    status: dict[str, str]
    before: dict[str, dict[str, Any]]  # node after → row of the node it came from
    removed: list[str] = field(default_factory=list)  # "name (kind)"
    totals: dict[str, tuple[int, int]] = field(default_factory=dict)  # params/macs before, after

    @property
    def matched(self) -> float:
        """Share of the nodes after that were matched with a node before."""
        return len(self.before) / len(self.status) if self.status else 1.0

    def counts(self) -> dict[str, int]:
        """How many nodes have each status (removed ones included)."""
        counts = Counter(self.status.values())
        if self.removed:
            counts["removed"] = len(self.removed)
        return dict(counts)


def _kind(row: dict[str, Any]) -> str:
    return str(row["module"] or row["target"])


_QUANT_WORDS = ("quantized", "quantize", "fake_quant", "fakequant", "int8", "qint")


def _is_quantized(ir: GraphIR, row: dict[str, Any]) -> bool:
    """An integer or fake-quantized operation: a module from a quantized namespace or with
    a fake-quant class name, a quantize/dequantize call, or an int8 result."""
    path = ""
    if row["op"] == "call_module":  # the module, its parametrizations and children
        module = ir.gm.get_submodule(str(row["target"]))
        path = " ".join(f"{type(m).__module__}.{type(m).__name__}" for m in module.modules())
    text = f"{path} {row['module']} {row['target']} {row['dtype']}".lower()
    return any(w in text for w in _QUANT_WORDS)


def compare_graphs(before: GraphIR, after: GraphIR) -> Comparison:
    """Classify every node of ``after`` against the node of ``before`` it came from."""
    old = {r["name"]: r for r in before.rows()}
    status: dict[str, str] = {}
    origin_rows: dict[str, dict[str, Any]] = {}
    used = set()
    for row in after.rows():
        origin = _origin(row, old)
        quantized = _is_quantized(after, row)
        if origin is None:
            status[row["name"]] = "quantized" if quantized else "new"
            continue
        used.add(origin)
        prev = old[origin]
        origin_rows[row["name"]] = prev
        if quantized and not _is_quantized(before, prev):
            status[row["name"]] = "quantized"
        elif _kind(prev) != _kind(row) or prev["op"] != row["op"]:
            status[row["name"]] = "replaced"
        elif row["params"] < prev["params"] or _narrower(row["shape"], prev["shape"]):
            status[row["name"]] = "pruned"
        elif row["params"] != prev["params"] or row["shape"] != prev["shape"]:
            status[row["name"]] = "changed"
        else:
            status[row["name"]] = "unchanged"
    removed = [
        f"{name} ({_kind(r).split('.')[-1]})"
        for name, r in old.items()
        if name not in used and r["op"] != "output"
    ]
    totals = {
        "params": (before.total_params(), after.total_params()),
        "macs": (before.total_macs(), after.total_macs()),
    }
    return Comparison(status, origin_rows, removed, totals)


def _origin(row: dict[str, Any], old: dict[str, dict[str, Any]]) -> str | None:
    """The node of the graph before that ``row`` stands for.

    A node that kept its name is itself, even if a pass swapped its operation (fx names are
    unique, and a conv that absorbed a BatchNorm keeps its name while its provenance names
    the BatchNorm); a renamed node is the one its provenance names; a node with neither
    (new, or from an artifact reloaded without provenance) stands for nothing.
    """
    name = row["name"]
    if name in old:
        return name
    return str(row["origin"]) if row["origin"] in old else None


def _narrower(shape: list[int] | None, prev: list[int] | None) -> bool:
    if not shape or not prev or len(shape) != len(prev):
        return False
    return all(a <= b for a, b in zip(shape, prev, strict=True)) and shape != prev


# -- layout -------------------------------------------------------------------------------------


@dataclass
class Layout:
    """Node centres in pixels, each edge's route (points it passes through, from the bottom
    of its source to the top of its target), and the size of the drawing."""

    pos: dict[str, tuple[float, float]]
    routes: dict[tuple[str, str], list[tuple[float, float]]]
    width: float
    height: float


def _ranks(names: list[str], preds: dict[str, list[str]], succs: dict[str, list[str]]) -> dict:
    """Longest path from the inputs; nodes without inputs (constants, parameters) sit just
    above their first user rather than at the top."""
    rank: dict[str, int] = {}
    for n in names:  # names are in topological (fx) order
        rank[n] = max((rank[p] + 1 for p in preds[n]), default=0)
    for n in reversed(names):
        if not preds[n] and succs[n]:
            rank[n] = max(rank[n], min(rank[s] for s in succs[n]) - 1)
    return rank


def _order_layers(
    layers: dict[int, list[str]],
    preds: dict[str, list[str]],
    succs: dict[str, list[str]],
    sweeps: int,
) -> None:
    """Reorder each layer by the barycentre of its neighbours above, then below (in place)."""
    order = {n: i for layer in layers.values() for i, n in enumerate(layer)}
    keys = sorted(layers)
    for sweep in range(sweeps):
        down = sweep % 2 == 0
        near = preds if down else succs
        for r in keys if down else reversed(keys):
            layer = layers[r]
            layer.sort(
                key=lambda n: statistics.fmean(order[m] for m in near[n]) if near[n] else order[n]
            )
            for i, n in enumerate(layer):
                order[n] = i


def _place_layer(layer: list[str], want: list[float], width: dict[str, float]) -> list[float]:
    """x centres as near ``want`` as non-overlapping boxes allow: the mean of a left-to-right
    and a right-to-left sweep, each pushing boxes apart only as far as needed."""
    gaps = [(width[a] + width[b]) / 2 + GAP_X for a, b in itertools.pairwise(layer)]
    left = [want[0]]
    for w, gap in zip(want[1:], gaps, strict=True):
        left.append(max(w, left[-1] + gap))
    right = [want[-1]]
    for w, gap in zip(reversed(want[:-1]), reversed(gaps), strict=True):
        right.append(min(w, right[-1] - gap))
    right.reverse()
    return [(a + b) / 2 for a, b in zip(left, right, strict=True)]


def layered_layout(names: list[str], edges: list[tuple[str, str]], *, sweeps: int = 4) -> Layout:
    """Top-to-bottom layered layout of a DAG given in topological order.

    Layers are longest-path ranks. An edge spanning several layers gets a thin invisible
    node in each layer it crosses, so it is routed around the boxes between its ends
    (residual connections run beside the block they skip). Within a layer, nodes are
    ordered by the barycentre of their neighbours above, then below, for ``sweeps`` rounds,
    and placed as near their parents' mean position as spacing allows: chains are straight,
    branches side by side.
    """
    preds: dict[str, list[str]] = {n: [] for n in names}
    succs: dict[str, list[str]] = {n: [] for n in names}
    real = [(a, b) for a, b in edges if a in preds and b in preds]
    for a, b in real:
        preds[b].append(a)
        succs[a].append(b)
    rank = _ranks(names, preds, succs)
    width = {n: float(NODE_W) for n in names}
    chains: dict[tuple[str, str], list[str]] = {}
    for a, b in real:
        if rank[b] - rank[a] <= 1 or (a, b) in chains:
            continue
        chain = [f"\0{a}->{b}#{r}" for r in range(rank[a] + 1, rank[b])]
        chains[(a, b)] = chain
        succs[a].remove(b)
        preds[b].remove(a)
        for r, (u, v) in enumerate(itertools.pairwise([a, *chain, b])):
            if v != b:
                rank[v], width[v] = rank[a] + 1 + r, 12.0
                preds[v], succs[v] = [], []
            succs[u].append(v)
            preds[v].append(u)
    layers: dict[int, list[str]] = {}
    for n in rank:
        layers.setdefault(rank[n], []).append(n)
    _order_layers(layers, preds, succs, sweeps)
    x: dict[str, float] = {}
    for r in sorted(layers):
        layer = layers[r]
        want, spare = [], 0.0
        for n in layer:
            placed = [x[p] for p in preds[n] if p in x]
            if placed:
                spare = statistics.fmean(placed)
            want.append(spare)
        for n, px in zip(layer, _place_layer(layer, want, width), strict=True):
            x[n] = px
    left = min((x[n] - width[n] / 2 for n in x), default=0.0)

    def centre(n: str) -> tuple[float, float]:
        return x[n] - left + MARGIN, MARGIN + NODE_H / 2 + rank[n] * (NODE_H + GAP_Y)

    pos = {n: centre(n) for n in names}
    routes: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for a, b in real:
        (xa, ya), (xb, yb) = pos[a], pos[b]
        points = [(xa, ya + NODE_H / 2)]
        for v in chains.get((a, b), []):
            xv, yv = centre(v)
            points += [(xv, yv - NODE_H / 2), (xv, yv + NODE_H / 2)]
        routes[(a, b)] = [*points, (xb, yb - NODE_H / 2)]
    right = max((x[n] - left + width[n] / 2 for n in x), default=0.0)
    height = max((p[1] for p in pos.values()), default=0.0) + NODE_H / 2 + MARGIN
    return Layout(pos, routes, right + 2 * MARGIN, height)


# -- drawing ------------------------------------------------------------------------------------


def _shape_text(shape: list[int] | None) -> str:
    return "×".join(map(str, shape)) if shape else ""


def _label(row: dict[str, Any], room: int = 30) -> tuple[str, str]:
    """Two lines for a box: ``name: kind`` (a long name loses its start, where nested
    module paths repeat, not its distinctive end) and the output shape."""
    kind = _kind(row).split(".")[-1][:14]
    name = row["name"]
    if len(name) + len(kind) + 2 > room:
        name = "…" + name[-(room - len(kind) - 3) :]
    return f"{name}: {kind}", _shape_text(row["shape"])[:room]


def _curve(points: list[tuple[float, float]]) -> str:
    """SVG path through ``points``: vertical runs joined by S-shaped cubic curves."""
    (x0, y0), rest = points[0], points[1:]
    d = [f"M{x0:.1f},{y0:.1f}"]
    for x1, y1 in rest:
        if x1 == x0:
            d.append(f"L{x1:.1f},{y1:.1f}")
        else:
            mid = (y0 + y1) / 2
            d.append(f"C{x0:.1f},{mid:.1f} {x1:.1f},{mid:.1f} {x1:.1f},{y1:.1f}")
        x0, y0 = x1, y1
    return " ".join(d)


def _svg_body(rows: list[dict[str, Any]], layout: Layout, status: dict[str, str]) -> str:
    parts = ['<g class="edges">']
    for points in layout.routes.values():
        parts.append(f'<path d="{_curve(points)}" marker-end="url(#arrow)"/>')
    parts.append('</g><g class="nodes">')
    for r in rows:
        x, y = layout.pos[r["name"]]
        state = status.get(r["name"], "unchanged")
        title, sub = _label(r)
        tip = f"{r['name']} ({_kind(r)}) {_shape_text(r['shape'])}"
        parts.append(
            f'<g class="node {state}" data-name="{html.escape(r["name"])}" '
            f'transform="translate({x - NODE_W / 2:.1f},{y - NODE_H / 2:.1f})">'
            f"<title>{html.escape(tip)}</title>"
            f'<rect width="{NODE_W}" height="{NODE_H}" rx="6" '
            f'fill="{STATUS_COLOURS[state]}"/>'
            f'<text x="8" y="19" class="t">{html.escape(title)}</text>'
            f'<text x="8" y="36" class="s">{html.escape(sub)}</text></g>'
        )
    parts.append("</g>")
    return "".join(parts)


_SVG_STYLE = (
    ".edges path{fill:none;stroke:#8a8a8a;stroke-width:1.3}"
    ".node rect{stroke:#555;stroke-width:1}"
    ".node text{font:12px sans-serif;fill:#111}.node .s{fill:#444;font-size:11px}"
)


def _svg(ir: GraphIR, status: dict[str, str], *, interactive: bool) -> tuple[str, Layout]:
    rows = ir.rows()
    edges = [(src, r["name"]) for r in rows for src in r["inputs"]]
    layout = layered_layout([r["name"] for r in rows], edges)
    size = (
        'width="100%" height="100%"'
        if interactive
        else f'width="{layout.width:.0f}" height="{layout.height:.0f}"'
    )
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" {size} '
        f'viewBox="0 0 {layout.width:.0f} {layout.height:.0f}" id="graph">'
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#8a8a8a"/>'
        f"</marker></defs><style>{_SVG_STYLE}</style>"
    )
    body = _svg_body(rows, layout, status)
    if interactive:
        body = f'<g id="viewport">{body}</g>'
    return head + body + "</svg>", layout


def render_svg(ir: GraphIR, before: GraphIR | None = None) -> str:
    """A static SVG picture of ``ir`` (coloured by status when ``before`` is given)."""
    status = compare_graphs(before, ir).status if before is not None else {}
    return _svg(ir, status, interactive=False)[0]


def render_dot(ir: GraphIR, before: GraphIR | None = None) -> str:
    """Graphviz DOT source of ``ir`` (render with ``dot -Tsvg``); coloured like the others."""
    from networkx.drawing.nx_pydot import to_pydot

    status = compare_graphs(before, ir).status if before is not None else {}
    g = ir.to_networkx()
    for name, attrs in g.nodes(data=True):
        shape = _shape_text(attrs.get("shape"))
        label = f"{name}\\n{attrs.get('module') or attrs.get('target')}\\n{shape}"
        attrs.clear()
        attrs["label"] = f'"{label}"'
        attrs["shape"] = "box"
        if name in status:
            attrs["style"] = "filled"
            attrs["fillcolor"] = f'"{STATUS_COLOURS[status[name]]}"'
    return to_pydot(g).to_string()


def render_json(ir: GraphIR, before: GraphIR | None = None) -> str:
    """Nodes with shapes, params, MACs and provenance as JSON; with ``before``, each node's
    status and the removed nodes too."""
    rows = ir.rows()
    data: dict[str, Any] = {
        "source": ir.source,
        "total_params": ir.total_params(),
        "total_macs": ir.total_macs(),
        "nodes": rows,
    }
    if before is not None:
        comparison = compare_graphs(before, ir)
        for r in rows:
            r["status"] = comparison.status[r["name"]]
        data["removed"] = comparison.removed
        data["before"] = {"total_params": before.total_params(), "total_macs": before.total_macs()}
    return json.dumps(data, indent=2)


#: what ``graphopt inspect --format`` takes
FORMATS = ("table", "json", "dot", "svg", "html")


def render(
    ir: GraphIR, format: str, before: GraphIR | None = None, *, title: str | None = None
) -> str:
    """``ir`` in one of the text formats of :data:`FORMATS` (all but ``table``); ``title``
    heads the HTML page."""
    if format == "html":
        return render_html(ir, before, title=title)
    renderers = {"json": render_json, "dot": render_dot, "svg": render_svg}
    return renderers[format](ir, before)


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def render_html(ir: GraphIR, before: GraphIR | None = None, *, title: str | None = None) -> str:
    """A self-contained interactive page: pan (drag), zoom (wheel or buttons), search, and
    the details of a clicked node; with ``before``, coloured by status with a legend and
    the removed nodes listed. Nothing is fetched from the network."""
    comparison = compare_graphs(before, ir) if before is not None else None
    status = comparison.status if comparison else {}
    svg, _ = _svg(ir, status, interactive=True)
    nodes = {}
    for r in ir.rows():
        info = {k: r[k] for k in ("op", "target", "module", "shape", "dtype", "params", "macs")}
        info["origin"], info["inputs"] = r["origin"], r["inputs"]
        if comparison is not None:
            info["status"] = status[r["name"]]
            prev = comparison.before.get(r["name"])
            if prev is not None:
                info["before"] = {k: prev[k] for k in ("name", "module", "shape", "params", "macs")}
        nodes[r["name"]] = info
    name = title or ir.source or type(ir.gm).__name__
    summary = (
        f"{len(nodes)} nodes · {_fmt_int(ir.total_params())} params · "
        f"{_fmt_int(ir.total_macs())} MACs"
    )
    legend = ""
    if comparison is not None:
        (p0, p1), (m0, m1) = comparison.totals["params"], comparison.totals["macs"]
        summary += (
            f" — before: {_fmt_int(p0)} params, {_fmt_int(m0)} MACs (now "
            f"{p1 / p0 if p0 else 1:.1%} of the params, {m1 / m0 if m0 else 1:.1%} of the MACs)"
        )
        counts = comparison.counts()
        legend = "".join(
            f'<span class="key"><i style="background:{colour}"></i>{state} '
            f"{counts.get(state, 0)}</span>"
            for state, colour in STATUS_COLOURS.items()
        )
        if comparison.removed:
            legend += (
                f'<details id="removed"><summary>{len(comparison.removed)} removed nodes'
                f"</summary>{html.escape(', '.join(comparison.removed))}</details>"
            )
    data = json.dumps(nodes).replace("</", "<\\/")
    return _PAGE.format(
        title=html.escape(name),
        summary=html.escape(summary),
        legend=legend,
        svg=svg,
        data=data,
        script=_SCRIPT,
    )


@dataclass
class GraphView:
    """The interactive page of :func:`render_html` for Jupyter: displays inline (in an
    iframe, so its script and styles stay apart from the notebook's) and saves to a file."""

    ir: GraphIR
    before: GraphIR | None = None
    height: int = 600

    def html(self) -> str:
        """The standalone page."""
        return render_html(self.ir, self.before)

    def save(self, path: str) -> None:
        """Write the page to ``path`` (atomically)."""
        from .report import write_text_atomic

        write_text_atomic(path, self.html())

    def _repr_html_(self) -> str:
        return (
            f'<iframe srcdoc="{html.escape(self.html(), quote=True)}" width="100%" '
            f'height="{self.height}" style="border:1px solid #ccc"></iframe>'
        )


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title} — graphopt</title>
<style>
html,body{{margin:0;height:100%;font:13px sans-serif;color:#111}}
#bar{{position:fixed;top:0;left:0;right:340px;background:#fff;border-bottom:1px solid #ccc;
padding:6px 10px;z-index:2}}
#bar h1{{font-size:15px;margin:0 12px 0 0;display:inline}}
#bar button{{margin-left:4px}} #find{{margin-left:10px;width:160px}}
.key{{margin-right:10px;white-space:nowrap}}
.key i{{display:inline-block;width:11px;height:11px;border:1px solid #555;margin-right:3px}}
#removed{{color:#a33;margin-top:3px}}
#canvas{{position:fixed;top:0;left:0;right:340px;bottom:0;cursor:grab;background:#fff}}
#details{{position:fixed;top:0;right:0;width:330px;bottom:0;overflow:auto;
border-left:1px solid #ccc;background:#fafafa;padding:8px;box-sizing:border-box}}
#details table{{border-collapse:collapse;width:100%}}
#details td{{border-bottom:1px solid #e3e3e3;padding:3px;vertical-align:top;word-break:break-all}}
.node{{cursor:pointer}} .node.sel rect{{stroke:#d00;stroke-width:3}}
.node.hit rect{{stroke:#06c;stroke-width:3}}
</style></head><body>
<div id="canvas">{svg}</div>
<div id="bar"><h1>{title}</h1><span id="summary">{summary}</span>
<button id="zin" title="zoom in">+</button><button id="zout" title="zoom out">−</button>
<button id="fit" title="fit to window">fit</button>
<input id="find" placeholder="find node…"><div id="legend">{legend}</div></div>
<div id="details"><b>Click a node</b> for its shape, parameters and MACs.
Drag to pan, wheel to zoom.</div>
<script id="nodes" type="application/json">{data}</script>
<script>{script}</script>
</body></html>
"""

_SCRIPT = r"""
(function () {
  const nodes = JSON.parse(document.getElementById("nodes").textContent);
  const svg = document.getElementById("graph");
  const view = document.getElementById("viewport");
  const canvas = document.getElementById("canvas");
  const W = svg.viewBox.baseVal.width, H = svg.viewBox.baseVal.height;
  let scale = 1, tx = 0, ty = 0;
  function apply() {
    view.setAttribute("transform", `translate(${tx},${ty}) scale(${scale})`);
  }
  function fit() {
    // The whole graph if it stays legible; else fit the width and start at the top.
    const r = canvas.getBoundingClientRect();
    const top = document.getElementById("bar").getBoundingClientRect().height;
    svg.setAttribute("viewBox", `0 0 ${r.width} ${r.height}`);
    const whole = Math.min(r.width / W, (r.height - top - 8) / H);
    scale = whole >= 0.5 ? Math.min(1.5, whole) : Math.min(1, r.width / W);
    tx = Math.max(0, (r.width - W * scale) / 2);
    ty = top + 8;
    apply();
  }
  function zoom(f, cx, cy) {
    tx = cx - (cx - tx) * f; ty = cy - (cy - ty) * f; scale *= f; apply();
  }
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const r = canvas.getBoundingClientRect();
    zoom(e.deltaY < 0 ? 1.15 : 1 / 1.15, e.clientX - r.left, e.clientY - r.top);
  }, {passive: false});
  let drag = null;
  canvas.addEventListener("mousedown", (e) => { drag = [e.clientX - tx, e.clientY - ty]; });
  window.addEventListener("mouseup", () => { drag = null; });
  window.addEventListener("mousemove", (e) => {
    if (drag) { tx = e.clientX - drag[0]; ty = e.clientY - drag[1]; apply(); }
  });
  const mid = () => [canvas.clientWidth / 2, canvas.clientHeight / 2];
  document.getElementById("zin").onclick = () => zoom(1.25, ...mid());
  document.getElementById("zout").onclick = () => zoom(0.8, ...mid());
  document.getElementById("fit").onclick = fit;
  const fmt = (v) => v === null || v === undefined ? "" :
    Array.isArray(v) ? v.join("×") : typeof v === "number" ? v.toLocaleString("en") : String(v);
  function row(k, v) {
    const tr = document.createElement("tr");
    [k, fmt(v)].forEach((t) => {
      const td = document.createElement("td"); td.textContent = t; tr.appendChild(td);
    });
    return tr;
  }
  function select(name, centre) {
    const info = nodes[name];
    if (!info) return false;
    document.querySelectorAll(".node.sel").forEach((n) => n.classList.remove("sel"));
    const el = view.querySelector(`.node[data-name="${CSS.escape(name)}"]`);
    el.classList.add("sel");
    const panel = document.getElementById("details");
    panel.textContent = "";
    const h = document.createElement("h3"); h.textContent = name; panel.appendChild(h);
    const t = document.createElement("table");
    ["status", "op", "module", "target", "shape", "dtype", "params", "macs", "origin"]
      .forEach((k) => { if (info[k] !== undefined) t.appendChild(row(k, info[k])); });
    t.appendChild(row("inputs", info.inputs.join(", ")));
    if (info.before) {
      ["module", "shape", "params", "macs"].forEach((k) =>
        t.appendChild(row(k + " before", info.before[k])));
    }
    panel.appendChild(t);
    if (centre) {
      const m = el.transform.baseVal.consolidate().matrix;
      tx = canvas.clientWidth / 2 - (m.e + 95) * scale;
      ty = canvas.clientHeight / 2 - (m.f + 23) * scale;
      apply();
    }
    return true;
  }
  view.addEventListener("click", (e) => {
    const g = e.target.closest(".node");
    if (g) select(g.dataset.name, false);
  });
  document.getElementById("find").addEventListener("input", (e) => {
    const q = e.target.value.toLowerCase();
    let first = null;
    view.querySelectorAll(".node").forEach((g) => {
      const hit = q && g.dataset.name.toLowerCase().includes(q);
      g.classList.toggle("hit", !!hit);
      if (hit && !first) first = g.dataset.name;
    });
    if (first) select(first, true);
  });
  fit();
  const want = new URLSearchParams(location.hash.slice(1)).get("node");
  if (want) select(want, true);
  document.body.dataset.ready = "1";
})();
"""
