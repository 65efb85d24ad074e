"""What a loaded model is before it is captured: the module (or exported program), the
example inputs its source implies, and the seeded generator every built model is made with.

The layer below :mod:`graphopt.loading` (which turns a MODEL argument into one) and
:mod:`graphopt.sources` (the model zoos).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.export import ExportedProgram

__all__ = [
    "BUILD_SEED",
    "FreeDims",
    "InputSpec",
    "LoadedModel",
    "default_input_shapes",
    "dynamic_shapes",
    "float_inputs",
    "free_dim_candidates",
    "grown",
    "seeded",
    "varied",
]


@dataclass(frozen=True)
class InputSpec:
    """One example input a model takes: the ``forward`` argument it binds to (None: by
    position), its shape and dtype, and how it is filled: token ids below ``high``, all ones
    (an attention mask attending everywhere), or seeded random values. ``follows`` names the
    input whose shape a user-given shape also sets (the mask follows the token ids)."""

    name: str | None
    shape: tuple[int, ...]
    dtype: str = "float32"
    high: int | None = None
    ones: bool = False
    follows: int | None = None


@dataclass
class LoadedModel:
    """A model ready to capture: a module or an exported program, with the example inputs
    the source implies (if any)."""

    module: nn.Module | None
    source: str
    example_inputs: tuple[Any, ...] | None = None
    inputs: list[InputSpec] | None = None
    program: ExportedProgram | None = None

    @property
    def input_shapes(self) -> list[tuple[int, ...]] | None:
        """The shapes of the model's default inputs, if it has any."""
        return [i.shape for i in self.inputs] if self.inputs else None

    @property
    def input_names(self) -> list[str] | None:
        """The ``forward`` arguments the inputs bind to, when they bind by name."""
        if self.inputs and all(i.name for i in self.inputs):
            return [str(i.name) for i in self.inputs]
        return None


def float_inputs(shapes: Sequence[tuple[int, ...]] | None) -> list[InputSpec] | None:
    """Positional float32 inputs of the given shapes (None stays None)."""
    return [InputSpec(None, tuple(s)) for s in shapes] if shapes else None


def default_input_shapes(module: nn.Module) -> list[tuple[int, ...]] | None:
    """A sensible single input for known model families, or None if none can be inferred.

    A model is judged by its first layer: a Conv2d
    with C input channels takes 1×C×224×224, Conv1d 1×C×128, Conv3d 1×C×16×112×112, a
    Linear 1×in_features.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return [(1, m.in_channels, 224, 224)]
        if isinstance(m, nn.Conv1d):
            return [(1, m.in_channels, 128)]
        if isinstance(m, nn.Conv3d):
            return [(1, m.in_channels, 16, 112, 112)]
        if isinstance(m, nn.Linear):
            return [(1, m.in_features)]
        if isinstance(m, nn.Embedding | nn.MultiheadAttention | nn.LSTM | nn.GRU):
            return None
    return None


#: the seed randomly initialised models are built with, so a spec loads the same weights twice
BUILD_SEED = 0


@contextlib.contextmanager
def seeded(seed: int = BUILD_SEED) -> Iterator[None]:
    """Run the body with torch's CPU generator seeded, restoring the caller's state after:
    zoo models and factories then give the same weights on every load, so a model can be
    compared with an artifact made from it, and the caller's random stream is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


#: input index → {dim: name} of the dims an exported graph leaves free ("batch", "sequence")
FreeDims = dict[int, dict[int, str]]


def free_dim_candidates(inputs: Sequence[Any]) -> list[FreeDims]:
    """The dims torch.export is asked to leave free, most first: the batch dim of every
    tensor input and, for token inputs (integer tensors of rank 2), the sequence dim too;
    then the batch dim only. Empty when no input is a tensor."""
    tensors = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.dim() >= 1]
    batch: FreeDims = {i: {0: "batch"} for i in tensors}
    tokens = {i for i in tensors if inputs[i].dim() == 2 and not inputs[i].is_floating_point()}
    if not tokens:
        return [batch] if batch else []
    both: FreeDims = {
        i: {0: "batch", 1: "sequence"} if i in tokens else {0: "batch"} for i in tensors
    }
    return [both, batch]


def dynamic_shapes(dims: FreeDims, count: int) -> tuple[dict[int, Any] | None, ...]:
    """``torch.export``'s ``dynamic_shapes`` for ``count`` positional inputs leaving ``dims``
    free. Export may narrow a free dim's range (a sequence no longer than the position
    table) and tie dims together (a mask's length to its token ids'); it fails if the graph
    fixes one."""
    from torch.export import Dim

    return tuple(dict.fromkeys(dims[i], Dim.DYNAMIC) if i in dims else None for i in range(count))


def grown(inputs: Sequence[Any], dims: FreeDims) -> tuple[Any, ...]:
    """Copies of ``inputs`` with every dim of ``dims`` at least 2 long (the values repeated
    along it): torch.export fixes a dim it sees at size 1, and marks the tensors it is given
    as dynamic, which a later export of the originals must not inherit."""
    out = [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]
    for i, free in dims.items():
        for d in free:
            if out[i].shape[d] < 2:
                out[i] = torch.cat([out[i], out[i]], dim=d)
    return tuple(out)


def varied(inputs: Sequence[Any], dims: FreeDims) -> tuple[Any, ...]:
    """``inputs`` at another size in every dim of ``dims``, to check that a free dim really
    is free: one shorter (a length within any upper bound the model has, such as its
    position table) when that leaves at least 2, else 3 long (the first slice repeated)."""
    out = list(inputs)
    for i, free in dims.items():
        for d in free:
            n = out[i].shape[d]
            if n >= 3:
                out[i] = out[i].narrow(d, 0, n - 1)
            else:
                first = out[i].narrow(d, 0, 1)
                out[i] = torch.cat([out[i], *[first] * (3 - n)], dim=d)
    return tuple(out)
