"""``graphopt report``: figures checked against independent computations, a trained digits
classifier compared with its optimised artifact and with a lossy copy on real data, the
stored ledger, and bad input ending in one sentence with exit status 2."""

from __future__ import annotations

import doctest
import json
import math

import pytest
import torch
from conftest import run_graphopt, run_main
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

import graphopt.profiling
from graphopt.cli import app
from graphopt.profiling import time_callable, torch_threads

runner = CliRunner()
BATCH = 599  # digits has 1797 = 3 × 599 samples; .pt2 archives have a static batch size

NET = """
from torch import nn


def build():
    return nn.Sequential(
        nn.Linear(64, 48), nn.BatchNorm1d(48), nn.ReLU(), nn.Dropout(0.2), nn.Linear(48, 10)
    )


def seven_outputs():
    return nn.Linear(64, 7)
"""


def _train_digits(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        for i in range(0, len(x), 256):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 256]), y[i : i + 256]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A BatchNorm MLP trained on sklearn's digits; its factory, weights, and the data."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    features, labels = load_digits(return_X_y=True)
    x = torch.tensor(features, dtype=torch.float32) / 16
    y = torch.tensor(labels)
    (root / "net.py").write_text(NET)
    torch.manual_seed(0)
    with torch_threads(1):  # a tiny model: one thread is faster on a busy machine
        model = _train_digits(_rebuild(), x, y)
    accuracy = float((model(x).argmax(1) == y).float().mean())
    assert accuracy > 0.9, accuracy
    torch.save(model.state_dict(), root / "w.pt")
    torch.save(list(x.split(BATCH)), root / "data.pt")
    return {"root": root, "model": model, "x": x, "spec": f"{root / 'net.py'}:build"}


def _optimize(digits: dict, out, passes: str, *extra: str) -> None:
    weights = str(digits["root"] / "w.pt")
    args = ["optimize", digits["spec"], "--weights", weights, "--passes", passes, *extra]
    made = runner.invoke(app, [*args, "-o", str(out)])
    assert made.exit_code == 0, made.output


