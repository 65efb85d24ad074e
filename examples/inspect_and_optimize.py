"""Load a torchvision model, look at its graph, run a pipeline and write a verified artifact.

python examples/inspect_and_optimize.py [torchvision:NAME] [PIPELINE] [OUT]
"""

from __future__ import annotations

import argparse

import networkx
import torch
from rich.console import Console

import graphopt
from graphopt.report import ledger_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default="torchvision:mobilenet_v3_small")
    parser.add_argument("pipeline", nargs="?", default="cleanup")
    parser.add_argument("out", nargs="?", default="out/example.pt2")
    options = parser.parse_args()
    spec, pipeline, out = options.spec, options.pipeline, options.out
    console = Console()

    ir = graphopt.load(spec)
    console.print(ir.summary(limit=15))

    # The heaviest layers by MACs, straight from the per-node costs.
    costs = ir.costs()
    heavy = sorted(ir.graph.nodes, key=lambda n: costs[n.name].macs, reverse=True)[:5]
    for node in heavy:
        console.print(f"{node.name:30s} {ir.shape(node)!s:24s} {costs[node.name].macs:>14,} MACs")

    # Which modules feed the classifier, from the networkx view.
    graph = ir.to_networkx()
    last = next(n for n in ir.graph.nodes if n.op == "output")
    feeding = networkx.ancestors(graph, last.name)
    console.print(f"{len(graph)} nodes; the output depends on {len(feeding)} of them")

    result = graphopt.optimize(ir, pipeline, output=out)
    console.print(ledger_table(result.ledger, title=f"{spec} → {out}"))
    meta = graphopt.read_metadata(out, graphopt.get_registry().exporters)
    console.print(f"stored pipeline: {meta['pipeline']!r}; torch {meta['torch']}")
    reloaded = torch.export.load(out).module() if out.endswith(".pt2") else None
    if reloaded is not None:
        x = ir.example_inputs[0]
        console.print(
            f"reloaded artifact max abs diff: {(reloaded(x) - result.ir.gm(x)).abs().max():.2e}"
        )


if __name__ == "__main__":
    main()
