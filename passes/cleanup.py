"""``cleanup``: remove what does nothing at inference time, exactly.

* Dropout modules and functional dropout calls whose module is in eval mode (or whose
  ``training`` argument is false) are bypassed;
* ``nn.Identity`` modules are bypassed;
* subgraphs that depend only on parameters, buffers and constants are evaluated once and
  replaced by a constant (e.g. ``self.weight.t()`` feeding a matmul);
* dead code is eliminated and submodules no node calls any more are deleted.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt import GraphIR, PassContext

_DROPOUT_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_DROPOUT_FUNCTIONS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    torch.dropout,
    torch.alpha_dropout,
    torch.feature_alpha_dropout,
    torch.feature_dropout,
}
# Functions that must never be evaluated ahead of time: their result differs per call.
_NONDETERMINISTIC = {
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.rand_like,
    torch.randn_like,
    torch.randint_like,
    torch.bernoulli,
    torch.normal,
    torch.poisson,
    torch.multinomial,
    torch.empty,
    torch.empty_like,
}


def _dropout_training_flag(node: fx.Node) -> Any:
    if "training" in node.kwargs:
        return node.kwargs["training"]
    if node.target in (
        torch.dropout,
        torch.alpha_dropout,
        torch.feature_alpha_dropout,
        torch.feature_dropout,
    ):
        return node.args[2] if len(node.args) > 2 else None
    return node.args[2] if len(node.args) > 2 else True


class Cleanup(graphopt.Pass):
    name = "cleanup"
    summary = (
        "Remove inference no-ops (dropout, identity), fold constant subgraphs, drop dead code."
    )
    exact = True

    @dataclass
    class Options:
        dropout: bool = graphopt.option(True, "bypass dropout whose module is in eval mode")
        identity: bool = graphopt.option(True, "bypass nn.Identity modules")
        constants: bool = graphopt.option(
            True, "evaluate subgraphs that depend only on parameters and constants"
        )
        dce: bool = graphopt.option(True, "eliminate dead code and unused submodules")

    def run(self, ir: GraphIR, ctx: PassContext) -> None:
        opts = self.options
        for node in list(ir.graph.nodes):
            if self._is_noop(ir, node, opts, ctx):
                ir.replace(node, node.args[0])
        if opts.constants:
            self._fold_constants(ir, ctx)
        if opts.dce:
            before = len(ir.graph.nodes)
            ir.graph.eliminate_dead_code()
            ctx.stat("dead nodes removed", before - len(ir.graph.nodes))
            _drop_unreferenced_attributes(ir, ctx)

    def _is_noop(self, ir: GraphIR, node: fx.Node, opts: Any, ctx: PassContext) -> bool:
        if not node.args or not isinstance(node.args[0], fx.Node):
            return False
        if node.op == "call_module":
            module = ir.module(node)
            if opts.identity and type(module) is nn.Identity:
                ctx.stat("identity removed")
                return True
            if opts.dropout and isinstance(module, _DROPOUT_MODULES):
                if module.training:
                    ctx.note(f"kept {node.name}: its dropout module is in training mode")
                    return False
                ctx.stat("dropout removed")
                return True
        if opts.dropout and node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
            if _dropout_training_flag(node) is False:
                ctx.stat("dropout removed")
                return True
            ctx.note(f"kept {node.name}: its dropout call is in training mode")
        return False

    def _fold_constants(self, ir: GraphIR, ctx: PassContext) -> None:
        """Evaluate nodes computed from parameters/constants only; store results as buffers."""
        constant: dict[fx.Node, bool] = {}
        for node in ir.graph.nodes:
            if node.op == "get_attr":
                constant[node] = True
            elif node.op in ("call_function", "call_method"):
                inputs = node.all_input_nodes
                constant[node] = (
                    bool(inputs)
                    and all(constant.get(i, False) for i in inputs)
                    and node.target not in _NONDETERMINISTIC
                    and not node.is_impure()
                )
            else:
                constant[node] = False
        values: dict[fx.Node, Any] = {}

        def value(node: fx.Node) -> Any:
            if node not in values:
                if node.op == "get_attr":
                    values[node] = ir.fetch(str(node.target))
                else:
                    args = fx.node.map_arg(node.args, value)
                    kwargs = fx.node.map_arg(node.kwargs, value)
                    with torch.no_grad():
                        if node.op == "call_function":
                            fn: Any = node.target
                            values[node] = fn(*args, **kwargs)
                        else:
                            self_obj, *rest = args
                            values[node] = getattr(self_obj, str(node.target))(*rest, **kwargs)
            return values[node]

        for node in list(ir.graph.nodes):
            if node.op == "get_attr" or not constant.get(node):
                continue
            if all(constant.get(u, False) for u in node.users):
                continue  # folded as part of a larger constant subgraph
            if node.target is operator.getitem and not isinstance(value(node), torch.Tensor):
                continue
            result = value(node)
            if not isinstance(result, torch.Tensor):
                continue
            name = ir.free_name(f"_folded_{node.name}")
            folded = result.detach().clone()
            if _from_parameters(node, values):
                # Still a weight: keep it trainable and counted, like what it was made from.
                ir.gm.register_parameter(name, nn.Parameter(folded, requires_grad=True))
            else:
                ir.gm.register_buffer(name, folded)
            with ir.graph.inserting_before(node):
                replacement = ir.graph.get_attr(name)
            ir.replace(node, replacement)
            ctx.stat("constant subgraphs folded")


def _from_parameters(node: fx.Node, values: dict[fx.Node, Any]) -> bool:
    """Whether the constant subgraph ending at ``node`` reads any nn.Parameter."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "get_attr" and isinstance(values.get(current), nn.Parameter):
            return True
        stack.extend(current.all_input_nodes)
    return False


def _drop_unreferenced_attributes(ir: GraphIR, ctx: PassContext) -> None:
    """Delete root-level parameters and buffers that no node reads any more."""
    used = {str(n.target).split(".")[0] for n in ir.graph.nodes if n.op == "get_attr"}
    for table in (ir.gm._parameters, ir.gm._buffers):
        for name in [k for k in table if k not in used]:
            del table[name]
            ctx.stat("unused tensors dropped")


PASSES = (Cleanup,)
