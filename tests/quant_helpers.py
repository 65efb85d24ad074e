"""Helpers shared by the quant test modules."""

from __future__ import annotations

from typing import Any

import torch
from graphopt.passes.quant import sqnr_db

from graphopt import GraphIR, PassManager, Result


def quantize(model: Any, x: Any, pipeline: str = "quant", data: Any = None, **kw: Any) -> Result:
    """Run ``pipeline`` on ``model`` traced with input ``x`` (a tensor or a tuple)."""
    ir = GraphIR.trace(model, x if isinstance(x, tuple) else (x,))
    return PassManager(pipeline, reproducer=False).run(ir, data=data, **kw)


def batches(shape: tuple[int, ...], n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor]]:
    """``n`` seeded batches of random normal inputs."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen),) for _ in range(n)]


def out_sqnr(model: Any, gm: Any, *inputs: Any) -> float:
    """Output SQNR of ``gm`` against ``model`` on ``inputs``."""
    with torch.no_grad():
        return sqnr_db(model(*inputs), gm(*inputs))


def targets(gm: Any) -> list[str]:
    """The targets of a graph's function calls, as strings."""
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
