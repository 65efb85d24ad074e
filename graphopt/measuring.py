"""How far one model's outputs are from another's: the one place graphopt measures it.

The pass manager's ledger (each pass against the original), lowering's artifact check
(the written file against the in-memory model) and ``graphopt report`` (model B against
model A over the user's batches) all use it.

>>> import torch
>>> ref = torch.tensor([[1.0, 2.0], [3.0, 1.0]])
>>> dev = deviation(ref + 0.5, ref)
>>> dev.max_abs_err, round(dev.rel_err, 3), dev.top1
(0.5, 0.258, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils import _pytree as pytree

from .errors import GraphoptError, first_line
from .outputs import primary_output

__all__ = [
    "Deviation",
    "DeviationMeter",
    "agreement",
    "deviation",
    "output_tensors",
    "run_model",
    "weights_bytes",
]


@dataclass
class Deviation:
    """How far one model's outputs are from another's on the same inputs: the largest
    absolute error, the relative error ‖out−ref‖/‖ref‖, and for classifier logits (N×C,
    C>1) the fraction of rows whose arg-max agrees (else None)."""

    max_abs_err: float
    rel_err: float
    top1: float | None


def run_model(model: Callable[..., Any], inputs: tuple[Any, ...]) -> Any:
    """Run a model for checking: eval mode, no grad; the training flags are restored after.
    (Not ``model.eval()``: exported programs refuse it; the flag is what matters.)"""
    if not isinstance(model, torch.nn.Module):
        with torch.no_grad():
            return model(*inputs)
    modes = [(m, m.training) for m in model.modules()]
    for m, _ in modes:
        m.training = False
    try:
        with torch.no_grad():
            return model(*inputs)
    finally:
        for m, mode in modes:
            m.training = mode


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output (any nesting of tuples, lists and dicts), detached and
    as float, in pytree order."""
    return [t.detach().float() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def weights_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once."""
    seen: dict[int, int] = {}
    for t in module.state_dict(keep_vars=True).values():
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class DeviationMeter:
    """Accumulates the deviation of candidate outputs from reference outputs over batches.

    ``mismatch(got_shapes, ref_shapes)`` gives the sentence for outputs that do not line up
    (different count or shapes)."""

    def __init__(self, mismatch: Callable[[list[tuple[int, ...]], list[tuple[int, ...]]], str]):
        self.mismatch = mismatch
        self.max_abs = self.num = self.den = 0.0
        self.agree = self.rows = 0
        self.batches = 0

    def add(self, out: Any, ref: Any) -> None:
        """Compare one batch's candidate output ``out`` with its reference ``ref``."""
        got, want = output_tensors(out), output_tensors(ref)
        if len(got) != len(want) or any(
            x.shape != y.shape for x, y in zip(got, want, strict=False)
        ):
            shapes = [tuple(x.shape) for x in got], [tuple(y.shape) for y in want]
            raise GraphoptError(self.mismatch(*shapes))
        self.batches += 1
        for x, y in zip(got, want, strict=True):
            if x.numel():
                self.max_abs = max(self.max_abs, float((x - y).abs().max()))
            self.num += float((x - y).pow(2).sum())
            self.den += float(y.pow(2).sum())
        top_got, top_want = primary_output(out), primary_output(ref)  # the logits
        if (
            top_want is not None
            and top_got is not None
            and top_want.dim() == 2
            and top_want.shape[1] > 1
            and top_got.shape == top_want.shape
        ):
            self.agree += int((top_got.argmax(1) == top_want.argmax(1)).sum())
            self.rows += top_want.shape[0]

    def result(self) -> Deviation:
        """The deviation over every batch added so far."""
        num, den = math.sqrt(self.num), math.sqrt(self.den)
        rel = num / den if den > 0 else (0.0 if num == 0 else math.inf)
        return Deviation(self.max_abs, rel, self.agree / self.rows if self.rows else None)


def deviation(out: Any, ref: Any) -> Deviation:
    """Max abs error, relative error (‖out−ref‖/‖ref‖) and top-1 agreement of two outputs.

    Top-1 agreement is reported when the primary output (:func:`.primary_output`: the
    logits) is a batch of logits (N×C, C>1).
    """
    meter = DeviationMeter(
        lambda got, want: (
            f"the optimised model's outputs {got} no longer match the original's {want}; "
            "the pipeline changed the output shape"
        )
    )
    meter.add(out, ref)
    return meter.result()


class Named(Protocol):
    """A model to compare: called on a batch's inputs, named by ``source`` in messages,
    with ``inputs`` it is known to run on."""

    source: str
    inputs: tuple[Any, ...]

    def __call__(self, *inputs: Any) -> Any: ...


def agreement(a: Named, b: Named, batches: Iterable[Any] | None = None) -> Deviation:
    """How far B's outputs are from A's over ``batches`` (each a tensor or a tuple of the
    models' inputs; default: A's inputs): max abs error, relative error ‖B−A‖/‖A‖ over all
    batches together and, for classifier logits, top-1 agreement."""
    meter = DeviationMeter(
        lambda got, want: (
            f"'{b.source}' returns outputs shaped {got} where '{a.source}' returns {want}; "
            "compare models with the same outputs"
        )
    )
    for batch in batches if batches is not None else [a.inputs]:
        inputs = tuple(batch) if isinstance(batch, tuple | list) else (batch,)
        ref = _outputs(a, inputs)
        meter.add(_outputs(b, inputs), ref)
    if meter.batches == 0:
        raise GraphoptError("the data spec gave no batches; give at least one batch")
    return meter.result()


def _outputs(model: Named, inputs: tuple[Any, ...]) -> Any:
    try:
        return model(*inputs)
    except Exception as exc:
        shapes = ", ".join("×".join(map(str, getattr(t, "shape", ()))) for t in inputs)
        raise GraphoptError(
            f"'{model.source}' fails on a batch of shape {shapes} ({first_line(exc)}); give "
            "batches the model accepts"
        ) from None
