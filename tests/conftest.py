"""Shared fixtures: real models with the structures every pass must handle; CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
GRAPHOPT = str(Path(sys.executable).parent / "graphopt")


class Block(nn.Module):
    """Residual add, concat, split, grouped + depthwise convs, attention, a shared module."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.grouped = nn.Conv2d(c, c, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.shared = nn.Conv2d(c // 2, c // 2, 1)
        self.drop = nn.Dropout(0.3)
        self.ident = nn.Identity()
        self.attn = nn.MultiheadAttention(2 * c, 4, batch_first=True)
        self.head = nn.Linear(2 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        y = self.depthwise(self.grouped(x)) + x  # residual add
        a, b = torch.split(y, y.shape[1] // 2, dim=1)  # split
        y = torch.cat([self.shared(a), self.shared(b)], dim=1)  # shared module, concat
        y = torch.cat([y, self.ident(x)], dim=1)
        tokens = self.drop(y.flatten(2).transpose(1, 2))
        tokens, _ = self.attn(tokens, tokens, tokens)  # attention
        return self.head(tokens.mean(1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
    return model


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module's tests (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): under ``pytest -n 2`` two workers already fill
    both cores, and oversubscribed threads made small-model training several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def block() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(Block()).eval()


@pytest.fixture
def block_input() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


def run_graphopt(*args: str, cwd: str | os.PathLike | None = None, env: dict | None = None) -> Run:
    """Run the installed console script in a real subprocess."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    proc = subprocess.run(
        [GRAPHOPT, *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=600
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def run_main(capsys: pytest.CaptureFixture, *args: str) -> Run:
    """Run the CLI entry point in-process (same error handling as the console script)."""
    from graphopt.cli import main

    code = 0
    try:
        main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


def pip_install(source: Path, target: Path) -> Path:
    """``pip install --target`` of a distribution's source folder, with the build backend
    already installed here and nothing downloaded; returns ``target`` (put it on
    PYTHONPATH, or sys.path, and the distribution's entry points are found)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target
