"""Reading the user's data: training and validation loaders, and batches of inputs and labels.

``ctx.data`` (the Python API's ``data=`` or the CLI's ``--data package.module:callable``)
may be

* one loader — an iterable of batches, used for training, with no validation;
* a pair ``(train, val)`` of loaders;
* a mapping with a ``"train"`` and optionally a ``"val"`` loader;
* a :class:`TrainVal`, which iterates as its training batches, so that other passes of the
  same pipeline that read plain batches (``quant`` calibrating, ``bnrecal``) can share it.

A batch is a tuple (or list) of the model's inputs, optionally followed by one more item,
the labels; a bare tensor is the single input of a one-input model; or a mapping from the
model's input names to tensors, with the labels under ``"labels"`` (a Hugging Face style
batch: ``{"input_ids": …, "attention_mask": …, "labels": …}``). See
:func:`graphopt.split_batch`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from graphopt import GraphoptError

__all__ = ["NO_DATA", "TrainVal", "train_val"]

NO_DATA = (
    "distill needs training data and got none; pass data=(train_loader, val_loader) from "
    "Python or --data package.module:callable on the command line"
)


@dataclass
class TrainVal:
    """Training and validation loaders that iterate (and count) as the training batches.

    >>> data = TrainVal([(1,), (2,)], [(3,)])
    >>> list(data), len(data), train_val(data)[1]
    ([(1,), (2,)], 2, [(3,)])
    """

    train: Iterable[Any]
    val: Iterable[Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter(self.train)

    def __len__(self) -> int:
        return len(self.train)  # type: ignore[arg-type]


def _is_batch(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    return isinstance(obj, tuple | list) and all(isinstance(x, torch.Tensor) for x in obj)


def _is_loader(obj: Any) -> bool:
    return isinstance(obj, Iterable) and not _is_batch(obj) and not isinstance(obj, str | bytes)


def train_val(data: Any) -> tuple[Iterable[Any], Iterable[Any] | None]:
    """The training loader and the validation loader (or None) in ``data``."""
    if data is None:
        raise GraphoptError(NO_DATA)
    if isinstance(data, TrainVal):
        return data.train, data.val
    if isinstance(data, Mapping):
        if "train" not in data:
            raise GraphoptError(
                f"distill data is a mapping without a 'train' entry (it has {sorted(data)}); "
                "give {'train': loader, 'val': loader}"
            )
        return data["train"], data.get("val")
    if isinstance(data, tuple | list) and len(data) == 2 and all(_is_loader(d) for d in data):
        return data[0], data[1]
    if not _is_loader(data):
        raise GraphoptError(
            f"distill data is a {type(data).__name__}, not batches; give a DataLoader or a "
            "(train, val) pair of them"
        )
    return data, None
