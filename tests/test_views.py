"""Graph views: the layered layout's geometry, before/after classification on real pipelines
(prune, fold, torch's dynamic quantization), the SVG/DOT/JSON/HTML renderings, the
``inspect`` command, and the HTML page rendered in a real headless chromium.

The browser check needs Debian's ``chromium`` (``.ci/run`` installs it). Without it the test
fails, so CI cannot pass without the check; a developer without chromium may set
``GRAPHOPT_SKIP_BROWSER=1`` to skip it explicitly.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pydot
import pytest
import torch
from conftest import Block, randomize_bn, run_main
from PIL import Image
from torch import nn

import graphopt
from graphopt.views import (
    NODE_H,
    NODE_W,
    STATUS_COLOURS,
    compare_graphs,
    layered_layout,
    render_dot,
    render_html,
    render_json,
    render_svg,
)

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def pair():
    """Block (residual add, split, concat, grouped/depthwise convs, attention, a shared conv)
    before and after prune(ratio=0.5),fold, then torch's dynamic int8 quantization of its
    Linear head on top."""
    torch.manual_seed(0)
    model = randomize_bn(Block()).eval()
    before = graphopt.trace(model, (torch.randn(2, 3, 8, 8),))
    pruned = graphopt.optimize(before, "prune(ratio=0.5),fold").ir
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(pruned.gm), {nn.Linear}, dtype=torch.qint8
        )
    after = graphopt.GraphIR(gm, pruned.example_inputs)
    return before, after


def _by_kind(ir, status):
    return {r["name"]: (r["module"] or r["target"], status[r["name"]]) for r in ir.rows()}


def test_classification_of_a_pruned_folded_quantized_model(pair):
    before, after = pair
    comparison = compare_graphs(before, after)
    nodes = _by_kind(after, comparison.status)
    assert set(nodes) == {r["name"] for r in after.rows()}
    assert comparison.removed == ["bn (BatchNorm2d)"]  # folded into the stem conv
    assert nodes["head"][1] == "quantized"
    old = {r["name"]: r for r in before.rows()}
    for r in after.rows():
        state = comparison.status[r["name"]]
        if state == "pruned":
            prev = old[r["name"]]
            assert r["params"] < prev["params"] or r["shape"] != prev["shape"], r["name"]
        if state == "unchanged":
            assert r["shape"] == old[r["name"]]["shape"], r["name"]
    pruned_convs = [n for n, (kind, s) in nodes.items() if kind == "Conv2d" and s == "pruned"]
    assert {"stem", "grouped", "depthwise"} <= set(pruned_convs)
    assert nodes["x"][1] == "unchanged" and nodes["output"][1] == "unchanged"
    counts = comparison.counts()
    assert counts["removed"] == 1 and sum(counts.values()) == len(nodes) + 1
    assert comparison.totals["params"] == (before.total_params(), after.total_params())
    same = compare_graphs(after, after)  # already quantized before: nothing changed
    assert same.counts() == {"unchanged": len(nodes)} and not same.removed


def test_new_and_replaced_nodes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    before = graphopt.trace(model.eval(), (torch.randn(1, 3, 8, 8),))
    after = before.copy()
    relu = after.nodes(module_type=nn.ReLU)[0]
    with after.graph.inserting_after(relu):
        clamp = after.graph.call_function(torch.clamp, (relu,), {"min": 0.0, "max": 6.0})
    relu.replace_all_uses_with(clamp)
    clamp.args = (relu,)
    conv = after.nodes(module_type=nn.Conv2d)[0]
    with after.graph.inserting_after(conv):
        gelu = after.graph.call_function(torch.nn.functional.gelu, (conv,))
    after.replace(relu, gelu)  # gelu takes over relu's provenance: a replacement
    after.recompile()
    status = compare_graphs(before, after).status
    assert status[gelu.name] == "replaced" and status[clamp.name] == "new"
    assert status["_0"] == "unchanged" and status["_3"] == "unchanged"


def test_layout_geometry_on_a_residual_model(pair):
    before, _ = pair
    rows = before.rows()
    edges = [(s, r["name"]) for r in rows for s in r["inputs"]]
    layout = layered_layout([r["name"] for r in rows], edges)
    pos = layout.pos
    assert set(layout.routes) == set(edges)
    for (a, b), route in layout.routes.items():
        assert pos[b][1] > pos[a][1]  # every edge points down
        assert route[0] == (pos[a][0], pos[a][1] + NODE_H / 2)
        assert route[-1] == (pos[b][0], pos[b][1] - NODE_H / 2)
        ys = [p[1] for p in route]
        assert ys == sorted(ys)
    boxes = list(pos.values())
    for i, (x1, y1) in enumerate(boxes):  # no two boxes overlap
        for x2, y2 in boxes[i + 1 :]:
            assert abs(x1 - x2) >= NODE_W or abs(y1 - y2) >= NODE_H
    for x, y in boxes:
        assert NODE_W / 2 <= x <= layout.width - NODE_W / 2 and 0 < y < layout.height
    chain = layered_layout(["a", "b", "c"], [("a", "b"), ("b", "c")])
    assert len({x for x, _ in chain.pos.values()}) == 1  # a chain is drawn straight


def test_svg_dot_and_json_renderings(pair):
    before, after = pair
    svg = render_svg(after, before)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    groups = [g for g in root.iter(f"{ns}g") if "node" in (g.get("class") or "").split()]
    assert len(groups) == len(after.rows())
    fills = {g.get("data-name"): g.find(f"{ns}rect").get("fill") for g in groups}
    assert fills["head"] == STATUS_COLOURS["quantized"]
    assert fills["stem"] == STATUS_COLOURS["pruned"]
    plain = ET.fromstring(render_svg(before))
    assert {r.get("fill") for r in plain.iter(f"{ns}rect")} == {STATUS_COLOURS["unchanged"]}

    (graph,) = pydot.graph_from_dot_data(render_dot(after, before))
    colours = {n.get_name().strip('"'): n.get("fillcolor") for n in graph.get_nodes()}
    assert colours["head"].strip('"') == STATUS_COLOURS["quantized"]

    data = json.loads(render_json(after, before))
    assert {n["name"]: n["status"] for n in data["nodes"]}["stem"] == "pruned"
    assert data["removed"] == ["bn (BatchNorm2d)"]
    assert data["before"]["total_params"] == before.total_params()


def test_html_page_is_self_contained(pair):
    before, after = pair
    page = render_html(after, before, title="Block")
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    without_ns = page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert not re.search(r"https?://|<link|<script[^>]*src=|@import", without_ns)
    nodes = json.loads(re.search(r'<script id="nodes"[^>]*>(.*?)</script>', page, re.S)[1])
    assert nodes["stem"]["status"] == "pruned"
    assert nodes["stem"]["before"]["params"] > nodes["stem"]["params"]
    assert "1 removed nodes" in page and "bn (BatchNorm2d)" in page


@pytest.fixture
def _tests_importable(monkeypatch):
    monkeypatch.chdir(TESTS)
    monkeypatch.syspath_prepend(str(TESTS))


SMALL = ["models_for_cli:small_cnn", "--input-shape", "2,3,16,16"]


@pytest.mark.usefixtures("_tests_importable")
def test_inspect_command_writes_every_format(tmp_path, capsys):
    page = tmp_path / "g.html"
    run = run_main(capsys, "inspect", *SMALL, "--passes", "prune(ratio=0.5),fold", "-f", "html")
    assert run.code == 0, run.stderr
    assert run.stdout.startswith("<!DOCTYPE html>")
    assert "pruned 6" in run.stdout and "_1 (BatchNorm2d)" in run.stdout
    assert "<h1>models_for_cli:small_cnn after prune,fold</h1>" in run.stdout
    run = run_main(capsys, "inspect", *SMALL, "-f", "html", "-o", str(page))
    assert run.code == 0 and "<svg" in page.read_text()
    assert oct(page.stat().st_mode & 0o777) != oct(0o600)  # a page to share, not a secret
    svg = run_main(capsys, "inspect", *SMALL, "-f", "svg")
    assert ET.fromstring(svg.stdout.strip()).tag.endswith("svg")

    artifact = tmp_path / "pruned.pt"
    made = run_main(capsys, "optimize", *SMALL, "--passes", "prune(ratio=0.5)", "-o", str(artifact))
    assert made.code == 0, made.stderr
    compared = run_main(
        capsys, "inspect", str(artifact), "--trust-pickle", "--compare", SMALL[0],
        "--input-shape", "2,3,16,16", "-f", "json",
    )  # fmt: skip
    assert compared.code == 0, compared.stderr
    status = {n["name"]: n["status"] for n in json.loads(compared.stdout)["nodes"]}
    assert status["_0"] == "pruned" and status["_6"] == "pruned"  # matched by name
    assert "note:" not in compared.stderr

    exported = tmp_path / "pruned.pt2"  # raised back with node names from module paths
    made = run_main(capsys, "optimize", *SMALL, "--passes", "prune", "-o", str(exported))
    assert made.code == 0, made.stderr
    kept = run_main(
        capsys, "inspect", str(exported), "--compare", SMALL[0], "--input-shape", "2,3,16,16",
        "-f", "json",
    )  # fmt: skip
    assert kept.code == 0 and "note:" not in kept.stderr, kept.stderr
    status = {n["name"]: n["status"] for n in json.loads(kept.stdout)["nodes"]}
    assert status["_0"] == "pruned" and status["_6"] == "pruned"
    from models_for_cli import small_cnn

    nested = tmp_path / "nested.pt2"  # the same layers one level down: other node names
    x = torch.randn(2, 3, 16, 16)
    torch.export.save(torch.export.export(torch.nn.Sequential(small_cnn().eval()), (x,)), nested)
    lost = run_main(
        capsys, "inspect", str(nested), "--compare", SMALL[0], "--input-shape", "2,3,16,16"
    )
    assert lost.code == 0 and "note: only" in lost.stderr and "--passes" in lost.stderr


@pytest.mark.usefixtures("_tests_importable")
@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["-f", "pdf"], "--format must be"),
        (["--compare", "x:y", "--passes", "fold"], "not both"),
        (["--passes", "nosuchpass"], "nosuchpass"),
        (["--compare", "nosuchfile.pt2"], "nosuchfile.pt2"),
    ],
)
def test_inspect_bad_input_is_one_sentence(args, words, capsys):
    run = run_main(capsys, "inspect", *SMALL, *args)
    assert run.code == 2, run.stderr
    assert words in run.stderr and run.stderr.strip().count("\n") == 0


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("GRAPHOPT_SKIP_BROWSER") == "1":
        pytest.skip("no chromium, and GRAPHOPT_SKIP_BROWSER=1 asks to skip the browser check")
    pytest.fail(
        "chromium is not installed, so the HTML view cannot be checked in a browser: install "
        "it (apt-get install chromium; .ci/run does) or set GRAPHOPT_SKIP_BROWSER=1 locally"
    )


def _browse(page: Path, tmp_path: Path, *args: str) -> str:
    command = [
        _chromium(),
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        *args,
        f"{page.as_uri()}#node=stem",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _count_near(pixels: np.ndarray, colour: str, tol: int = 6) -> int:
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels - rgb) <= tol).all(axis=-1).sum())


def test_html_page_in_headless_chromium(pair, tmp_path):
    before, after = pair
    page = tmp_path / "block.html"
    page.write_text(render_html(after, before, title="Block"))

    dom = _browse(page, tmp_path, "--dump-dom")
    assert 'data-ready="1"' in dom  # the script ran to the end without an error
    details = re.search(r'<div id="details">(.*?)</div>', dom, re.S)[1]
    stem = next(r for r in after.rows() if r["name"] == "stem")
    assert "<h3>stem</h3>" in details and ">pruned<" in details
    assert (
        f">{stem['params']:,}<" in details and f">{'×'.join(map(str, stem['shape']))}<" in details
    )
    assert re.search(r'id="viewport" transform="translate\([-\d.]+,[-\d.]+\) scale\(', dom)
    assert 'class="node pruned sel"' in dom  # the node named in the URL is selected

    shot = tmp_path / "shot.png"
    _browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,800")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 800)
    pixels = np.asarray(image).astype(int)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # not blank: boxes, text, edges
    counts = {s: _count_near(pixels, c) for s, c in STATUS_COLOURS.items()}
    assert counts["pruned"] > 5000  # several orange boxes in view
    assert counts["unchanged"] > 2000 and counts["quantized"] > 100  # legend swatch at least
    assert _count_near(pixels, "#dd0000", 40) > 200  # the selected node's outline


def _run_notebook(path: Path) -> list:
    """Execute a notebook's code cells in one namespace (what a kernel does, minus the
    kernel: nbclient is not a dependency) and return each cell's displayed value."""
    import ast

    notebook = json.loads(path.read_text())
    assert notebook["nbformat"] == 4 and notebook["cells"]
    namespace: dict = {}
    shown = []
    for cell in notebook["cells"]:
        assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
        if cell["cell_type"] != "code":
            continue
        tree = ast.parse("".join(cell["source"]))
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, str(path), "exec"), namespace)
        if last is not None:
            shown.append(eval(compile(ast.Expression(last.value), str(path), "eval"), namespace))
    return shown


