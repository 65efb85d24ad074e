"""The primary output of a model: what a check or a loss compares as "the logits".

Models return a tensor, a tuple or list (logits first, extras after), a dict, or a
dataclass such as Hugging Face's ``ModelOutput`` (``logits``, ``last_hidden_state`` …). The
ledger's top-1 agreement, ``graphopt report``'s comparison and distillation's teacher
logits all read the same one through :func:`primary_output`.

>>> import torch
>>> from graphopt.outputs import primary_output
>>> logits = torch.zeros(2, 10)
>>> primary_output((logits, torch.ones(3))) is logits
True
>>> primary_output({"loss": None, "logits": logits}) is logits
True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["primary_output"]


def primary_output(out: Any) -> torch.Tensor | None:
    """The tensor standing for a model's prediction: the output itself if it is a tensor;
    the ``logits`` of a mapping or dataclass (Hugging Face ``ModelOutput``), else its first
    tensor; the first item holding a tensor of a tuple or list; None without any tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        items = list(out.items())
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        items = [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]
    elif isinstance(out, tuple | list):
        items = [(None, v) for v in out]
    else:
        return None
    for key, value in items:
        if key == "logits" and isinstance(value, torch.Tensor):
            return value
    for _, value in items:
        found = primary_output(value)
        if found is not None:
            return found
    return None
