"""Op rules: for each family of ops, how it couples channels and how it is resized.

One :class:`OpRule` object per op family both *links* (tells the channel graph which
elements of the op's inputs, outputs and parameters go together, and freezes what it
cannot map) and *resizes* (updates module attributes and size arguments once channels are
gone). The analysis (:mod:`..deps`), the rewrite (:mod:`..pruner`) and the MACs estimate
(:mod:`..plan`) all ask the same :class:`RuleSet`. An op no rule covers is left whole, with
its name in the pass's report.

A plugin teaches ``prune`` a new op, say its own module type, by contributing a rule
through the ``graphopt_register_prune_rules`` hook::

    from graphopt.fxutil import node_arg

    class ScaleRule(OpRule):
        modules = (MyScale,)                    # a module with one weight per channel

        def link(self, g, node):
            g.identity(node_arg(node), node)    # channels pass through in order
            g.link(g.key(node, 1), g.param_key(str(node.target), "weight", 0))

    @graphopt.hookimpl
    def graphopt_register_prune_rules(register):
        register(ScaleRule())

The built-in set is made once, here; :func:`rules` extends a copy of it with the plugins'
rules, so nothing is changed at run time.
"""

from __future__ import annotations

from .attention import Einsum, Matmul, MultiheadAttention, ScaledDotProduct
from .base import OpRule, Resize, RuleSet, concrete, qualified_name
from .layers import Conv, Embedding, Linear
from .movement import Cat, GetItem, Move, Roll, Split, Stack
from .norms import BatchNorm, GroupNorm, LayerNorm, PReLU
from .pointwise import Elementwise, Pad, Pool, Reduce, SameLayout, Softmax
from .torchvision_leaves import PatchMergingPad, ShiftedWindowAttention
from .transformer import RMSNorm

__all__ = ["BUILTIN_RULES", "OpRule", "Resize", "RuleSet", "concrete", "qualified_name", "rules"]

#: graphopt's own rules
BUILTIN_RULES = RuleSet(
    [
        Elementwise(), SameLayout(), Pool(), Pad(), Softmax(), Reduce(),
        Move(), Roll(), GetItem(), Cat(), Stack(), Split(),
        Conv(), Linear(), Embedding(),
        BatchNorm(), GroupNorm(), LayerNorm(), PReLU(), RMSNorm(),
        MultiheadAttention(), ScaledDotProduct(), Matmul(), Einsum(),
        ShiftedWindowAttention(), PatchMergingPad(),
    ]
)  # fmt: skip


def rules() -> RuleSet:
    """The built-in rules and those plugins contribute through the
    ``graphopt_register_prune_rules`` hook (``register(rule, replace=False)``; a rule for
    an op a built-in rule covers needs ``replace=True``), from the registry in effect, so
    ``-p no:NAME`` leaves a plugin's rules out."""
    from graphopt import registry_in_effect

    found = BUILTIN_RULES
    for rule, replace in registry_in_effect().prune_rules.values():
        found = found.extended([rule], replace=replace)
    return found
