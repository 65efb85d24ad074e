"""Factories the CLI tests load as ``models_for_cli:NAME`` (the test directory is on sys.path)."""

from __future__ import annotations

import torch
from torch import nn


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def not_a_module() -> int:
    return 42


def needs_arguments(width: int) -> nn.Module:
    return nn.Linear(width, width)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return x


def branchy() -> nn.Module:
    return Branchy()


def batches() -> list[tuple[torch.Tensor]]:
    return [(torch.randn(2, 3, 16, 16),) for _ in range(3)]
