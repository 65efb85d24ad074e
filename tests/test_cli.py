"""The command line: success paths through typer's runner and a real subprocess, and every kind
of bad input ending in one sentence, exit status 2, no traceback and no output written."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_graphopt, run_main
from typer.testing import CliRunner

from graphopt.cli import app

runner = CliRunner()
TESTS = Path(__file__).resolve().parent
SMALL = ["models_for_cli:small_cnn", "--input-shape", "2,3,16,16"]


@pytest.fixture(autouse=True)
def _tests_importable(monkeypatch):
    monkeypatch.chdir(TESTS)
    monkeypatch.syspath_prepend(str(TESTS))


def test_optimize_prints_ledger_and_writes_verified_artifact(tmp_path):
    out = tmp_path / "m.pt2"
    report = tmp_path / "report.json"
    result = runner.invoke(
        app,
        ["optimize", *SMALL, "--passes", "cleanup", "-o", str(out), "--report-json", str(report)],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "compression" in result.output or "→" in result.output
    assert "cleanup" in result.output and "exact" in result.output
    assert re.search(r"reloaded and checked: relative error \d", result.output)
    data = json.loads(report.read_text())
    assert data["pipeline"] == "cleanup" and data["check"]["format"] == "pt2"
    assert data["ledger"][1]["stats"]["dropout removed"] == 1
    loaded = torch.export.load(str(out)).module()
    x = torch.randn(2, 3, 16, 16)
    from models_for_cli import small_cnn  # noqa: F401 - same factory, to compare structure

    assert loaded(x).shape == (2, 10)


def test_inspect_formats(tmp_path):
    table = runner.invoke(app, ["inspect", *SMALL], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "AdaptiveAvgPool2d" in table.output
    as_json = runner.invoke(app, ["inspect", *SMALL, "--format", "json"])
    data = json.loads(as_json.output)
    assert data["total_params"] == 8 * 3 * 9 + 8 + 16 + 80 + 10
    assert [n["name"] for n in data["nodes"]][:2] == ["input_1", "_0"]
    dot_file = tmp_path / "g.dot"
    dot = runner.invoke(app, ["inspect", *SMALL, "--format", "dot", "-o", str(dot_file)])
    assert dot.exit_code == 0
    text = dot_file.read_text()
    assert "digraph" in text.splitlines()[0] and "input_1 -> _0;" in text


def test_passes_and_plugins_listings():
    passes = runner.invoke(app, ["passes"], env={"COLUMNS": "200"})
    assert passes.exit_code == 0 and "cleanup" in passes.output and "dropout" in passes.output
    md = runner.invoke(app, ["passes", "cleanup", "--format", "markdown"])
    assert "| `dropout` | bool | `true` |" in md.output
    plugins = runner.invoke(app, ["plugins"], env={"COLUMNS": "200"})
    assert "graphopt.passes" in plugins.output and "pt2" in plugins.output


def test_print_after_and_time_passes_in_subprocess(tmp_path):
    run = run_graphopt(
        "optimize",
        *SMALL,
        "--passes",
        "cleanup",
        "-o",
        str(tmp_path / "o.pt"),
        "--print-after",
        "cleanup",
        "--time-passes",
        cwd=TESTS,
        env={"PYTHONPATH": str(TESTS)},
    )
    assert run.code == 0, run.stderr
    assert "def forward" in run.stderr and "time per pass" in run.stderr
    assert "Traceback" not in run.stderr


def test_version():
    run = runner.invoke(app, ["--version"])
    assert run.exit_code == 0 and run.output.startswith("graphopt 0.")


def _write_files(tmp: Path) -> dict[str, str]:
    state = tmp / "state.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), state)
    pickled = tmp / "whole.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), pickled)
    corrupt = tmp / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 this is not a torch file")
    wrong = tmp / "wrong_weights.pt"
    torch.save({"nope.weight": torch.zeros(1)}, wrong)
    return {
        "state": str(state),
        "pickled": str(pickled),
        "corrupt": str(corrupt),
        "wrong": str(wrong),
        "dir": str(tmp),
    }


BAD_INPUTS = [
    # (arguments with {placeholders}, fragment of the one sentence)
    (["optimize", "missing.pt", "--passes", "cleanup"], "does not exist"),
    (["optimize", "{corrupt}", "--passes", "cleanup"], "not a readable PyTorch file"),
    (["optimize", "{dir}", "--passes", "cleanup"], "is a directory"),
    (["optimize", "{pickled}", "--passes", "cleanup"], "--trust-pickle"),
    (["optimize", "{state}", "--passes", "cleanup"], "state dict"),
    (["optimize", "models_for_cli:nothing_here", "--passes", "cleanup"], "no attribute"),
    (["optimize", "models_for_cli:not_a_module", "--passes", "cleanup"], "not a torch.nn.Module"),
    (["optimize", "models_for_cli:needs_arguments", "--passes", "cleanup"], "without arguments"),
    (["optimize", "no_such_package.models:build", "--passes", "cleanup"], "cannot import"),
    (
        ["optimize", "models_for_cli:branchy", "--input-shape", "1,4", "--passes", "cleanup"],
        "--leaf-module Branchy",
    ),
    (["optimize", *SMALL, "--passes", "nosuch"], "unknown pass 'nosuch'"),
    (["optimize", *SMALL, "--passes", "cleanup(colour=red)"], "no option 'colour'"),
    (["optimize", *SMALL, "--passes", "cleanup(dropout=maybe)"], "true or false"),
    (["optimize", *SMALL, "--passes", "cleanup(dropout=true"], "column 21"),
    (["optimize", *SMALL, "--passes", "cleanup", "-o", "/proc/nope/m.pt2"], "cannot write"),
    (["optimize", *SMALL, "--passes", "cleanup", "-o", "{dir}/m.xyz"], "no output format"),
    (
        [
            "optimize",
            "models_for_cli:small_cnn",
            "--input-shape",
            "1,5,16,16",
            "--passes",
            "cleanup",
        ],
        "does not fit",
    ),
    (
        ["optimize", "models_for_cli:small_cnn", "--input-shape", "1,-3,16", "--passes", "cleanup"],
        "positive integers",
    ),
    (["optimize", "torchvision:resnet_nope", "--passes", "cleanup"], "no model 'resnet_nope'"),
    (
        ["optimize", "torchvision:resnet18", "--weights", "{wrong}", "--passes", "cleanup"],
        "does not match the model",
    ),
    (["optimize", *SMALL, "--passes", "cleanup", "--data", "missing_data"], "data spec"),
]


@pytest.mark.parametrize(("args", "fragment"), BAD_INPUTS, ids=lambda v: str(v)[:40])
def test_bad_input_is_one_sentence_exit_2_nothing_written(tmp_path, capsys, args, fragment):
    files = _write_files(tmp_path)
    before = set(os.listdir(tmp_path))
    args = [a.format(**files) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out.pt2")]
    run = run_main(capsys, *args)
    assert run.code == 2, (run.stderr, run.stdout)
    assert fragment in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    assert set(os.listdir(tmp_path)) == before


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(BAD_INPUTS[3][0], "--trust-pickle"), (BAD_INPUTS[10][0], "unknown pass")],
    ids=["untrusted-pickle", "unknown-pass"],
)
def test_bad_input_through_a_real_process(tmp_path, args, fragment):
    files = _write_files(tmp_path)
    before = set(os.listdir(tmp_path))
    args = [a.format(**files) for a in args] + ["-o", str(tmp_path / "o.pt2")]
    run = run_graphopt(*args, cwd=TESTS, env={"PYTHONPATH": str(TESTS)})
    assert run.code == 2 and fragment in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
    assert set(os.listdir(tmp_path)) == before


def test_trusted_pickle_loads(tmp_path, capsys):
    files = _write_files(tmp_path)
    run = run_main(
        capsys,
        "optimize",
        files["pickled"],
        "--trust-pickle",
        "--passes",
        "cleanup",
        "-o",
        str(tmp_path / "o.pt"),
    )
    assert run.code == 0, run.stderr
    assert isinstance(torch.load(tmp_path / "o.pt", weights_only=False), torch.nn.Module)


def test_data_spec_is_loaded(tmp_path, capsys):
    run = run_main(
        capsys,
        "optimize",
        *SMALL,
        "--passes",
        "cleanup",
        "--data",
        "models_for_cli:batches",
        "-o",
        str(tmp_path / "o.pt"),
    )
    assert run.code == 0, run.stderr


def test_readme_commands_and_ci_agree():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    setup = [b for b in blocks if b.startswith("python3 -m venv")]
    assert len(setup) == 2, "README must hold exactly two set-up commands"
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup[1] in ci.splitlines()
    assert "graphopt optimize" in setup[0]


def test_only_the_first_torchrun_process_writes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.pt2"
    args = ["optimize", *SMALL, "--passes", "cleanup,fold,cleanup", "-o", str(out)]
    monkeypatch.setenv("RANK", "1")
    run = run_main(capsys, *args)
    assert run.code == 0 and not out.exists() and "pipeline" not in run.stdout
    monkeypatch.setenv("RANK", "0")
    run = run_main(capsys, *args)
    assert run.code == 0 and out.exists() and "pipeline: cleanup,fold,cleanup" in run.stdout
