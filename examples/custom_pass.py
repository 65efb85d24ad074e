"""Write a pass in your own code and run it without packaging a plugin.

The pass replaces every ReLU6 (module or functional) by a plain ReLU clipped with
``clamp(max=6)`` — the same function, written so that later passes and exporters see only
ops they know — and demonstrates options, notes and counters. It is exact, and the ledger
proves it.

    python examples/custom_pass.py
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

import graphopt
from graphopt.report import ledger_table


class UnfoldRelu6(graphopt.Pass):
    name = "unfold-relu6"
    summary = "Rewrite ReLU6 as clamp(relu(x), max=6)."
    exact = True

    @dataclass
    class Options:
        limit: float = graphopt.option(6.0, "upper clip value (6 keeps the pass exact)")

    def run(self, ir: graphopt.GraphIR, ctx: graphopt.PassContext) -> None:
        relu6 = ir.nodes(module_type=nn.ReLU6) + ir.nodes(target=F.relu6)
        for node in relu6:
            with ir.graph.inserting_before(node):
                relu = ir.graph.call_function(torch.relu, (node.args[0],))
                clipped = ir.graph.call_method("clamp", (relu,), {"max": self.options.limit})
            ir.replace(node, clipped)
            ctx.stat("relu6 rewritten")
        if not relu6:
            ctx.note("the model has no ReLU6")


@graphopt.hookimpl
def graphopt_register_passes(register):
    register(UnfoldRelu6)


def main() -> None:
    import sys

    registry = graphopt.load_registry(extra=[sys.modules[__name__]])
    ir = graphopt.load("torchvision:mobilenet_v2", input_shapes=[(2, 3, 96, 96)])
    result = graphopt.PassManager("cleanup,unfold-relu6", registry=registry).run(ir)
    Console().print(ledger_table(result.ledger, title="mobilenet_v2 with a custom pass"))
    print(result.ledger[-1].stats)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    main()
