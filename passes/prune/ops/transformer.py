"""Transformer-specific layers: RMS normalisation (``F.rms_norm``, ``nn.RMSNorm``).

Decoders since Llama normalise the residual stream by its root mean square; capture raises
the arithmetic they write it in to ``F.rms_norm`` (:mod:`graphopt.idioms`). Like LayerNorm,
its scale follows the channels and its statistic is recomputed over the kept ones, so the
hidden size can shrink across every block the residual stream passes through.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn

from .norms import LayerNorm

__all__ = ["RMSNorm"]


class RMSNorm(LayerNorm):
    """``nn.RMSNorm`` and ``F.rms_norm(x, shape, weight, eps)``: LayerNorm's mapping with a
    weight and no bias."""

    modules: tuple[type[nn.Module], ...] = (nn.RMSNorm,)
    functions: tuple[Any, ...] = (F.rms_norm,)
    tensor_args = (("weight", 2),)
