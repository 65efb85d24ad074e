"""What an op rule is, and the set of rules the analysis and the rewrite consult."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch.fx as fx
from torch import nn

from graphopt import GraphIR, GraphoptError

from ..graph import ChannelGraph, SpaceKey, val

__all__ = ["OpRule", "Resize", "RuleSet", "concrete", "qualified_name"]


def concrete(arg: Any) -> Any:
    """An argument with every node in it replaced by its propagated value."""
    return fx.node.map_aggregate(arg, lambda a: val(a) if isinstance(a, fx.Node) else a)


def qualified_name(fn: Any) -> str | None:
    """``module.qualname`` of a function, the name a rule may give it by (so that a rule
    for a library's function does not import that library), or None."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{module}.{qualname}" if module and qualname else None


class Resize:
    """What a rule may read while rewriting its node after channels went: the kept size of
    every activation dim, and the pruned IR (whose parameters are already sliced)."""

    def __init__(self, ir: GraphIR, g: ChannelGraph, masks: dict[SpaceKey, np.ndarray]) -> None:
        self.ir = ir
        self.g = g
        #: keep mask of every space that lost elements
        self.masks = masks
        self._modules: dict[str, nn.Module] = {}

    @property
    def whole_heads(self) -> bool:
        return self.g.whole_heads

    def module(self, node: fx.Node) -> nn.Module:
        """The submodule a ``call_module`` node of the pruned IR calls."""
        found = self._modules.get(node.name)
        if found is None:
            found = self._modules[node.name] = self.ir.module(node)
        return found

    def dim(self, node: fx.Node, d: int, item: int | None = None) -> int:
        """The new size of dim ``d`` of ``node``'s value (of its tuple's ``item``-th)."""
        key = self.g.key(node, d, item)
        if key in self.masks:
            return int(self.masks[key].sum())
        v = val(node)
        if item is not None:
            v = v[item]
        return int(v.shape[d])

    def changed(self, node: fx.Node, d: int) -> bool:
        """Whether dim ``d`` of ``node``'s value lost elements."""
        return self.g.key(node, d) in self.masks

    def kept_before(self, node: fx.Node, d: int, index: int) -> int:
        """How many of the indices below ``index`` along dim ``d`` of ``node`` are kept."""
        key = self.g.key(node, d)
        if key not in self.masks:
            return index
        return int(self.masks[key][:index].sum())


class OpRule:
    """How one family of ops couples channels, and how it is rewritten once some go.

    A rule names the ops it covers with ``modules`` (module types, matched with their
    subclasses), ``functions`` (the functions of ``call_function`` nodes, or their
    ``module.qualname`` as a string, so a rule for a library's function need not import
    that library) and ``methods`` (tensor method names). For each node it covers:

    * :meth:`link` tells the channel graph which elements of the node's inputs, outputs
      and parameters must go together (``g.link``), which must stay (``g.freeze``, with a
      reason for the report), and which parameter spaces hold the output channels of a
      layer (``g.produces``) or its input channels (``g.consumers``). An exception freezes
      everything the node touches.
    * :meth:`resize` runs after the parameters were sliced: it updates the module's size
      attributes (``out_channels`` …) or the size literals among the node's arguments
      (a ``view``'s shape, a slice's bounds …) from ``sizes``.
    * :meth:`contracted` names the space the op sums over, so the MACs estimate scales.

    Subclass it, set the targets, override what applies, and contribute an instance
    through the ``graphopt_register_prune_rules`` hook (see ``docs/passes/prune.md``).
    """

    modules: tuple[type[nn.Module], ...] = ()
    functions: tuple[Callable[..., Any] | str, ...] = ()
    methods: tuple[str, ...] = ()

    def applies(self, node: fx.Node) -> bool:
        """Whether this rule can map ``node`` (a node it covers but cannot map is frozen
        as an op graphopt has no rule for)."""
        return True

    def link(self, g: ChannelGraph, node: fx.Node) -> None:
        """Declare how ``node`` couples channels; freeze what it cannot map."""
        raise NotImplementedError

    def resize(self, node: fx.Node, sizes: Resize) -> None:
        """Rewrite ``node`` (module attributes, size arguments) for its new sizes."""

    def contracted(self, g: ChannelGraph, node: fx.Node) -> SpaceKey | None:
        """The space ``node`` multiply-accumulates over, if any (its MACs scale with it)."""
        return None

    def heads(self, g: ChannelGraph, node: fx.Node) -> list[SpaceKey]:
        """The spaces of ``node``'s operands that index attention heads, if it is an
        attention whose heads sit in a dimension of their own (whole-head pruning removes
        them, keeping every head's size)."""
        return []

    def __repr__(self) -> str:
        return type(self).__name__


class RuleSet:
    """The op rules in force, looked up by module type, function or method name.

    Built once from a list of rules; :meth:`extended` gives a new set with more rules
    (a plugin's), leaving this one as it was. A target claimed twice is an error unless
    the later rule says ``replace=True``.
    """

    def __init__(self, rules: Iterable[OpRule] = ()) -> None:
        self._rules: list[OpRule] = []
        self._modules: dict[type, OpRule] = {}
        self._functions: dict[Any, OpRule] = {}
        self._methods: dict[str, OpRule] = {}
        for rule in rules:
            self._add(rule, replace=False)

    def _add(self, rule: OpRule, *, replace: bool) -> None:
        tables: list[tuple[dict[Any, OpRule], Iterable[Any]]] = [
            (self._modules, rule.modules),
            (self._functions, rule.functions),
            (self._methods, rule.methods),
        ]
        for table, targets in tables:
            for t in targets:
                if t in table and not replace:
                    raise GraphoptError(
                        f"prune rules {table[t]!r} and {rule!r} both claim {_name(t)}; "
                        "register the second with replace=True to override the first"
                    )
                table[t] = rule
        self._rules.append(rule)

    def extended(self, rules: Iterable[OpRule], *, replace: bool = False) -> RuleSet:
        """A new set holding these rules and then ``rules``."""
        out = RuleSet(self._rules)
        for rule in rules:
            out._add(rule, replace=replace)
        return out

    def __iter__(self) -> Iterator[OpRule]:
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)

    def find(self, node: fx.Node, module_of: Callable[[fx.Node], nn.Module]) -> OpRule | None:
        """The rule covering ``node``'s op, or None; ``module_of`` gives the submodule a
        ``call_module`` node calls (``ChannelGraph.module``, ``Resize.module``)."""
        if node.op == "call_module":
            return self.for_module(type(module_of(node)))
        if node.op == "call_function":
            return self.for_function(node.target)
        if node.op == "call_method":
            return self._methods.get(str(node.target))
        return None

    def for_module(self, cls: type) -> OpRule | None:
        """The rule of the nearest class in ``cls``'s method resolution order."""
        found = (self._modules.get(base) for base in cls.__mro__)
        return next((r for r in found if r is not None), None)

    def for_function(self, fn: Any) -> OpRule | None:
        """The rule for ``fn`` itself, else for its ``module.qualname``."""
        return self._functions.get(fn) or self._functions.get(qualified_name(fn))


def _name(target: Any) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, type):
        return target.__name__
    module, name = getattr(target, "__module__", None), getattr(target, "__name__", None)
    return f"{module}.{name}" if module and name else repr(target)
