"""Physical removal: slice parameters, then let each node's op rule resize it.

Given the channel graph and the set of atoms to remove, every space with a removed element
gets a keep mask. Parameters and buffers are sliced along their masked dims; then each
node's rule (:mod:`.ops`) recomputes its module's cached sizes (``out_channels``,
``num_features``, ``groups`` …) or rewrites the size literals among its arguments
(``view``/``reshape`` sizes, slice bounds, ``split`` sizes, ``layer_norm`` shapes) from the
kept counts, and size reads of shrunk dims keep their old values. The result is checked by
re-running the graph; a node that no longer fits is reported back so the caller can freeze
it and try again.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from graphopt import GraphIR
from graphopt.analyses import MACS, run_counting
from graphopt.fxutil import arg
from graphopt.ir import store_tensor
from graphopt.threads import one_thread

from .graph import ChannelGraph, SpaceKey, val
from .ops import Resize, RuleSet

__all__ = ["ResizeFailed", "apply_removal", "keep_masks", "known_macs", "light_copy", "observe"]


class ResizeFailed(Exception):
    """The resized graph no longer runs at ``node`` (the caller freezes it and retries)."""

    def __init__(self, node: fx.Node, cause: BaseException) -> None:
        super().__init__(f"{node.name}: {cause}")
        self.node = node
        self.cause = cause


def keep_masks(g: ChannelGraph, removed: np.ndarray) -> dict[SpaceKey, np.ndarray]:
    """Keep mask of every space that loses at least one element."""
    return {
        key: ~removed[g.comp[start : start + size]]
        for key, start, size in g.spaces_touching(removed)
    }


def apply_removal(
    ir: GraphIR, g: ChannelGraph, removed: np.ndarray, rule_set: RuleSet | None = None
) -> dict[str, int]:
    """Remove the atoms flagged in ``removed`` (one bool per component) from ``ir`` (a copy
    of the IR ``g`` analysed), resizing each node by its rule in ``rule_set`` (the one the
    analysis used, by default the built-in and plugin rules); return the MACs of each node
    of the result (see :func:`observe`)."""
    if rule_set is None:
        from .ops import rules

        rule_set = rules()
    masks = keep_masks(g, removed)
    sizes = Resize(ir, g, masks)
    _slice_tensors(ir, masks, g.aliases)
    for node in list(ir.graph.nodes):
        if node.op in ("call_module", "call_function", "call_method"):
            rule = rule_set.find(node, sizes.module)
            if rule is not None and rule.applies(node):
                rule.resize(node, sizes)
    for node in list(ir.graph.nodes):
        _pin_size_read(node, g, masks)
    ir.gm.recompile()
    ir.invalidate()
    return observe(ir)


def _slice_tensors(
    ir: GraphIR, masks: dict[SpaceKey, np.ndarray], aliases: dict[str, list[str]]
) -> None:
    """Slice every masked tensor once; its other names (tied weights) get the very same
    sliced tensor, so they stay tied."""
    by_name: dict[str, dict[int, np.ndarray]] = {}
    for key, mask in masks.items():
        if key[0] == "p":
            by_name.setdefault(key[1], {})[key[2]] = mask
    with one_thread():  # an index_select or two per tensor
        for qualname, dims in by_name.items():
            new = ir.fetch(qualname).detach()
            for d, mask in sorted(dims.items()):
                new = new.index_select(d, torch.from_numpy(np.flatnonzero(mask)))
            stored = store_tensor(ir.gm, qualname, new)
            for alias in aliases.get(qualname, ()):
                owner_path, _, name = alias.rpartition(".")
                owner = ir.gm.get_submodule(owner_path) if owner_path else ir.gm
                if name in owner._buffers:
                    owner._buffers[name] = stored
                else:
                    setattr(owner, name, stored)


def _size_read(node: fx.Node) -> tuple[fx.Node, int] | None:
    """``(tensor, dim)`` when ``node`` reads one size of a tensor (``x.size(1)``,
    ``x.shape[1]``, ``x.size()[1]``)."""
    if node.op == "call_method" and node.target == "size" and len(node.args) + len(node.kwargs) > 1:
        src, dim = node.args[0], arg(node, 1, "dim")
    elif node.op == "call_function" and node.target is operator.getitem:
        shape, dim = node.args
        if not isinstance(shape, fx.Node):
            return None
        is_shape = (
            shape.op == "call_function" and shape.target is getattr and shape.args[1] == "shape"
        )
        is_size = shape.op == "call_method" and shape.target == "size" and len(shape.args) == 1
        if not (is_shape or is_size) or shape.kwargs:
            return None
        src = shape.args[0]
    else:
        return None
    v = val(src)
    if not isinstance(dim, int) or not isinstance(v, torch.Tensor):
        return None
    assert isinstance(src, fx.Node)
    return src, dim % v.dim()


def _pin_size_read(node: fx.Node, g: ChannelGraph, masks: dict[SpaceKey, np.ndarray]) -> None:
    """A size read of a shrunk dim keeps its original value: what it computes (an attention
    scale, a mean's divisor …) then stays the same, and reshapes get their new sizes from
    their rules; a use that no longer fits fails the check and is frozen."""
    read = _size_read(node)
    if read is not None and g.key(read[0], read[1]) in masks and node.users:
        size: Any = int(val(read[0]).shape[read[1]])
        node.replace_all_uses_with(size)


class _Observer(fx.Interpreter):
    """Runs the graph on real tensors, recording each node's value as a meta tensor (shape
    and dtype only) and its MACs, and naming the node that fails."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.gm = gm
        self.macs: dict[str, int] = {}

    def _run(self, n: fx.Node) -> Any:
        return super().run_node(n)

    def run_node(self, n: fx.Node) -> Any:
        try:
            out, self.macs[n.name] = run_counting(self.gm, n, lambda: self._run(n))
        except Exception as exc:
            raise ResizeFailed(n, exc) from exc
        n.meta["val"] = fx.node.map_aggregate(out, _as_meta)
        n.meta[MACS] = self.macs[n.name]
        return out


