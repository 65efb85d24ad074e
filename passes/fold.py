"""``fold``: fold BatchNorm into the conv or linear layer next to it, exactly.

An inference BatchNorm is a per-channel affine map ``y = x·s + t`` with
``s = γ/√(σ²+ε)`` and ``t = β − μ·s``. When it follows a conv or linear layer, the map moves
into that layer's weights: ``W' = W·s`` along the output channels and ``b' = b·s + t``; the
BatchNorm node then disappears. Handled:

* ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` (grouped too) and ``Linear`` followed by a
  BatchNorm, as modules or as functional calls (``F.conv2d``, ``F.linear``, ``F.batch_norm``);
* a BatchNorm after ``torch.cat`` along the channels of such layers' outputs: each layer
  takes its slice (all or none: a part from anything else leaves the BatchNorm whole);
* every ``_BatchNorm`` module (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``), torchvision's
  ``FrozenBatchNorm2d`` kept as a leaf, and, with ``elementwise``, a multiply/add/subtract/
  divide by a per-channel constant, which is what a traced ``FrozenBatchNorm2d`` becomes;
* with ``into_next``, a BatchNorm directly before a conv or linear, where that is exact.

Every BatchNorm it must leave (no running statistics, a conv whose output has other users,
a conv shared by several call sites, zero padding after the BatchNorm …) is named with the
reason in the pass's report. The arithmetic runs in float64 and is cast back once.

>>> import torch, graphopt
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
>>> result = graphopt.optimize(model, "fold", example_inputs=(torch.randn(1, 3, 8, 8),))
>>> result.ledger[-1].stats, [type(m).__name__ for m in result.ir.gm.children()]
({'BN folded': 1}, ['Conv2d'])
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

import graphopt
from graphopt import GraphIR, GraphoptError, PassContext
from graphopt.fxutil import arg, set_arg
from graphopt.ir import fetch, free_name, store_tensor

__all__ = ["Fold"]

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T_ARGS = (*_CONV_ARGS[:5], "output_padding", "groups", "dilation")
_LINEAR_ARGS = ("input", "weight", "bias")
_BN_ARGS = (
    "input",
    "running_mean",
    "running_var",
    "weight",
    "bias",
    "training",
    "momentum",
    "eps",
)

# functional layer -> (kind, spatial dims, argument names)
_FUNCTIONAL_LAYERS: dict[Any, tuple[str, int, tuple[str, ...]]] = {
    F.conv1d: ("conv", 1, _CONV_ARGS),
    F.conv2d: ("conv", 2, _CONV_ARGS),
    F.conv3d: ("conv", 3, _CONV_ARGS),
    F.conv_transpose1d: ("conv_t", 1, _CONV_T_ARGS),
    F.conv_transpose2d: ("conv_t", 2, _CONV_T_ARGS),
    F.conv_transpose3d: ("conv_t", 3, _CONV_T_ARGS),
    F.linear: ("linear", 0, _LINEAR_ARGS),
}
# module layer whose forward is torch's own -> (kind, spatial dims); a subclass that
# overrides forward may compute something else, so it is not trusted.
_MODULE_LAYERS: dict[Any, tuple[str, int]] = {
    nn.Conv1d.forward: ("conv", 1),
    nn.Conv2d.forward: ("conv", 2),
    nn.Conv3d.forward: ("conv", 3),
    nn.ConvTranspose1d.forward: ("conv_t", 1),
    nn.ConvTranspose2d.forward: ("conv_t", 2),
    nn.ConvTranspose3d.forward: ("conv_t", 3),
    nn.Linear.forward: ("linear", 0),
}
_BN_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward}

# elementwise ops that are affine in one operand when the other is a constant
_MUL = {operator.mul, torch.mul, "mul"}
_ADD = {operator.add, torch.add, "add"}
_SUB = {operator.sub, torch.sub, "sub"}
_DIV = {operator.truediv, torch.div, "div"}
# pure, deterministic ops a constant operand may be computed with
_PURE_FUNCTIONS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    operator.pow,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.neg,
    torch.sqrt,
    torch.rsqrt,
    torch.reciprocal,
    torch.reshape,
    torch.unsqueeze,
    torch.squeeze,
    torch.flatten,
}
_PURE_METHODS = {
    "add",
    "sub",
    "mul",
    "div",
    "neg",
    "pow",
    "sqrt",
    "rsqrt",
    "reciprocal",
    "reshape",
    "view",
    "unsqueeze",
    "squeeze",
    "flatten",
    "contiguous",
    "float",
    "double",
    "half",
    "to",
    "detach",
    "clone",
}
_AFFINE_OPS = _MUL | _ADD | _SUB | _DIV
_CAT = {torch.cat, torch.concat, torch.concatenate}
_NOT_CONSTANT = object()
_ERASABLE = ("get_attr", "call_function", "call_method")


def _frozen_bn_type() -> type[nn.Module] | None:
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
    except ImportError:  # torchvision is optional for this pass
        return None
    return FrozenBatchNorm2d


@dataclass
class _Layer:
    """A conv or linear call site, a module call or a functional call."""

    node: fx.Node
    kind: str  # "conv", "conv_t" or "linear"
    spatial: int
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int
    module: nn.Module | None = None
    argnames: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return _label(self.node)

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1] * self.groups if self.kind == "conv_t" else self.weight.shape[0]

    def input(self) -> Any:
        """The data argument of the call."""
        if self.module is not None:
            return self.node.args[0] if self.node.args else self.node.kwargs.get("input")
        return _arg(self.node, self.argnames, "input")

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.weight, self.bias) if t is not None]

    def channel_axis(self, rank: int | None) -> int | None:
        """The axis of the output holding the layer's channels, or None if it is unclear."""
        if rank is None:
            return None
        if self.kind == "linear":
            return rank - 1
        return 1 if rank == self.spatial + 2 else None  # unbatched input: leave it alone

    def zero_padded(self) -> bool:
        """Whether the layer pads its input with zeros (which an input shift would not move)."""
        if self.module is not None:
            if self.kind == "linear" or self.module.padding_mode != "zeros":
                return False
            padding, dilation = self.module.padding, self.module.dilation
        else:
            padding = _arg(self.node, self.argnames, "padding", 0)
            dilation = _arg(self.node, self.argnames, "dilation", 1)
        if padding == "valid":
            return False
        if padding == "same":
            kernel = self.weight.shape[2:]
            dil = dilation if isinstance(dilation, Sequence) else [dilation] * len(kernel)
            return any(d * (k - 1) for d, k in zip(dil, kernel, strict=True))
        return any(p != 0 for p in (padding if isinstance(padding, Sequence) else [padding]))


