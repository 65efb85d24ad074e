"""graphopt: a compiler for PyTorch models whose optimisations are compression techniques.

>>> import torch, graphopt
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Dropout(), torch.nn.ReLU())
>>> result = graphopt.optimize(model.eval(), "cleanup", example_inputs=(torch.randn(1, 3, 8, 8),))
>>> result.pipeline, [e.step for e in result.ledger]
('cleanup', ['(input)', 'cleanup'])
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from .errors import GraphoptError, PassCrash, PluginError
from .extensions import Analysis, Criterion, CriterionInput, Exporter, LossFn, LossInputs, Saliency
from .hookspecs import hookimpl, hookspec
from .ir import ORIGIN, GraphIR, NodeCost
from .loading import ModelSpec, load_ir
from .lowering import lower
from .lowering import read_metadata as _read_metadata
from .manager import LedgerEntry, PassManager, Result
from .measuring import Deviation, deviation, run_model
from .outputs import primary_output
from .pass_api import (
    NamePatterns,
    NoOptions,
    Pass,
    PassContext,
    input_names,
    option,
    split_batch,
)
from .plugins import (
    PluginInfo,
    PluginWarning,
    Registry,
    get_registry,
    load_registry,
    registry_in_effect,
)
from .version import __version__

__all__ = [
    "ORIGIN",
    "Analysis",
    "Criterion",
    "CriterionInput",
    "Deviation",
    "Exporter",
    "GraphIR",
    "GraphoptError",
    "LedgerEntry",
    "LossFn",
    "LossInputs",
    "ModelSpec",
    "NamePatterns",
    "NoOptions",
    "NodeCost",
    "Pass",
    "PassContext",
    "PassCrash",
    "PassManager",
    "PluginError",
    "PluginInfo",
    "PluginWarning",
    "Registry",
    "Result",
    "Saliency",
    "__version__",
    "deviation",
    "get_registry",
    "hookimpl",
    "hookspec",
    "input_names",
    "load",
    "load_registry",
    "lower",
    "optimize",
    "option",
    "primary_output",
    "read_metadata",
    "registry_in_effect",
    "run_model",
    "split_batch",
    "trace",
]


def read_metadata(
    path: str | os.PathLike[str], exporters: Mapping[str, Exporter] | None = None
) -> dict[str, Any] | None:
    """The graphopt metadata stored in an artifact (pipeline, ledger, versions, the dims it
    leaves free), read by the output format its path names: ``exporters``, else those of the
    registry in effect (plugins' formats included); None if it has none."""
    table = registry_in_effect().exporters if exporters is None else exporters
    return _read_metadata(os.fspath(path), table)


def trace(
    model: nn.Module,
    example_inputs: Sequence[Any],
    *,
    leaf_modules: Iterable[str] = (),
    concrete_args: dict[str, Any] | None = None,
    capture: str = "auto",
    input_names: Sequence[str] | None = None,
) -> GraphIR:
    """Capture a module as a :class:`GraphIR` (see :meth:`GraphIR.trace`) that knows the
    analyses of the registry in effect, plugins' included: ``capture`` is ``"auto"``
    (torch.fx, then torch.export if fx fails), ``"fx"`` or ``"export"``."""
    ir = GraphIR.trace(
        model,
        example_inputs,
        leaf_modules=leaf_modules,
        concrete_args=concrete_args,
        capture=capture,
        input_names=input_names,
    )
    ir.analyses = registry_in_effect().analyses
    return ir


def load(
    spec: str | ModelSpec,
    *,
    input_shapes: Sequence[Sequence[int]] | None = None,
    input_dtypes: Sequence[str] = (),
    weights: str | None = None,
    trust_pickle: bool = False,
    leaf_modules: Iterable[str] = (),
    concrete_args: dict[str, Any] | None = None,
    capture: str = "auto",
) -> GraphIR:
    """Load a MODEL argument as the CLI does (``torchvision:resnet18``, ``timm:resnet18``,
    ``hf:bert?num_hidden_layers=2``, ``hf:DIR``, ``pkg.mod:factory``, a ``.pt``/``.pt2``
    file) and capture it, with seeded random example inputs; the IR knows the analyses of
    the registry in effect, plugins' included. A :class:`ModelSpec` carries all the options
    at once (the keyword arguments are then ignored)."""
    if isinstance(spec, str):
        spec = ModelSpec(
            spec,
            weights=weights,
            trust_pickle=trust_pickle,
            input_shapes=[tuple(s) for s in input_shapes or []],
            input_dtypes=list(input_dtypes),
            leaf_modules=list(leaf_modules),
            concrete_args=concrete_args,
            capture=capture,
        )
    ir = load_ir(spec)
    ir.analyses = registry_in_effect().analyses
    return ir


def optimize(
    model: nn.Module | GraphIR | str,
    pipeline: str,
    *,
    example_inputs: Sequence[Any] | None = None,
    data: Any = None,
    output: str | os.PathLike[str] | None = None,
    format: str | None = None,
) -> Result:
    """Run a pipeline on a model (never mutated) and optionally lower the result to ``output``.

    ``model`` is a module (with ``example_inputs``), a traced :class:`GraphIR`, or a MODEL
    spec string as the CLI takes it (``"torchvision:resnet18"``, ``"hf:bert"``,
    ``"model.pt2"`` …). The passes are told the format ``output`` will be written in
    (``ctx.target_format``): the one its suffix names, or ``format`` (an exporter's name,
    e.g. ``"hf"`` for a transformers ``save_pretrained`` folder).
    """
    if isinstance(model, str):
        if example_inputs is None:
            ir = load(model)
        else:
            from .loading import load_model

            loaded = load_model(model)
            captured = loaded.program if loaded.program is not None else loaded.module
            assert captured is not None
            ir = GraphIR.trace(
                captured, example_inputs, source=loaded.source, input_names=loaded.input_names
            )
    elif isinstance(model, GraphIR):
        ir = model
    else:
        if example_inputs is None:
            raise GraphoptError("optimize() needs example_inputs when given a plain module")
        ir = GraphIR.trace(model, example_inputs)
    registry = get_registry()
    target_format = None
    if output is not None:
        from .lowering import check_output

        exporter = check_output(os.fspath(output), registry.exporters, format)
        if exporter.check is not None:
            exporter.check(ir.gm)
        target_format = exporter.name
    manager = PassManager(pipeline, registry=registry, target_format=target_format)
    result = manager.run(ir, data=data)
    if output is not None:
        lower(
            result.ir.gm,
            result.ir.example_inputs,
            output,
            result.metadata(),
            manager.registry.exporters,
            format,
            expected=result.outputs,
        )
    return result