def test_example_notebook_runs_and_renders_html(capsys):
    shown = _run_notebook(TESTS.parent / "examples" / "report_and_views.ipynb")
    ir_table, ledger, report, view = shown
    html_table = ir_table._repr_html_()
    assert html_table.startswith("<table>") and "layer1_0_conv1" in html_table
    assert [step for step, *_ in ledger] == [
        "(input)",
        "prune",
        "fold",
    ]  # default options are not printed
    page = report._repr_html_()
    assert "<th>pruned + folded</th>" in page and "top-1 agreement" in page
    params = [m.params for m in report.models]
    assert f'<td style="text-align:right">{params[1] / params[0]:.3f}×</td>' in page
    frame = view._repr_html_()
    assert frame.startswith("<iframe srcdoc=") and "&lt;svg" in frame
    assert "'pruned': 49" in capsys.readouterr().out


def test_layer_widths_and_png_charts(pair, tmp_path):
    from graphopt.plots import layer_widths, plot_channels, plot_sensitivity, plot_tradeoff

    before, after = pair
    widths = {w.name: w for w in layer_widths(before, after)}
    assert widths["stem"].before == 16 == before.gm.stem.out_channels
    assert widths["stem"].after == after.gm.stem.out_channels < 16
    assert widths["grouped"].kind == "Conv2d" and "bn" not in widths  # folded away
    assert widths["head"].before == widths["head"].after == 10  # the classes stay

    chart = tmp_path / "channels.png"
    plot_channels(before, after, str(chart))
    pixels = np.asarray(Image.open(chart).convert("RGB")).astype(int)
    assert _count_near(pixels, STATUS_COLOURS["pruned"]) > 500  # the "after" bars
    assert _count_near(pixels, "#c8c8c8") > 500  # the "before" bars behind them
    plot_tradeoff([(1e6, 0.98, "original"), (4e5, 0.93, "ratio 0.5")], str(tmp_path / "t.png"))
    plot_sensitivity([("conv1", 0.8), ("conv2", 0.1)], str(tmp_path / "s.png"))
    for name in ("t.png", "s.png"):
        assert Image.open(tmp_path / name).size[0] > 300
    with pytest.raises(graphopt.GraphoptError, match="PNG"):
        plot_sensitivity([("conv1", 0.8)], str(tmp_path / "s.jpg"))


