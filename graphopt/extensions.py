"""The types a plugin's contributions take and return, one group per extension point.

A pass is a :class:`graphopt.Pass` (see :mod:`graphopt.pass_api`); the other extension
points are plain functions or records described here:

* an **analysis** is an :data:`Analysis`, ``function(ir) -> result``;
* an **output format** is an :class:`Exporter`;
* a **pruning criterion** is a :data:`Criterion`, ``function(CriterionInput) -> Saliency``;
* a **distillation loss** is a :data:`LossFn`, ``function(LossInputs) -> scalar tensor``;
* a **command** is a function decorated with ``@app.command()`` on the ``typer.Typer`` the
  ``graphopt_register_commands`` hook receives.

Every name here is importable from ``graphopt`` itself; docs/plugins.md has a complete
plugin using all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .ir import Analysis, GraphIR

__all__ = [
    "Analysis",
    "Criterion",
    "CriterionInput",
    "Exporter",
    "LossFn",
    "LossInputs",
    "Saliency",
]


@dataclass(frozen=True)
class Exporter:
    """An output format, chosen by the suffix of ``-o`` (or, for ``directory`` formats, by
    ``-o`` naming a directory).

    Fields:

    ``name``
        what ``graphopt plugins`` and messages call it, e.g. ``"torchscript"``.
    ``suffixes``
        the file suffixes it writes, lower case with the dot, e.g. ``(".ts",)``; empty for
        a directory format.
    ``write(gm, example_inputs, path, metadata)``
        writes the artifact of the fx ``GraphModule`` ``gm`` at ``path``. ``path`` is a
        temporary path beside the target, in a folder of its own: write exactly that one
        file there (for a ``directory`` format, create that one folder and put everything
        inside it). Only that file or folder is moved to ``-o`` once checked; anything
        else written beside it is refused as an error of the plugin. ``metadata`` is a
        JSON-able dict (pipeline, ledger, versions) worth storing in the artifact if the
        format has room for it.
    ``load(path)``
        returns a callable that runs the written artifact on the example inputs (a module
        or a plain function); graphopt calls it once to check the artifact against the
        in-memory model before moving it into place.
    ``read_metadata(path)``
        returns the metadata ``write`` stored, or None when the format stores none.
    ``directory``
        True when the artifact is a folder rather than a file.
    ``tolerance``
        the largest relative output error accepted between the reloaded artifact and the
        in-memory model (raise it for formats whose runtime rounds differently).
    ``summary``
        one line for ``graphopt plugins`` and the docs.
    ``check(gm)``
        optional: refuse, before any pass runs, a model this format can never hold, by
        raising :class:`graphopt.GraphoptError` with one sentence (e.g. "this format needs
        a model captured from transformers"). Without it every model is accepted up front.

    An exception from ``write`` or ``load`` is reported as the plugin's fault, naming it;
    a :class:`graphopt.GraphoptError` it raises (e.g. "this format cannot hold that op")
    is shown to the user as it is.
    """

    name: str
    suffixes: tuple[str, ...]
    write: Callable[[fx.GraphModule, tuple[Any, ...], str, dict[str, Any]], None]
    load: Callable[[str], Callable[..., Any]]
    read_metadata: Callable[[str], dict[str, Any] | None]
    directory: bool = False
    tolerance: float = 1e-5
    summary: str = ""
    check: Callable[[fx.GraphModule], None] | None = None


@dataclass
class Saliency:
    """What a pruning criterion returns: elementwise importance of parameters (by qualified
    name, each map shaped like its parameter) and of activations (by node name, shaped like
    the node's value without the batch dim). Missing entries do not vote.

    The ``prune`` pass sums each map along every dim but one to score that dim's channels,
    divides by its mean so that layers of different scale compare, and averages over
    everything coupled to a channel."""

    params: dict[str, torch.Tensor] = field(default_factory=dict)
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    #: when set, ``params`` holds raw weights ``w`` whose saliency is ``|w|**power``, taken
    #: one tensor at a time while scoring (no elementwise copy of every weight at once)
    power: float | None = None


@dataclass
class CriterionInput:
    """What a pruning criterion may look at.

    ``ir`` is the model being pruned (run ``ir.gm`` to see activations or gradients);
    ``params`` the weights whose channels can be removed, by qualified name;
    ``activation_nodes`` the names of the nodes whose channels can be removed; ``data`` the
    user's calibration batches (or None); ``seed`` the ``prune(seed=…)`` option;
    ``norm_params`` the names in ``params`` that are normalisation scales (BatchNorm γ …).
    """

    ir: GraphIR
    params: dict[str, torch.Tensor]
    activation_nodes: list[str]
    data: Any
    seed: int = 0
    norm_params: set[str] = field(default_factory=set)


#: a pruning criterion: ``criterion(CriterionInput) -> Saliency``
Criterion = Callable[[CriterionInput], Saliency]


@dataclass
class LossInputs:
    """What every distillation loss sees for one batch.

    ``student_features[i]`` (already through its adapter) pairs with ``teacher_features[i]``;
    ``target`` is the batch's labels, or None for unlabelled data; ``temperature`` the
    ``distill(temperature=…)`` option.
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    student_features: Sequence[torch.Tensor]
    teacher_features: Sequence[torch.Tensor]
    target: torch.Tensor | None
    temperature: float


#: a distillation loss: ``loss(LossInputs) -> scalar tensor``, added to the objective with
#: the weight the user gives in ``distill(losses=[NAME:WEIGHT])``
LossFn = Callable[[LossInputs], torch.Tensor]
