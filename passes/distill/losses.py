"""The distillation losses, the 1×1 adapters of feature pairs, and plugin-contributed losses.

The objective is ``α·KD + β·feature + γ·CE`` plus any plugin loss the user names:

* **KD** (Hinton et al.): ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, summed over classes and
  averaged over the batch (``batchmean``). The T² keeps its gradient on the scale of the
  hard-label loss whatever the temperature.
* **feature**: for each paired node, the mean squared error between the (adapted) student
  value and the teacher value, divided by a constant — the teacher value's mean square on
  the first batch — so that β means the same on every model; averaged over the pairs.
* **CE**: cross-entropy of the student logits with the labels, when batches carry labels.

Plugins add losses with the ``graphopt_register_distill_losses`` hook:
``register("name", fn)`` where ``fn(batch: graphopt.LossInputs) -> Tensor`` (a scalar).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from graphopt import GraphoptError, LossFn, LossInputs
from graphopt.pass_api import RegistryView

__all__ = [
    "LossFn",
    "LossInputs",
    "adapter",
    "ce_loss",
    "feature_loss",
    "kd_loss",
    "plugin_losses",
]


def _class_last(logits: torch.Tensor) -> torch.Tensor:
    """(N, C, …) logits as (N·…, C) rows, so dense (per-pixel) outputs work too."""
    if logits.dim() <= 2:
        return logits.reshape(logits.shape[0], -1)
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T²·KL(softmax(teacher/T) ‖ softmax(student/T))``, summed over classes, divided by N."""
    t = temperature
    s_log = F.log_softmax(_class_last(student) / t, dim=-1)
    t_log = F.log_softmax(_class_last(teacher).detach() / t, dim=-1)
    kl = F.kl_div(s_log, t_log, reduction="sum", log_target=True) / student.shape[0]
    return kl * (t * t)


def feature_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    scales: Sequence[float] | None = None,
) -> torch.Tensor:
    """Mean over pairs of ``MSE(student_i, teacher_i) / scale_i`` (scale 1 when not given)."""
    if not student:
        raise ValueError("feature_loss needs at least one pair")
    terms = []
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        scale = scales[i] if scales is not None else 1.0
        terms.append(F.mse_loss(s, t.detach()) / scale)
    return torch.stack(terms).mean()


def ce_loss(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits with class indices (or class probabilities)."""
    return F.cross_entropy(student, target)


class _ChannelsLast(nn.Module):
    """A Linear over the last axis (tokens: N×L×C)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(c_in, c_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def adapter(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module | None:
    """The learned map from a student value to its teacher's shape: ``nn.Identity`` when the
    shapes agree, a 1×1 conv (a Linear for N×C or N×L×C values) when only the channel count
    differs, and None when they differ otherwise (the pair cannot be distilled)."""
    s, t = tuple(student_shape), tuple(teacher_shape)
    if s == t:
        return nn.Identity()
    if len(s) != len(t) or len(s) < 2:
        return None
    differ = [i for i in range(1, len(s)) if s[i] != t[i]]
    if differ == [1]:
        if len(s) == 2:
            return nn.Linear(s[1], t[1], bias=False)
        conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}.get(len(s))
        return conv(s[1], t[1], 1, bias=False) if conv is not None else None
    if differ == [len(s) - 1] and len(s) == 3:
        return _ChannelsLast(s[-1], t[-1])
    return None


def plugin_losses(names: Sequence[str], registry: RegistryView) -> list[tuple[LossFn, float]]:
    """Resolve ``name`` or ``name:weight`` entries against the losses plugins registered in
    ``registry`` (an unknown name is one sentence listing the known ones and naming any
    plugin that failed to register its losses)."""
    chosen = []
    for entry in names:
        name, _, weight_text = entry.partition(":")
        loss = registry.losses[name]
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise GraphoptError(
                f"loss weight in '{entry}' is not a number; write NAME or NAME:WEIGHT"
            ) from None
        chosen.append((loss, weight))
    return chosen