@pytest.mark.usefixtures("_tests_importable")
def test_inspect_plot_option(tmp_path, capsys):
    chart = tmp_path / "c.png"
    run = run_main(capsys, "inspect", *SMALL, "--passes", "prune", "--plot", str(chart))
    assert run.code == 0, run.stderr
    assert Image.open(chart).format == "PNG"
    bad = run_main(capsys, "inspect", *SMALL, "--plot", str(tmp_path / "d.png"))
    assert bad.code == 2 and "--passes or --compare" in bad.stderr
    assert not (tmp_path / "d.png").exists()


@pytest.mark.usefixtures("_tests_importable")
def test_classification_after_the_quant_pass():
    from models_for_cli import batches, small_cnn

    torch.manual_seed(0)
    before = graphopt.trace(randomize_bn(small_cnn()).eval(), (torch.randn(2, 3, 16, 16),))
    statuses = {}
    for form in ("int8", "qat"):
        pipeline = "fold,quant" if form == "int8" else "fold,quant(form=qat)"
        after = graphopt.optimize(before, pipeline, data=batches()).ir
        comparison = compare_graphs(before, after)
        statuses[form] = comparison.status
        assert "_1 (BatchNorm2d)" in comparison.removed  # folded into the conv
    int8, qat = statuses["int8"], statuses["qat"]
    assert int8["_0"] == int8["_6"] == "quantized"  # int8 conv(+relu) and linear kernels
    assert int8["quantize_per_tensor"] == int8["dequantize"] == "quantized"
    assert qat["_0"] == qat["_6"] == "quantized"  # weights fake-quantized by parametrization
    assert [n for n, s in qat.items() if n.startswith("fake_quant")]
    assert all(s == "quantized" for n, s in qat.items() if n.startswith("fake_quant"))
    assert int8["_4"] == qat["_4"] == "unchanged"  # the pooling is left alone