#: one input of a concatenation: its node, its layer (or why it has none), its channel count
_Part = tuple[fx.Node, _Layer | str, int]


@dataclass
class _Norm:
    """A BatchNorm-like call: its data input and the affine map it applies (float64)."""

    node: fx.Node
    input: fx.Node
    scale: torch.Tensor
    shift: torch.Tensor
    training: bool
    needs_rank: int | None  # the input rank BatchNorm needs to normalise the channel axis


def _label(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _arg(node: fx.Node, names: Sequence[str], name: str, default: Any = None) -> Any:
    return arg(node, names.index(name), name, default)


def _set_arg(node: fx.Node, names: Sequence[str], name: str, value: Any) -> None:
    set_arg(node, names.index(name), name, value)


def _tensor(m: nn.Module, name: str) -> torch.Tensor | None:
    """A module's parameter or buffer ``name`` (None if it has none)."""
    value = getattr(m, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks) or parametrize.is_parametrized(m)


class _Uses:
    """How many graph nodes use each parameter or buffer, to tell shared layers apart."""

    def __init__(self, ir: GraphIR) -> None:
        self.count: Counter[int] = Counter()
        self._alive: list[torch.Tensor] = []  # ids stay unique only while tensors live
        for node in ir.graph.nodes:
            if node.op == "call_module":
                self._add(_module_tensors(ir.module(node)), 1)
            elif node.op == "get_attr":
                obj = fetch(ir.gm, str(node.target))
                tensors = _module_tensors(obj) if isinstance(obj, nn.Module) else [obj]
                self._add([t for t in tensors if isinstance(t, torch.Tensor)], len(node.users))

    def _add(self, tensors: Iterable[torch.Tensor], n: int) -> None:
        for t in tensors:
            self.count[id(t)] += n
            self._alive.append(t)

    def sites(self, layer: _Layer) -> int:
        return max(self.count[id(t)] for t in layer.tensors())

    def moved(self, old: Iterable[torch.Tensor], new: Iterable[torch.Tensor]) -> None:
        """One node stopped using ``old`` and uses ``new`` instead."""
        self._add(old, -1)
        self._add(new, 1)


def _module_tensors(m: nn.Module) -> list[torch.Tensor]:
    return [*m.parameters(), *m.buffers()]


class _Constants:
    """Values of graph nodes computed only from stored tensors and literals (memoised)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.memo: dict[fx.Node, Any] = {}

    def __call__(self, arg: Any) -> Any:
        if not isinstance(arg, fx.Node):
            return arg
        if arg not in self.memo:
            self.memo[arg] = self._evaluate(arg)
        return self.memo[arg]

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            return fetch(self.gm, str(node.target))
        pure = (node.op == "call_function" and node.target in _PURE_FUNCTIONS) or (
            node.op == "call_method" and node.target in _PURE_METHODS
        )
        if not pure:
            return _NOT_CONSTANT
        missing = False

        def value(n: fx.Node) -> Any:
            nonlocal missing
            v = self(n)
            missing = missing or v is _NOT_CONSTANT
            return v

        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        if missing:
            return _NOT_CONSTANT
        with torch.no_grad():
            if node.op == "call_method":
                return getattr(args[0], str(node.target))(*args[1:], **kwargs)
            return node.target(*args, **kwargs)  # type: ignore[operator]

    def tensor(self, arg: Any) -> torch.Tensor | None:
        v = self(arg)
        return v.detach() if isinstance(v, torch.Tensor) else None


class Fold(graphopt.Pass):
    """Fold BatchNorm (and per-channel constant affine ops) into adjacent conv/linear layers."""

    name = "fold"
    summary = "Fold BatchNorm into the conv or linear layer next to it, exactly."
    exact = True

    @dataclass
    class Options:
        training: bool = graphopt.option(
            False,
            "fold the running statistics of BatchNorm layers in training mode (which "
            "normalise with batch statistics); without it such a model is refused",
        )
        into_next: bool = graphopt.option(
            False,
            "also fold a BatchNorm into the conv or linear right after it, where exact "
            "(no zero padding, not transposed)",
        )
        clone_shared: bool = graphopt.option(
            False,
            "give a conv or linear used at several call sites a private folded copy at each "
            "site (exact, but adds parameters); otherwise its BatchNorm is kept",
        )
        elementwise: bool = graphopt.option(
            True,
            "also fold a multiply/add/subtract/divide by a per-channel constant after a conv "
            "or linear (a traced FrozenBatchNorm2d looks like that)",
        )

    def run(self, ir: GraphIR, ctx: PassContext) -> None:
        ir.analysis("shapes")  # ranks of the original nodes; folding does not change them
        self.ir, self.ctx = ir, ctx
        self.consts = _Constants(ir.gm)
        self.uses = _Uses(ir)
        self.gone: set[fx.Node] = set()
        norms = self._norms()
        self._refuse_training(norms)
        no_layer: list[_Norm] = []
        for node in list(ir.graph.nodes):
            if node in self.gone:
                continue
            if node in norms:
                if not self._fold_into_previous(norms[node]):
                    no_layer.append(norms[node])
            elif self.options.elementwise and node.target in _AFFINE_OPS:
                self._fold_elementwise(node)
        left = [n for n in no_layer if not (self.options.into_next and self._fold_into_next(n))]
        if left:
            names = ", ".join(_label(n.node) for n in left[:6]) + (" …" if len(left) > 6 else "")
            hint = "" if self.options.into_next else "; fold(into_next=true) tries the next layer"
            ctx.note(f"kept {len(left)} BatchNorm with no conv or linear before it: {names}{hint}")

    # -- finding BatchNorms -----------------------------------------------------------------

    def _norms(self) -> dict[fx.Node, _Norm]:
        """Every BatchNorm call in the graph that normalises with stored statistics."""
        found = {}
        for node in self.ir.graph.nodes:
            norm = self._as_norm(node)
            if isinstance(norm, str):
                self.ctx.note(f"kept {_label(node)}: {norm}")
            elif norm is not None:
                found[node] = norm
        return found

    def _as_norm(self, node: fx.Node) -> _Norm | str | None:
        """A BatchNorm call as a _Norm, a reason it cannot be folded, or None if it is none."""
        frozen = _frozen_bn_type()
        if node.op == "call_module":
            m = self.ir.module(node)
            is_bn = isinstance(m, _BatchNorm) and type(m).forward in _BN_FORWARDS
            is_frozen = frozen is not None and type(m).forward is frozen.forward
            if not (is_bn or is_frozen):
                return None
            if _has_hooks(m):
                return "it has hooks or parametrizations that folding would drop"
            if m.running_mean is None:
                return _NO_STATS
            training = bool(is_bn and m.training)
            kept = ("running_mean", "running_var", "weight", "bias")
            stats: tuple[Any, ...] = (*(_tensor(m, k) for k in kept), m.eps)
            data = node.args[0] if node.args else node.kwargs.get("input")
            rank = 4 if is_frozen else next((r for c, r in _BN_RANK if isinstance(m, c)), None)
        elif node.op == "call_function" and node.target is F.batch_norm:
            names = _BN_ARGS
            mean, var = (self.consts(_arg(node, names, k)) for k in ("running_mean", "running_var"))
            if mean is None or var is None:
                return _NO_STATS
            training = _arg(node, names, "training", False)
            stats = (mean, var, *(self.consts(_arg(node, names, k)) for k in ("weight", "bias")))
            stats += (self.consts(_arg(node, names, "eps", 1e-5)),)
            if not isinstance(training, bool) or any(v is _NOT_CONSTANT for v in stats):
                return "its statistics or flags are computed in the graph, not stored"
            data, rank = _arg(node, names, "input"), None
        else:
            return None
        if not isinstance(data, fx.Node):
            return None
        scale, shift = _bn_affine(*stats)
        return _Norm(node, data, scale, shift, training, rank)

    def _refuse_training(self, norms: dict[fx.Node, _Norm]) -> None:
        training = [n for n in norms.values() if n.training]
        if training and not self.options.training:
            raise GraphoptError(
                f"BatchNorm '{_label(training[0].node)}' is in training mode, where it "
                "normalises with batch statistics that folding cannot keep; call model.eval() "
                "before optimising, or pass fold(training=true) to fold its running statistics"
            )

    # -- folding after a layer --------------------------------------------------------------

    def _fold_into_previous(self, norm: _Norm) -> bool:
        """Fold ``norm`` into the layer producing its input, or into the layers whose outputs
        its input concatenates; False if no layer produces it."""
        layer = self._as_layer(norm.input)
        if layer is None:
            return self._fold_into_parts(norm)
        why = self._why_not_after(layer, norm.node) or self._why_not_normalised(layer, norm)
        if why or not isinstance(layer, _Layer):
            self.ctx.note(f"kept {_label(norm.node)}: {_label(norm.input)} {why}")
            return True
        self._apply_after(layer, norm.node, norm.scale, norm.shift)
        self.ctx.stat("BN folded")
        return True

    def _why_not_after(self, layer: _Layer | str, node: fx.Node) -> str | None:
        """Why the layer's output cannot take over the affine map at ``node`` (None if it can)."""
        if isinstance(layer, str):
            return layer
        others = [_label(u) for u in layer.node.users if u is not node and not _reads_metadata(u)]
        if others:
            return f"also feeds {', '.join(others)}, which need its unnormalised output"
        return self._why_shared(layer)

    def _why_not_normalised(self, layer: _Layer | str, norm: _Norm) -> str | None:
        """Why BatchNorm's channel axis (axis 1) is not the layer's channel axis, if it is not."""
        if isinstance(layer, str):
            return layer
        rank = _rank(self.ir, layer.node)
        if layer.channel_axis(rank) != 1 or norm.needs_rank not in (None, rank):
            return f"gives a {rank}-D output whose channels are not on the axis BatchNorm uses"
        if norm.scale.numel() != layer.out_channels:
            return f"has {layer.out_channels} channels but the BatchNorm {norm.scale.numel()}"
        return None

    def _why_shared(self, layer: _Layer) -> str | None:
        sites = self.uses.sites(layer)
        if sites > 1 and not self.options.clone_shared:
            return (
                f"is used at {sites} call sites, and folding would change the others; "
                "fold(clone_shared=true) gives each site its own copy"
            )
        return None

    def _fold_into_parts(self, norm: _Norm) -> bool:
        """Fold ``norm`` after ``torch.cat`` along the channels, slice by slice, into the
        layers producing the parts; False if no part comes from a layer. Only whole: when
        any part cannot take its slice, the BatchNorm stays as it is (see docs/passes/fold.md)."""
        cat = norm.input
        parts = self._parts(cat)
        if parts is None:
            return False
        why = self._why_not_parts(cat, parts, norm)
        if why is not None:
            self.ctx.note(f"kept {_label(norm.node)}: {why}")
            return True
        c = sum(width for _, _, width in parts)
        scale, shift, start = norm.scale.expand(c), norm.shift.expand(c), 0
        for _, layer, width in parts:
            assert isinstance(layer, _Layer)
            self._scale_outputs(layer, scale[start : start + width], shift[start : start + width])
            start += width
        self._drop(norm.node, cat)
        self.ctx.stat("BN folded")
        return True

    def _parts(self, node: fx.Node) -> list[_Part] | None:
        """The parts ``node`` concatenates, each with its layer (or why it cannot be
        rewritten) and its width along dim 1, if ``node`` is a ``torch.cat`` of layer
        outputs only (a part from anything else leaves nothing to fold into for it)."""
        if node.op != "call_function" or node.target not in _CAT:
            return None
        tensors = arg(node, 0, "tensors")
        if not isinstance(tensors, list | tuple) or not all(
            isinstance(t, fx.Node) for t in tensors
        ):
            return None
        parts = []
        for t in tensors:
            layer, shape = self._as_layer(t), self.ir.shape(t)
            if layer is None:
                return None
            parts.append((t, layer, shape[1] if shape and len(shape) > 1 else -1))
        return parts

    def _why_not_parts(self, cat: fx.Node, parts: list[_Part], norm: _Norm) -> str | None:
        """Why the slices of ``norm`` cannot move into the layers ``cat`` concatenates."""
        rank = _rank(self.ir, cat)
        dim = arg(cat, 1, "dim", 0)
        if rank is None or not isinstance(dim, int) or dim % rank != 1:
            return f"{_label(cat)} concatenates along dim {dim}, not the channels it normalises"
        if norm.needs_rank not in (None, rank):
            return f"{_label(cat)} gives a {rank}-D output, not the rank it normalises"
        others = [_label(u) for u in cat.users if u is not norm.node]
        if others:
            return f"{_label(cat)} also feeds {', '.join(others)}, which need it unnormalised"
        start, seen = 0, set()
        for t, layer, width in parts:
            where = f"channels {start}-{start + width - 1} come from {_label(t)}, which"
            start += width
            why = self._why_not_after(layer, cat)
            if why is None and isinstance(layer, _Layer):
                if layer.node in seen:
                    why = "appears twice in the concatenation"
                elif layer.channel_axis(rank) != 1 or layer.out_channels != width:
                    why = "does not put its channels where the concatenation does"
                seen.add(layer.node)
            if why:
                return f"{where} {why}"
        if norm.scale.numel() not in (1, start):
            return f"{_label(cat)} has {start} channels but the BatchNorm {norm.scale.numel()}"
        return None

    def _apply_after(
        self, layer: _Layer, node: fx.Node, scale: torch.Tensor, shift: torch.Tensor
    ) -> None:
        """Move ``y = x·scale + shift`` (per output channel) into ``layer``; drop ``node``."""
        self._scale_outputs(layer, scale, shift)
        self._drop(node, layer.node)

    def _drop(self, node: fx.Node, by: fx.Node) -> None:
        """Replace ``node`` by ``by``, whose value is now ``node``'s (so it takes ``node``'s
        origin), and erase what only ``node`` used."""
        inputs = [n for n in node.all_input_nodes if n is not by]
        self.ir.replace(node, by)
        self.gone.add(node)
        self._erase_dead(inputs)

    def _scale_outputs(self, layer: _Layer, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Make ``layer`` compute ``y·scale + shift`` (per output channel) instead of ``y``."""
        w = layer.weight.detach().double()
        b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(1).double()
        c = layer.out_channels
        scale, shift = scale.expand(c), shift.expand(c)
        if layer.kind == "conv_t":  # weight is (in, out/groups, k…): scale the out axis per group
            g = layer.groups
            grouped = w.reshape(g, w.shape[0] // g, *w.shape[1:])
            per_group = scale.reshape(g, 1, c // g, *[1] * layer.spatial)
            w = (grouped * per_group).reshape(w.shape)
        else:
            w = w * scale.reshape(c, *[1] * (w.dim() - 1))
        self._store(layer, w, b * scale + shift)

    def _fold_elementwise(self, node: fx.Node) -> None:
        """Fold a multiply/add/subtract/divide by a per-channel constant into the layer before."""
        if node.op not in ("call_function", "call_method") or node.kwargs or len(node.args) != 2:
            return
        layers = ((i, self._as_layer(a)) for i, a in enumerate(node.args) if isinstance(a, fx.Node))
        i, layer = next(((i, x) for i, x in layers if isinstance(x, _Layer)), (0, None))
        if layer is None:
            return
        rank = _rank(self.ir, layer.node)
        const = _per_channel(self.consts(node.args[1 - i]), layer, rank, self.ir.dtype(layer.node))
        if const is None or self._why_not_after(layer, node) is not None:
            return
        one, zero, op = torch.ones_like(const), torch.zeros_like(const), node.target
        if op in _MUL:
            scale, shift = const, zero
        elif op in _ADD:
            scale, shift = one, const
        elif op in _SUB:
            scale, shift = (one, -const) if i == 0 else (-one, const)
        elif op in _DIV and i == 0 and bool((const != 0).all()):
            scale, shift = 1 / const, zero
        else:
            return
        self._apply_after(layer, node, scale, shift)
        self.ctx.stat("affine ops folded")

    # -- folding before a layer ---------------------------------------------------------------

    def _fold_into_next(self, norm: _Norm) -> bool:
        """Fold ``norm`` into the one layer that consumes it, where that is exact."""
        users = list(norm.node.users)
        layer = self._as_layer(users[0]) if len(users) == 1 else None
        if layer is None:
            return False
        why = self._why_not_before(layer, norm)
        if why or not isinstance(layer, _Layer):
            self.ctx.note(f"kept {_label(norm.node)}: {why}")
            return True
        w = layer.weight.detach().double()
        b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(1).double()
        out, per_group, g = w.shape[0], w.shape[1], layer.groups
        # input channel j of output o is channel (group of o)·per_group + j of the BN
        kernel = [1] * (w.dim() - 2)
        s = norm.scale.reshape(g, per_group).repeat_interleave(out // g, 0)
        t = norm.shift.reshape(g, per_group).repeat_interleave(out // g, 0)
        bias = b + (w * t.reshape(out, per_group, *kernel)).sum(tuple(range(1, w.dim())))
        self._store(layer, w * s.reshape(out, per_group, *kernel), bias)
        # not ir.replace: the BN's input keeps its own provenance, its value did not change
        norm.node.replace_all_uses_with(norm.input)
        inputs = norm.node.all_input_nodes
        self.ir.graph.erase_node(norm.node)
        self.gone.add(norm.node)
        self._erase_dead(inputs)
        self.ctx.stat("BN folded into next layer")
        return True

    def _why_not_before(self, layer: _Layer | str, norm: _Norm) -> str | None:
        """Why ``norm`` cannot move into the layer that consumes it (None if it can)."""
        if isinstance(layer, str):
            return f"the next layer {layer}"
        if layer.input() is not norm.node:
            return f"it feeds {layer.label} as a weight, not as its input"
        if layer.kind == "conv_t":
            return (
                f"the next layer {layer.label} is a transposed conv, which adds a varying "
                "number of taps per output position, so the shift cannot become its bias"
            )
        rank = _rank(self.ir, norm.input)
        in_channels = layer.weight.shape[1] * layer.groups
        if layer.channel_axis(rank) != 1 or norm.needs_rank not in (None, rank):
            return f"its {rank}-D input does not put channels where {layer.label} reads them"
        if norm.scale.numel() != in_channels:
            return f"it has {norm.scale.numel()} channels but {layer.label} reads {in_channels}"
        if layer.zero_padded():
            return (
                f"the next layer {layer.label} pads with zeros, which the BatchNorm's shift "
                "would have moved, so folding into it is inexact"
            )
        return self._why_shared(layer)

    # -- layers ---------------------------------------------------------------------------------

    def _as_layer(self, node: fx.Node) -> _Layer | str | None:
        """The conv/linear call at ``node``, a reason it cannot be rewritten, or None."""
        if node.op == "call_module":
            m = self.ir.module(node)
            kind = _MODULE_LAYERS.get(type(m).forward)
            if kind is None:
                return None
            if _has_hooks(m):
                return "has hooks or parametrizations that folding would drop"
            weight = _tensor(m, "weight")
            assert weight is not None
            groups = getattr(m, "groups", 1)
            return _Layer(node, *kind, weight, _tensor(m, "bias"), groups, module=m)
        if node.op != "call_function" or node.target not in _FUNCTIONAL_LAYERS:
            return None
        kind_name, spatial, names = _FUNCTIONAL_LAYERS[node.target]
        weight, bias = _arg(node, names, "weight"), _arg(node, names, "bias")
        stored = [a for a in (weight, bias) if a is not None]
        if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in stored):
            return "computes its weight or bias in the graph instead of storing it"
        groups = _arg(node, names, "groups", 1) if kind_name != "linear" else 1
        if not isinstance(groups, int):
            return "has a computed number of groups"
        # fetched afresh, not memoised: an earlier fold may have rewritten them
        w = fetch(self.ir.gm, str(weight.target))
        b = fetch(self.ir.gm, str(bias.target)) if bias is not None else None
        return _Layer(node, kind_name, spatial, w, b, groups, argnames=names)

    def _erase_dead(self, nodes: Iterable[fx.Node]) -> None:
        """Erase the given nodes, and what only they used, once nothing uses them; drop the
        attributes only they read, so folded statistics do not linger as parameters."""
        work = list(nodes)
        while work:
            node = work.pop()
            if node in self.gone or node.users or node.op not in _ERASABLE or node.is_impure():
                continue
            work.extend(node.all_input_nodes)
            self.ir.graph.erase_node(node)
            self.gone.add(node)
            if node.op == "get_attr":
                _drop_attr(self.ir, str(node.target))

    def _store(self, layer: _Layer, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Write the folded weight and bias into ``layer``, privately if it is shared."""
        dtype = layer.weight.dtype
        weight, bias = weight.to(dtype), bias.to(dtype)
        clone = self.uses.sites(layer) > 1
        if clone:
            self.ctx.stat("shared layers cloned")
        old = layer.tensors()
        grad = layer.weight.requires_grad
        if layer.module is not None:
            m = layer.module
            if clone:
                m = copy.deepcopy(m)
                path = free_name(self.ir.gm, f"{layer.node.target}_folded")
                self.ir.gm.add_submodule(path, m)
                layer.node.target = path
            m.weight = nn.Parameter(weight, requires_grad=grad)
            m.bias = nn.Parameter(bias, requires_grad=grad)
            self.uses.moved(old, [m.weight, m.bias])
            return
        new = []
        for key, value in (("weight", weight), ("bias", bias)):
            arg = _arg(layer.node, layer.argnames, key)
            if isinstance(arg, fx.Node) and not clone:
                new.append(store_tensor(self.ir.gm, str(arg.target), value))
                continue
            target = free_name(self.ir.gm, f"{layer.node.name}_folded_{key}")
            if isinstance(layer.weight, nn.Parameter):
                self.ir.gm.register_parameter(target, nn.Parameter(value, requires_grad=grad))
            else:
                self.ir.gm.register_buffer(target, value)
            with self.ir.graph.inserting_before(layer.node):
                _set_arg(layer.node, layer.argnames, key, self.ir.graph.get_attr(target))
            new.append(fetch(self.ir.gm, target))
            if isinstance(arg, fx.Node):
                self._erase_dead([arg])
        self.uses.moved(old, new)


_NO_STATS = (
    "it has no running statistics (track_running_stats=False), so it normalises with each "
    "batch's own statistics, which no fixed weight can reproduce"
)
_BN_RANK = ((nn.BatchNorm2d, 4), (nn.BatchNorm3d, 5))


def _rank(ir: GraphIR, node: fx.Node) -> int | None:
    shape = ir.shape(node)
    return None if shape is None else len(shape)


def _bn_affine(
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm's inference map as ``x·scale + shift``, in float64."""
    mean, var = mean.detach().double(), var.detach().double()
    scale = torch.rsqrt(var + float(eps))
    if gamma is not None:
        scale = scale * gamma.detach().double()
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta.detach().double()
    return scale, shift


def _per_channel(
    const: Any, layer: _Layer, rank: int | None, out_dtype: torch.dtype | None
) -> torch.Tensor | None:
    """A constant operand as a float64 vector over the layer's channels, if it is one.

    It must broadcast only along the channel axis (so the op keeps the output's shape) and
    not change the output's dtype.
    """
    axis = layer.channel_axis(rank)
    if axis is None or rank is None or isinstance(const, bool):
        return None
    if isinstance(const, int | float):
        return torch.tensor([float(const)], dtype=torch.float64)
    if not isinstance(const, torch.Tensor) or const.is_complex():
        return None
    if const.dim() > rank or (const.dim() > 0 and const.dtype != out_dtype):
        return None
    shape = [1] * (rank - const.dim()) + list(const.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != axis):
        return None
    if shape[axis] not in (1, layer.out_channels):
        return None
    return const.detach().double().reshape(-1)


def _drop_attr(ir: GraphIR, target: str) -> None:
    for node in ir.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            t = str(node.target)
            if t == target or t.startswith(target + ".") or target.startswith(t + "."):
                return
    owner_path, _, name = target.rpartition(".")
    owner = fetch(ir.gm, owner_path) if owner_path else ir.gm
    if hasattr(owner, name):
        delattr(owner, name)


PASSES = (Fold,)


#: what a node may read of a tensor without reading its values (folding keeps all of them)
_METADATA_ATTRS = {"shape", "ndim", "dtype", "device", "layout", "is_cuda", "requires_grad"}
_METADATA_METHODS = {"size", "dim", "ndimension", "numel", "get_device"}


def _reads_metadata(node: fx.Node) -> bool:
    """Whether ``node`` reads only its input's shape, rank, dtype or device (timm's
    ``BatchNormAct2d`` asserts on ``x.ndim``), which a fold leaves as they were."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _METADATA_ATTRS
    return node.op == "call_method" and node.target in _METADATA_METHODS