def _as_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    return value


def observe(ir: GraphIR) -> dict[str, int]:
    """Run ``ir`` once on its example inputs (eval mode, no grad): every node's
    ``meta["val"]`` becomes a meta tensor of its value's shape and dtype, and the MACs of
    each node are returned, counted as the ``costs`` analysis counts them. This stands for
    the ``shapes`` analysis of ``ir`` from then on (until the next change), and what the
    run returned for its ``outputs`` analysis (the ledger need not run the graph again). Raise
    :class:`ResizeFailed` naming the first node that does not run. Real tensors at
    example-input sizes cost less than fake-tensor propagation's per-op overhead."""
    ir.invalidate()
    modes = {m: m.training for m in ir.gm.modules()}
    ir.gm.eval()
    try:
        with torch.no_grad():
            observer = _Observer(ir.gm)
            outputs = observer.run(*ir.example_inputs)
    finally:
        for m, training in modes.items():
            m.training = training
    ir.provide("shapes", True)
    ir.provide("outputs", outputs)
    return observer.macs


def known_macs(ir: GraphIR) -> dict[str, int] | None:
    """MACs per node when a valid ``shapes`` analysis is cached on ``ir`` (the pass manager
    computes it for its ledger), else None. Values a pass left on nodes without the
    analysis being cached may be stale, so they are not trusted."""
    if not ir.has_analysis("shapes"):
        return None
    nodes = [n for n in ir.graph.nodes if n.op != "output"]
    if all("val" in n.meta and MACS in n.meta for n in nodes):
        return {n.name: int(n.meta[MACS]) for n in nodes}
    return None


def light_copy(ir: GraphIR) -> GraphIR:
    """A copy of ``ir`` whose graph and modules are new but whose parameters and buffers are
    shared: removal replaces the tensors it slices instead of writing into them."""
    return ir.copy(share_tensors=True)
