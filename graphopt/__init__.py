"""graphopt: a compiler for PyTorch models whose optimisations are compression techniques.

>>> import torch, graphopt
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Dropout(), torch.nn.ReLU())
>>> result = graphopt.optimize(model.eval(), "cleanup", example_inputs=(torch.randn(1, 3, 8, 8),))
>>> result.pipeline, [e.step for e in result.ledger]
('cleanup', ['(input)', 'cleanup'])
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from .errors import GraphoptError, PassCrash
from .hookspecs import hookimpl, hookspec
from .ir import ORIGIN, GraphIR, NodeCost
from .lowering import Exporter, lower, read_metadata
from .manager import Deviation, LedgerEntry, PassManager, Result, deviation
from .pass_api import NoOptions, Pass, PassContext, option
from .plugins import Registry, get_registry, load_registry

__version__ = "0.1.0"

__all__ = [
    "ORIGIN",
    "Deviation",
    "Exporter",
    "GraphIR",
    "GraphoptError",
    "LedgerEntry",
    "NoOptions",
    "NodeCost",
    "Pass",
    "PassContext",
    "PassCrash",
    "PassManager",
    "Registry",
    "Result",
    "__version__",
    "deviation",
    "get_registry",
    "hookimpl",
    "hookspec",
    "load",
    "load_registry",
    "lower",
    "optimize",
    "option",
    "read_metadata",
    "trace",
]


def trace(
    model: nn.Module,
    example_inputs: Sequence[Any],
    *,
    leaf_modules: Iterable[str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> GraphIR:
    """Trace a module into a :class:`GraphIR` (see :meth:`GraphIR.trace`)."""
    return GraphIR.trace(
        model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args
    )


def load(
    spec: str,
    *,
    input_shapes: Sequence[Sequence[int]] | None = None,
    input_dtypes: Sequence[str] = (),
    weights: str | None = None,
    trust_pickle: bool = False,
    leaf_modules: Iterable[str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> GraphIR:
    """Load a MODEL argument as the CLI does (``torchvision:resnet18``, ``pkg.mod:factory``,
    a ``.pt``/``.pt2`` file) and trace it, with seeded random example inputs."""
    from .loading import load_model, make_inputs

    loaded = load_model(spec, weights=weights, trust_pickle=trust_pickle)
    if input_shapes:
        inputs = make_inputs([tuple(s) for s in input_shapes], input_dtypes)
    elif loaded.example_inputs is not None:
        inputs = loaded.example_inputs
    elif loaded.input_shapes:
        inputs = make_inputs(loaded.input_shapes, input_dtypes)
    else:
        raise GraphoptError(
            f"cannot guess the input of '{spec}'; give its shape with --input-shape, e.g. "
            "--input-shape 1,3,224,224"
        )
    ir = GraphIR.trace(
        loaded.module,
        inputs,
        leaf_modules=leaf_modules,
        concrete_args=concrete_args,
        source=loaded.source,
    )
    ir.analysis("shapes")
    return ir


def optimize(
    model: nn.Module | GraphIR | str,
    pipeline: str,
    *,
    example_inputs: Sequence[Any] | None = None,
    data: Any = None,
    output: str | os.PathLike[str] | None = None,
) -> Result:
    """Run a pipeline on a model (never mutated) and optionally lower the result to ``output``.

    ``model`` is a module (with ``example_inputs``), a traced :class:`GraphIR`, or a MODEL
    spec string as the CLI takes it (``"torchvision:resnet18"``, ``"model.pt2"`` …). The
    passes are told the format ``output`` will be written in (``ctx.target_format``).
    """
    if isinstance(model, str):
        if example_inputs is None:
            ir = load(model)
        else:
            from .loading import load_model

            loaded = load_model(model)
            ir = GraphIR.trace(loaded.module, example_inputs, source=loaded.source)
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

        target_format = check_output(os.fspath(output), registry.exporters).name
    manager = PassManager(pipeline, registry=registry, target_format=target_format)
    result = manager.run(ir, data=data)
    if output is not None:
        lower(
            result.ir.gm,
            result.ir.example_inputs,
            output,
            result.metadata(),
            manager.registry.exporters,
        )
    return result