def _json(*args: str) -> dict:
    result = runner.invoke(app, ["report", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_figures_of_a_torchvision_model_match_independent_counts():
    import torchvision

    data = _json("torchvision:resnet18", "--input-shape", "1,3,32,32", "--no-onnx", "--runs", "2")
    (report,) = data["models"]
    model = torchvision.models.resnet18(weights=None).eval()
    assert report["params"] == 11_689_512 == sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert report["macs"] == counter.get_total_flops() // 2
    state = model.state_dict().values()
    assert report["size_bytes"] == sum(t.numel() * t.element_size() for t in state)
    assert report["size_kind"] == "weights in memory" and report["ort_latency"] is None
    assert report["weights_bytes"] == report["size_bytes"]
    assert data["torch"] == torch.__version__


def test_artifact_agrees_with_its_source_and_shows_its_ledger(digits, tmp_path):
    root = digits["root"]
    artifact = tmp_path / "opt.pt2"
    _optimize(digits, artifact, "cleanup,fold", "--input-shape", f"{BATCH},64")
    args = [digits["spec"], str(artifact), "--weights", str(root / "w.pt")]
    args += ["--input-shape", f"{BATCH},64"]
    args += ["--data", str(root / "data.pt"), "--runs", "3", "--warmup", "1", "--threads", "1"]
    data = _json(*args, "--no-onnx")
    a, b = data["models"]
    assert a["params"] == 64 * 48 + 48 + 2 * 48 + 48 * 10 + 10
    assert b["params"] == a["params"] - 2 * 48  # BatchNorm folded away
    assert data["ratios"]["params"] == f"{b['params'] / a['params']:.3f}×"
    assert b["size_kind"] == "file" and b["size_bytes"] == artifact.stat().st_size
    bn_bytes = 4 * 48 * 4 + 8  # weight, bias, running mean and var, num_batches_tracked
    assert a["weights_bytes"] - b["weights_bytes"] == bn_bytes
    assert data["agreement"]["rel_err"] < 1e-5 and data["agreement"]["top1"] == 1.0
    for lat in (a["latency"], b["latency"]):
        assert lat["runs"] == 3 and lat["warmup"] == 1 and lat["threads"] == 1
        assert 0 < lat["p25_ms"] <= lat["median_ms"] <= lat["p75_ms"]
    stored = b["artifact"]
    assert stored["pipeline"] == "cleanup,fold" and stored["torch"] == torch.__version__
    assert [e["step"] for e in stored["ledger"]] == ["(input)", "cleanup", "fold"]
    assert a["artifact"] is None

    table = runner.invoke(app, ["report", *args, "--no-onnx"], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    assert "compression ledger of" in table.output and "'cleanup,fold'" in table.output
    assert f"torch {torch.__version__}" in table.output
    assert "top-1 agreement 100.0%" in table.output and "1 threads" in table.output
    assert "onnxruntime latency" in table.output


def test_report_renders_as_html_with_the_stored_ledger(digits, tmp_path):
    from graphopt.loading import make_inputs
    from graphopt.profiling import agreement, load_for_report, measure
    from graphopt.report import Report

    artifact = tmp_path / "opt.pt"
    _optimize(digits, artifact, "cleanup,fold", "--input-shape", "4,64")
    a = load_for_report(
        digits["spec"], inputs=make_inputs([(4, 64)]), weights=str(digits["root"] / "w.pt")
    )
    b = load_for_report(str(artifact), inputs=a.inputs, trust_pickle=True)
    report = Report(
        [measure(a, runs=1, onnx=False), measure(b, runs=1, onnx=False)], agreement(a, b)
    )
    page = report._repr_html_()
    assert page.count("<table>") == 2 and "compression ledger of" in page
    assert (
        '<td style="text-align:left">fold</td>' in page
        and "pipeline &#x27;cleanup,fold&#x27;" in page
    )
    assert report.to_json()["agreement"]["top1"] == 1.0
    assert "<th>B/A</th>" in page and b.metadata["pipeline"] == "cleanup,fold"


def test_threads_option_leaves_the_process_setting_alone(digits):
    before = torch.get_num_threads()
    _json(digits["spec"], "--weights", str(digits["root"] / "w.pt"), "--no-onnx")
    _json(digits["spec"], "--threads", "1", "--no-onnx", "--runs", "1")
    assert torch.get_num_threads() == before


def test_lossy_copy_agreement_equals_direct_computation_on_real_data(digits, tmp_path):
    root = digits["root"]
    model, x = digits["model"], digits["x"]
    state = model.state_dict()
    linear = ("0.weight", "4.weight")  # weights of the two Linear layers on a 1/4 grid
    coarse = {k: (v * 4).round() / 4 if k in linear else v for k, v in state.items()}
    torch.save(coarse, tmp_path / "coarse.pt")
    lossy = _rebuild()
    lossy.load_state_dict(coarse)
    lossy.eval()
    program = torch.export.export(lossy, (x[:BATCH],))
    torch.export.save(program, str(tmp_path / "coarse.pt2"))
    data = _json(
        digits["spec"],
        str(tmp_path / "coarse.pt2"),
        "--weights",
        str(root / "w.pt"),
        *("--input-shape", f"{BATCH},64", "--data", str(root / "data.pt")),
        *("--no-onnx", "--runs", "1"),
    )
    with torch.no_grad():
        ref, got = model(x), lossy(x)
    expected_top1 = int((ref.argmax(1) == got.argmax(1)).sum()) / len(x)
    agreement = data["agreement"]
    assert 0.5 < expected_top1 < 1.0  # the copy really is lossy, yet still a classifier
    assert agreement["top1"] == pytest.approx(expected_top1, abs=1e-9)
    assert agreement["max_abs_err"] == pytest.approx(float((got - ref).abs().max()), rel=1e-5)
    rel = float((got - ref).norm() / ref.norm())
    assert agreement["rel_err"] == pytest.approx(rel, rel=1e-4)
    assert data["models"][1]["artifact"] is None  # not written by graphopt: no ledger


def _rebuild() -> nn.Module:
    namespace: dict = {}
    exec(NET, namespace)
    return namespace["build"]()


def test_onnx_artifact_is_timed_in_onnxruntime(digits, tmp_path):
    root = digits["root"]
    onnx_file = tmp_path / "opt.onnx"
    _optimize(digits, onnx_file, "fold", "--input-shape", "4,64")
    data = _json(
        digits["spec"],
        str(onnx_file),
        "--weights",
        str(root / "w.pt"),
        "--input-shape",
        "4,64",
        "--runs",
        "2",
    )
    a, b = data["models"]
    assert a["ort_latency"]["runs"] == 2 and a["latency"]["runs"] == 2
    assert b["latency"] is None and b["ort_latency"]["median_ms"] > 0
    assert b["params"] == a["params"] - 2 * 48 and b["macs"] is None
    assert b["weights_bytes"] == 4 * b["params"]  # float32 initializers
    assert data["agreement"]["rel_err"] < 1e-4
    assert b["artifact"]["pipeline"] == "fold"


def test_a_random_model_loads_the_same_weights_so_it_agrees_with_itself(digits, capsys):
    args = ("report", digits["spec"], digits["spec"], "--no-onnx", "--runs", "1", "--json")
    run = run_main(capsys, *args)
    assert run.code == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["agreement"]["max_abs_err"] == 0.0 and data["agreement"]["top1"] == 1.0


def test_report_in_a_real_subprocess(digits, tmp_path):
    artifact = tmp_path / "folder"
    _optimize(digits, artifact, "cleanup")
    run = run_graphopt("report", str(artifact), "--input-shape", "8,64", "--runs", "2")
    assert run.code == 0, run.stderr
    assert "compression ledger of" in run.stdout and "'cleanup'" in run.stdout
    assert "onnxruntime latency is measured for traced models" in run.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["m:x", "--runs", "0"], "--runs"),
        (["torchvision:resnet18", "--data", "d.pt"], "give OTHER"),
        (["missing.onnx", "--input-shape", "1,3"], "does not exist"),
        (["{onnx}"], "--input-shape"),
        (["{spec}", "{seven}"], "same outputs"),
        (["{spec}", "{spec}", "--data", "{bad_data}"], "fails on a batch"),
        (["{spec}", "{garbage_onnx}", "--input-shape", "1,64"], "not a readable model"),
    ],
)
def test_bad_input_is_one_sentence(args, words, digits, tmp_path, capsys):
    root = digits["root"]
    torch.save([torch.randn(2, 5)], tmp_path / "bad.pt")
    (tmp_path / "garbage.onnx").write_bytes(b"not onnx")
    onnx_file = root / "plain.onnx"
    if not onnx_file.exists():
        torch.onnx.export(digits["model"], (digits["x"][:2],), str(onnx_file), dynamo=True)
    values = {
        "spec": digits["spec"],
        "seven": digits["spec"].replace(":build", ":seven_outputs"),
        "onnx": str(onnx_file),
        "bad_data": str(tmp_path / "bad.pt"),
        "garbage_onnx": str(tmp_path / "garbage.onnx"),
    }
    run = run_main(capsys, "report", *[a.format(**values) for a in args], "--no-onnx")
    assert run.code == 2, (run.stdout, run.stderr)
    assert words in run.stderr
    assert run.stderr.startswith("error: ") and "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0


def test_time_callable_counts_calls_and_orders_quartiles():
    calls = []
    lat = time_callable(lambda: calls.append(1), warmup=2, runs=7, threads=3)
    assert len(calls) == 9 and lat.runs == 7 and lat.warmup == 2 and lat.threads == 3
    assert lat.p25_ms <= lat.median_ms <= lat.p75_ms and not math.isnan(lat.median_ms)


def test_module_docstring_example():
    failures, _ = doctest.testmod(graphopt.profiling)
    assert failures == 0
