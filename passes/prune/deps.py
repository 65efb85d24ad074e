"""Channel-dependency analysis: which channels of which tensors must be removed together.

Every dimension of every tensor in the graph (activations, parameters, buffers) is a
*space* of ``size`` elements, one per index. Each op declares how the elements of its
inputs' spaces correspond to those of its outputs (elementwise ops identify them, ``cat``
offsets them, reshapes map blocks, a convolution ties its input channels to its weight's
input dimension and its output channels to the weight's output dimension …). The connected
components of that element graph are *atoms*: sets of channel indices that can only be
removed all at once. An atom is prunable when it contains an output channel of a weighted
layer (a *producer*) and no *frozen* element; an op whose channel mapping cannot be proven
freezes the elements it touches and records why. Atoms that share a space form a *group*
(one coupled set of layers), the unit of per-layer ratios and rounding.

Shapes come from the fake-tensor propagation of the IR (``node.meta["val"]``); nothing is
run on real data.
"""

from __future__ import annotations

import operator
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn
from torch.utils import _pytree as pytree

from graphopt import GraphIR

__all__ = ["ChannelGraph", "SpaceKey", "analyse"]

#: ("n", node name, tuple item or None, dim) for activations; ("p", qualified name, dim)
#: for parameters and buffers (a ``get_attr`` node's dims are its tensor's dims)
SpaceKey = tuple


# -- op tables ------------------------------------------------------------------------------

_ELEMENTWISE_FUNCS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.abs,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.abs, torch.pow, torch.exp,
    torch.sqrt, torch.rsqrt, torch.sigmoid, torch.tanh, torch.relu, torch.clamp, torch.where,
    torch.maximum, torch.minimum, torch.sign, torch.erf, torch.square, torch.reciprocal,
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh,
    F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.hardtanh, F.logsigmoid,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "neg", "abs", "pow", "exp", "sqrt", "rsqrt", "sigmoid",
    "tanh", "relu", "clamp", "clamp_min", "clamp_max", "masked_fill", "sign", "square",
    "add_", "sub_", "mul_", "div_", "relu_", "sigmoid_", "clamp_", "masked_fill_", "erf",
    "reciprocal",
}  # fmt: skip
#: methods whose result has the first argument's layout whatever the other arguments are
_SAME_LAYOUT_METHODS = {
    "type_as", "to", "float", "half", "double", "bfloat16", "clone", "detach", "contiguous",
    "cpu", "cuda", "requires_grad_",
}  # fmt: skip
_ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
    nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Hardtanh, nn.LogSigmoid,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout, nn.Identity,
)  # fmt: skip
_POOL_MODULES: tuple[type, ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.LPPool2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
    nn.ReplicationPad2d,
)  # fmt: skip
_POOL_FUNCS: dict[Any, int] = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2,
    F.avg_pool3d: 3, F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3, torch.max_pool2d: 2, torch.avg_pool1d: 1,
    torch.adaptive_avg_pool1d: 1,
}  # fmt: skip
#: single-input ops that only move data: their mapping is computed on index tensors
_MOVE_FUNCS: set[Any] = {
    torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim, torch.t,
    torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze,
    torch.narrow, torch.select, operator.getitem,
}  # fmt: skip
_MOVE_METHODS = {
    "permute", "transpose", "swapaxes", "swapdims", "movedim", "t", "view", "reshape",
    "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "view_as",
    "reshape_as", "narrow", "select",
}  # fmt: skip
#: moves that only reorder dims, and moves that regroup dims in row-major order: mapped from
#: shapes alone (``ChannelGraph._move_by_shape``)
_PERMUTES: set[Any] = {
    torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim, torch.t,
    "permute", "transpose", "swapaxes", "swapdims", "movedim", "t",
}  # fmt: skip
_RESHAPES: set[Any] = {
    torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze, "view",
    "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
}  # fmt: skip
_REDUCE_FUNCS: set[Any] = {
    torch.mean,
    torch.sum,
    torch.amax,
    torch.amin,
    torch.std,
    torch.var,
    torch.logsumexp,
    torch.norm,
}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp", "norm"}
_SOFTMAX = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.normalize}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_SPLIT_FUNCS = {torch.split, torch.chunk, torch.tensor_split, torch.unbind}
_SPLIT_METHODS = {"split", "chunk", "tensor_split", "unbind"}
_MATMUL = {operator.matmul, torch.matmul, torch.bmm, torch.mm}


def _add_torchvision_leaves() -> None:
    """Functions torchvision wraps as fx leaves that act per element in eval mode. Looked up
    only once torchvision is imported (a model using them has imported it), so importing
    graphopt — and every CLI start — does not pay for importing torchvision."""
    if "torchvision" not in sys.modules:
        return
    from torchvision.models import swin_transformer as swin
    from torchvision.ops import stochastic_depth

    _ELEMENTWISE_FUNCS.add(stochastic_depth)
    _FUNCTIONAL_RULES[swin.shifted_window_attention] = _f_swin_attention
    _FUNCTIONAL_RULES[swin._patch_merging_pad] = _f_patch_merging_pad


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def distinct(a: np.ndarray) -> np.ndarray:
    """The sorted distinct values of ``a`` (numpy 2's hashing ``np.unique`` is several times
    slower than a sort on the id arrays here)."""
    a = np.sort(a, axis=None)
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if len(a) else a


def _reshape_blocks(a: list[int], b: list[int]) -> list[tuple[list[int], list[int]]]:
    """The finest pairing of dims of shape ``a`` with dims of shape ``b`` (same numel) whose
    products agree, as a row-major reshape from ``a`` to ``b`` groups them; size-1 dims are
    left out."""
    ia = [d for d, n in enumerate(a) if n > 1]
    ib = [e for e, n in enumerate(b) if n > 1]
    blocks = []
    i = j = 0
    while i < len(ia) and j < len(ib):
        ins, outs = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                ins.append(ia[i])
                pa *= a[ia[i]]
                i += 1
            else:
                outs.append(ib[j])
                pb *= b[ib[j]]
                j += 1
        blocks.append((ins, outs))
    return blocks


def _factor_index(flat: np.ndarray, sizes: list[int], k: int) -> np.ndarray:
    """Index along factor ``k`` of positions ``flat`` in a row-major block of ``sizes``."""
    inner = int(np.prod(sizes[k + 1 :], dtype=np.int64))
    return (flat // inner) % sizes[k]


def _call(node: fx.Node, first: Any) -> Any:
    """Run ``node``'s op with ``first`` as its data input and propagated values elsewhere."""
    rest = fx.node.map_aggregate(_concrete(node.args[1:]), _zeros_like_fake)
    kwargs = fx.node.map_aggregate(_concrete(node.kwargs), _zeros_like_fake)
    if node.op == "call_method":
        return getattr(first, str(node.target))(*rest, **kwargs)
    return node.target(first, *rest, **kwargs)


def _is_tensor_node(node: Any) -> bool:
    return isinstance(_val(node), torch.Tensor)


def _norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _concrete(arg: Any) -> Any:
    """An argument with every Node replaced by its propagated value."""
    return fx.node.map_aggregate(arg, lambda a: _val(a) if isinstance(a, fx.Node) else a)


@dataclass
class _Freeze:
    elements: np.ndarray
    node: str
    reason: str


@dataclass
class ChannelGraph:
    """The element graph of one IR and, once :meth:`solve` ran, its atoms and groups."""

    ir: GraphIR
    spaces: dict[SpaceKey, tuple[int, int]] = field(default_factory=dict)
    total: int = 0
    edges: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    freezes: list[_Freeze] = field(default_factory=list)
    #: param spaces holding output channels of a weighted layer (they make atoms prunable)
    producers: set[SpaceKey] = field(default_factory=set)
    #: param spaces a weighted layer contracts over (its input channels)
    consumers: set[SpaceKey] = field(default_factory=set)
    #: param spaces of normalisation scales (BN/LN/GN γ): the bn_scale criterion reads them
    norm_scales: set[SpaceKey] = field(default_factory=set)
    #: producer param spaces → name of the node that owns them (for reports and ignore)
    owner: dict[SpaceKey, str] = field(default_factory=dict)
    #: nn.MultiheadAttention loses whole heads rather than positions inside every head
    whole_heads: bool = False
    # results of solve()
    comp: np.ndarray | None = None
    prunable: np.ndarray | None = None  # bool per component
    group_of: np.ndarray | None = None  # group id per component (-1 if not prunable)
    space_of: np.ndarray | None = None  # index (in ``spaces`` order) of each element's space
    _tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    # -- spaces and elements ------------------------------------------------------------------

    def key(self, node: fx.Node, dim: int, item: int | None = None) -> SpaceKey:
        if node.op == "get_attr":
            return ("p", str(node.target), dim)
        return ("n", node.name, item, dim)

    def size_of(self, key: SpaceKey) -> int:
        if key[0] == "p":
            return int(self.tensor(key[1]).shape[key[2]])
        node = self._nodes[key[1]]
        val = _val(node)
        if key[2] is not None:
            val = val[key[2]]
        return int(val.shape[key[3]])

    def tensor(self, qualname: str) -> torch.Tensor:
        """The parameter or buffer at ``qualname`` (looked up once: the IR is not edited
        while its graph is in use)."""
        found = self._tensors.get(qualname)
        if found is None:
            found = self._tensors[qualname] = self.ir.fetch(qualname)
        return found

    def ids(self, key: SpaceKey, idx: np.ndarray | None = None) -> np.ndarray:
        """Global element ids of a space (allocated on first use)."""
        if key not in self.spaces:
            self.spaces[key] = (self.total, self.size_of(key))
            self.total += self.spaces[key][1]
        start, size = self.spaces[key]
        return start + (np.arange(size) if idx is None else np.asarray(idx, dtype=np.int64))

    def link(
        self,
        a: SpaceKey,
        b: SpaceKey,
        ia: np.ndarray | None = None,
        ib: np.ndarray | None = None,
    ) -> None:
        """Identify element ``ia[k]`` of space ``a`` with element ``ib[k]`` of space ``b``."""
        ea, eb = self.ids(a, ia), self.ids(b, ib)
        if len(ea) != len(eb):
            raise ValueError(f"cannot link {a} and {b}: {len(ea)} vs {len(eb)} elements")
        self.edges.append((ea, eb))

    def freeze(self, key: SpaceKey, node: fx.Node, reason: str, idx: Any = None) -> None:
        self.freezes.append(_Freeze(self.ids(key, idx), node.name, reason))

    def freeze_node(self, node: fx.Node, reason: str) -> None:
        """Freeze every dimension of every tensor ``node`` reads or produces."""
        for src in [*node.all_input_nodes, node]:
            for key in self._tensor_keys(src):
                self.freeze(key, node, reason)

    def _tensor_keys(self, node: fx.Node) -> list[SpaceKey]:
        val = _val(node)
        if isinstance(val, torch.Tensor):
            return [self.key(node, d) for d in range(val.dim())]
        if isinstance(val, list | tuple):
            return [
                self.key(node, d, i)
                for i, v in enumerate(val)
                if isinstance(v, torch.Tensor)
                for d in range(v.dim())
            ]
        return []

    def param_key(self, module_path: str, pname: str, dim: int) -> SpaceKey:
        return ("p", f"{module_path}.{pname}" if module_path else pname, dim)

    # -- building -----------------------------------------------------------------------------

    def build(self, ignore: Sequence[str] = ()) -> None:
        self._nodes = {n.name: n for n in self.ir.graph.nodes}
        for node in self.ir.graph.nodes:
            try:
                self._visit(node)
            except Exception as exc:  # a rule that cannot map this node refuses it
                self.freeze_node(node, f"its channel mapping failed ({exc})")
        patterns = list(ignore)
        if patterns:
            import fnmatch

            for node in self.ir.graph.nodes:
                if any(fnmatch.fnmatchcase(node.name, p) for p in patterns):
                    self._freeze_params(node, "listed in ignore")

    def _freeze_params(self, node: fx.Node, reason: str) -> None:
        if node.op == "call_module":
            for pname, p in self.ir.module(node).named_parameters(recurse=False):
                for d in range(p.dim()):
                    self.freeze(self.param_key(str(node.target), pname, d), node, reason)
        self.freeze_node(node, reason)

    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            for key in self._tensor_keys(node):
                self.freeze(key, node, "it is a model input")
            return
        if node.op == "output":
            for leaf in pytree.tree_leaves(node.args):
                if isinstance(leaf, fx.Node):
                    for key in self._tensor_keys(leaf):
                        self.freeze(key, node, "it is a model output")
            return
        if node.op == "get_attr":
            return
        val = _val(node)
        if not isinstance(val, torch.Tensor | list | tuple):
            return
        if isinstance(val, list | tuple) and not any(isinstance(v, torch.Tensor) for v in val):
            return
        if not any(_is_tensor_node(a) or isinstance(_val(a), list | tuple)
                   for a in node.all_input_nodes):  # fmt: skip
            return  # computed from constants only: nothing to couple
        rule = self._rule(node)
        if rule is None:
            what = _describe(self.ir, node)
            self.freeze_node(node, f"graphopt does not know how {what} maps channels")
        else:
            rule(node)

    def _rule(self, node: fx.Node) -> Callable[[fx.Node], None] | None:
        t = node.target
        if node.op == "call_module":
            m = self.ir.module(node)
            for types, rule in _MODULE_RULES:
                if isinstance(m, types):
                    return lambda n, _r=rule, _m=m: _r(self, n, _m)
            return None
        if node.op == "call_function":
            if t is operator.getitem and isinstance(_val(node.args[0]), list | tuple):
                return self._getitem_item
            if t is operator.getitem and _has_tensor_index(node.args[1]):
                return None
            if t in _ELEMENTWISE_FUNCS:
                return self._elementwise
            if t in _MOVE_FUNCS:
                return self._move
            if t in _REDUCE_FUNCS:
                return self._reduce
            if t in _SOFTMAX:
                return self._softmax
            if t in _CAT:
                return self._cat
            if t is torch.stack:
                return self._stack
            if t in _SPLIT_FUNCS:
                return self._split
            if t in _MATMUL:
                return self._matmul
            if t is torch.einsum:
                return self._einsum
            if t in _POOL_FUNCS:
                return lambda n: self._pool(n, _POOL_FUNCS[t])
            if t in _FUNCTIONAL_RULES:
                return lambda n: _FUNCTIONAL_RULES[t](self, n)
            return None
        if node.op == "call_method":
            if t in _ELEMENTWISE_METHODS:
                return self._elementwise
            if t in _SAME_LAYOUT_METHODS:
                return lambda n: self.identity(n.args[0], n)
            if t in _MOVE_METHODS:
                return self._move
            if t in _REDUCE_METHODS:
                return self._reduce
            if t in ("softmax", "log_softmax"):
                return self._softmax
            if t in _SPLIT_METHODS:
                return self._split
            if t in ("matmul", "bmm", "mm"):
                return self._matmul
        return None

    # -- generic rules ------------------------------------------------------------------------

    def _elementwise(self, node: fx.Node) -> None:
        """Broadcasting: each input dim of the output's size is the output dim."""
        out = _val(node)
        for inp in node.all_input_nodes:
            v = _val(inp)
            if not isinstance(v, torch.Tensor) or v.dim() > out.dim():
                continue
            shift = out.dim() - v.dim()
            for d in range(v.dim()):
                if v.shape[d] == out.shape[d + shift]:
                    self.link(self.key(inp, d), self.key(node, d + shift))

    def identity(self, src: fx.Node, node: fx.Node, dims: Iterable[int] | None = None) -> None:
        v = _val(node)
        for d in range(v.dim()) if dims is None else dims:
            self.link(self.key(src, d), self.key(node, d))

    def _move(self, node: fx.Node, fn: Callable[[torch.Tensor], Any] | None = None) -> None:
        """Pure data movement: permutations and reshapes are mapped from the shapes alone,
        anything else by running the op on coordinates."""
        if fn is None and self._move_by_shape(node):
            return
        self._move_by_coordinates(node, fn)

    def _move_by_shape(self, node: fx.Node, *, reshape: bool = False) -> bool:
        """Link a permutation or a row-major reshape (view, reshape, flatten, unflatten,
        squeeze, unsqueeze) as :meth:`_move_by_coordinates` would, from shapes alone (the
        coordinate run moves every element, millions in window attention); False when
        ``node`` is neither. ``reshape`` says it is a reshape (a module such as nn.Flatten,
        whose target is its path)."""
        src, t = node.args[0], node.target
        if node.op == "call_module" and not reshape:
            return False
        vin, vout = _val(src), _val(node)
        if not isinstance(vin, torch.Tensor) or not isinstance(vout, torch.Tensor):
            return False
        if vin.numel() != vout.numel() or vin.dtype != vout.dtype or vin.dim() * vout.dim() == 0:
            return False
        if not reshape and t in _PERMUTES:
            # on a contiguous input the output's strides name the input dim of each output dim
            base = torch.empty(vin.shape, dtype=vin.dtype, device="meta")
            probe = _call(node, base)
            stride_of = {base.stride(d): d for d in range(vin.dim()) if vin.shape[d] > 1}
            for e in range(vout.dim()):
                if vout.shape[e] > 1:
                    self.link(self.key(src, stride_of[probe.stride(e)]), self.key(node, e))
            return True
        if not reshape and t not in _RESHAPES:
            return False
        for ins, outs in _reshape_blocks(list(vin.shape), list(vout.shape)):
            # where one side is a single dim, link it with the largest dim of the other side,
            # so removals stay product sets of the factors and the reshape remains valid;
            # every other factor (all of them, if both sides have several) is regrouped
            d = e = None
            if len(ins) == 1 or len(outs) == 1:
                d = max(ins, key=lambda i: (vin.shape[i], -i))
                e = max(outs, key=lambda i: (vout.shape[i], -i))
                if len(ins) == 1:  # input index i sits at this index along e
                    ia = np.arange(vin.shape[d])
                    ib = _factor_index(ia, [vout.shape[k] for k in outs], outs.index(e))
                else:  # output index j came from this index along d
                    ib = np.arange(vout.shape[e])
                    ia = _factor_index(ib, [vin.shape[k] for k in ins], ins.index(d))
                self.link(self.key(src, d), self.key(node, e), ia, ib)
            for k in ins:
                if k != d:
                    self.freeze(self.key(src, k), node, "a reshape regroups this dimension")
            for k in outs:
                if k != e:
                    self.freeze(self.key(node, k), node, "a reshape regroups this dimension")
        return True

    def _move_by_coordinates(
        self, node: fx.Node, fn: Callable[[torch.Tensor], Any] | None = None
    ) -> None:
        """Compute the index mapping by running the op on coordinate tensors."""
        src = node.args[0]
        if fn is None:
            fn = lambda c: _call(node, c)  # noqa: E731
        vin, vout = _val(src), _val(node)
        if node.target is operator.getitem:
            for d in _strided_dims(node.args[1], vin.dim()):
                self.freeze(self.key(src, d), node, "a strided slice cannot be re-sliced")
        if vin.dim() == 0 or vout.dim() == 0:
            return
        coords = [
            torch.arange(n).view([-1 if i == d else 1 for i in range(vin.dim())]).expand(vin.shape)
            for d, n in enumerate(vin.shape)
        ]
        maps = [fn(c.contiguous()) for c in coords]
        # which output dims each input coordinate varies along
        varies = [
            [
                e
                for e in range(vout.dim())
                if vout.shape[e] > 1 and bool((m != m.narrow(e, 0, 1)).any())
            ]
            for m in maps
        ]
        in_dims = [d for d in range(vin.dim()) if vin.shape[d] > 1]
        covered_in: set[int] = set()
        covered_out: set[int] = set()
        # connected blocks of (input dims, output dims) that exchange coordinates
        pending = set(in_dims)
        while pending:
            d0 = pending.pop()
            block_in, block_out, frontier = {d0}, set(varies[d0]), [d0]
            while frontier:
                frontier.pop()
                for d in list(pending):
                    if set(varies[d]) & block_out:
                        pending.discard(d)
                        block_in.add(d)
                        block_out |= set(varies[d])
                        frontier.append(d)
            if not block_out:
                continue
            if len(block_in) > 1 and len(block_out) > 1:
                continue  # an unfactorable regrouping: leave both sides uncovered (frozen)
            # one side is a single dim: link it with the largest dim of the other side, so
            # removals stay product sets of the factors and the reshape remains valid
            d = max(block_in, key=lambda i: (vin.shape[i], -i))
            e = max(block_out, key=lambda i: (vout.shape[i], -i))
            m = maps[d]
            pos = (
                torch.arange(vout.shape[e])
                .view([-1 if i == e else 1 for i in range(vout.dim())])
                .expand(vout.shape)
            )
            # which (input index, output index) pairs occur: a table, not a sort of every
            # element, since window partitions move millions of elements
            seen = np.zeros((vin.shape[d], vout.shape[e]), dtype=bool)
            seen[m.reshape(-1).numpy(), pos.reshape(-1).numpy()] = True
            ia, ib = np.nonzero(seen)
            self.link(self.key(src, d), self.key(node, e), ia, ib)
            covered_in.add(d)
            covered_out.add(e)
        for d in in_dims:
            if d not in covered_in:
                self.freeze(self.key(src, d), node, "a reshape regroups this dimension")
        for e in range(vout.dim()):
            if vout.shape[e] > 1 and e not in covered_out:
                self.freeze(self.key(node, e), node, "a reshape regroups this dimension")

    def _reduce(self, node: fx.Node) -> None:
        src = node.args[0]
        vin, vout = _val(src), _val(node)
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if node.target in (torch.norm, "norm"):
            dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
        dim = _concrete(dim)
        if dim is None:
            dims = set(range(vin.dim()))
        else:
            dims = {
                _norm_dim(int(d), vin.dim()) for d in (dim if isinstance(dim, Sequence) else [dim])
            }
        for d in dims:
            self.freeze(self.key(src, d), node, "channels are reduced over here")
        kept = [d for d in range(vin.dim()) if d not in dims]
        keepdim = vout.dim() == vin.dim()
        for i, d in enumerate(kept):
            self.link(self.key(src, d), self.key(node, d if keepdim else i))

    def _softmax(self, node: fx.Node) -> None:
        src = node.args[0]
        rank = _val(src).dim()
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if node.target is F.normalize:
            dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 1)
        if dim is None:
            self.freeze_node(node, "softmax over an implicit dimension")
            return
        d = _norm_dim(int(dim), rank)
        self.identity(src, node, [i for i in range(rank) if i != d])
        self.freeze(self.key(src, d), node, "channels are normalised together here")
        self.freeze(self.key(node, d), node, "channels are normalised together here")

    def _pool(self, node: fx.Node, spatial: int) -> None:
        src = node.args[0]
        rank = _val(src).dim()
        self.identity(src, node, range(rank - spatial))
        for d in range(rank - spatial, rank):
            self.freeze(self.key(src, d), node, "pooling mixes this dimension")
            self.freeze(self.key(node, d), node, "pooling mixes this dimension")

    def _cat(self, node: fx.Node) -> None:
        tensors = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        out = _val(node)
        d = _norm_dim(int(dim), out.dim())
        offset = 0
        for t in tensors:
            v = _val(t)
            if v.dim() == 1 and v.shape[0] == 0:
                continue  # legacy empty tensors are skipped by cat
            for i in range(out.dim()):
                if i == d:
                    n = v.shape[d]
                    self.link(
                        self.key(t, d), self.key(node, d), None, np.arange(offset, offset + n)
                    )
                    offset += n
                else:
                    self.link(self.key(t, i), self.key(node, i))

    def _stack(self, node: fx.Node) -> None:
        tensors = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        out = _val(node)
        d = _norm_dim(int(dim), out.dim())
        for t in tensors:
            for i in range(_val(t).dim()):
                self.link(self.key(t, i), self.key(node, i if i < d else i + 1))
        self.freeze(self.key(node, d), node, "a stacked dimension")

    def _split(self, node: fx.Node) -> None:
        src = node.args[0]
        vin, parts = _val(src), _val(node)
        name = node.target if isinstance(node.target, str) else node.target.__name__
        default_dim = 0
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else default_dim)
        if name == "unbind":
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        d = _norm_dim(int(dim), vin.dim())
        if name == "unbind":
            self.freeze(self.key(src, d), node, "unbind removes this dimension")
            for k, _ in enumerate(parts):
                for i in range(vin.dim() - 1):
                    self.link(self.key(src, i if i < d else i + 1), self.key(node, i, k))
            return
        offset = 0
        sizes = [p.shape[d] for p in parts]
        explicit = name == "split" and isinstance(_concrete(node.args[1]), list | tuple)
        for k, p in enumerate(parts):
            n = p.shape[d]
            for i in range(vin.dim()):
                if i == d:
                    self.link(self.key(src, d), self.key(node, d, k), np.arange(offset, offset + n))
                else:
                    self.link(self.key(src, i), self.key(node, i, k))
            offset += n
        if not explicit:
            # equal pieces are recomputed from the size: prune the same positions in each
            if len(set(sizes)) != 1 or name == "tensor_split":
                self.freeze(self.key(src, d), node, "unequal pieces cannot be resized")
                return
            n = sizes[0]
            for k in range(1, len(parts)):
                self.link(self.key(src, d), self.key(src, d), np.arange(n), np.arange(n) + k * n)

    def _getitem_item(self, node: fx.Node) -> None:
        src, k = node.args
        v = _val(node)
        if not isinstance(v, torch.Tensor):
            return
        for d in range(v.dim()):
            self.link(self.key(src, d, int(k)), self.key(node, d))

    def _matmul(self, node: fx.Node) -> None:
        a, b = node.args[0], node.args[1]
        va, vb, out = _val(a), _val(b), _val(node)
        if va.dim() < 2 or vb.dim() < 2:
            self.freeze_node(node, "matrix-vector products are not mapped")
            return
        ra, rb, ro = va.dim(), vb.dim(), out.dim()
        self.link(self.key(a, ra - 1), self.key(b, rb - 2))
        self.link(self.key(a, ra - 2), self.key(node, ro - 2))
        self.link(self.key(b, rb - 1), self.key(node, ro - 1))
        for t, v, r in ((a, va, ra), (b, vb, rb)):
            for d in range(r - 2):
                if v.shape[d] == out.shape[d + ro - r]:
                    self.link(self.key(t, d), self.key(node, d + ro - r))

    def _einsum(self, node: fx.Node) -> None:
        eq = str(node.args[0]).replace(" ", "")
        operands = list(node.args[1:])
        if len(operands) == 1 and isinstance(operands[0], list | tuple):
            operands = list(operands[0])
        if "..." in eq or "->" not in eq:
            self.freeze_node(node, "einsum with an implicit or ellipsis output")
            return
        lhs, rhs = eq.split("->")
        where: dict[str, list[SpaceKey]] = {}
        for spec, t in zip(lhs.split(","), operands, strict=True):
            v = _val(t)
            for d, ch in enumerate(spec):
                if v.shape[d] > 1:
                    where.setdefault(ch, []).append(self.key(t, d))
        for d, ch in enumerate(rhs):
            if _val(node).shape[d] > 1:
                where.setdefault(ch, []).append(self.key(node, d))
        for keys in where.values():
            for k in keys[1:]:
                self.link(keys[0], k)

    # -- solving ------------------------------------------------------------------------------

    def solve(self) -> None:
        """Connected components → atoms; prunable atoms; groups of coupled atoms."""
        n = self.total
        if self.edges:
            a = np.concatenate([e[0] for e in self.edges])
            b = np.concatenate([e[1] for e in self.edges])
        else:
            a = b = np.zeros(0, dtype=np.int64)
        graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
        _, comp = connected_components(graph, directed=False)
        self.comp = comp
        ncomp = int(comp.max()) + 1 if n else 0
        frozen = np.zeros(ncomp, dtype=bool)
        if self.freezes:
            frozen[comp[np.concatenate([f.elements for f in self.freezes])]] = True
        has_producer = np.zeros(ncomp, dtype=bool)
        made = [self.ids(key) for key in self.producers if key in self.spaces]
        if made:
            has_producer[comp[np.concatenate(made)]] = True
        self.frozen = frozen
        self.has_producer = has_producer
        self.prunable = has_producer & ~frozen
        # groups: prunable atoms sharing a space (one edge per distinct atom-space pair)
        sizes = np.fromiter((size for _, size in self.spaces.values()), np.int64, len(self.spaces))
        self.space_of = np.repeat(np.arange(len(self.spaces)), sizes)
        atom_ids = np.flatnonzero(self.prunable)
        index = -np.ones(ncomp, dtype=np.int64)
        index[atom_ids] = np.arange(len(atom_ids))
        m = len(atom_ids)
        of_element = index[comp]
        inside = of_element >= 0
        pairs = distinct(of_element[inside] * len(self.spaces) + self.space_of[inside])
        r, c = pairs // max(len(self.spaces), 1), pairs % max(len(self.spaces), 1)
        bip = coo_matrix(
            (np.ones(len(r), dtype=np.int8), (r, c + m)), shape=(m + len(self.spaces),) * 2
        )
        _, labels = connected_components(bip, directed=False)
        group_of = -np.ones(ncomp, dtype=np.int64)
        if m:
            _, compact = np.unique(labels[:m], return_inverse=True)
            group_of[atom_ids] = compact
        self.group_of = group_of

    def spaces_touching(self, flags: np.ndarray) -> list[tuple[SpaceKey, int, int]]:
        """``(key, start, size)`` of every space with an element in a flagged component
        (``flags``: one bool per component), in ``spaces`` order."""
        assert self.comp is not None
        hit = np.concatenate([[0], np.cumsum(flags[self.comp], dtype=np.int64)])
        items = list(self.spaces.items())
        starts = np.fromiter((v[0] for _, v in items), np.int64, len(items))
        ends = starts + np.fromiter((v[1] for _, v in items), np.int64, len(items))
        return [
            (items[i][0], *items[i][1]) for i in np.flatnonzero(hit[ends] > hit[starts])
        ]  # fmt: skip

    def frozen_report(self) -> list[str]:
        """One line per (node, reason) that kept some layer's output channels whole."""
        assert self.comp is not None
        reason_of: dict[int, tuple[str, str]] = {}
        for f in self.freezes:
            for c in distinct(self.comp[f.elements]):
                reason_of.setdefault(int(c), (f.node, f.reason))
        lines: dict[tuple[str, str], list[str]] = {}
        for key in sorted(self.producers, key=str):
            if key not in self.spaces:
                continue
            comps = distinct(self.comp[self.ids(key)])
            frozen = [c for c in comps if self.frozen[c]]
            if frozen:
                why = reason_of.get(int(frozen[0]), ("?", "?"))
                lines.setdefault(why, []).append(self.owner.get(key, key[1]))
        out = []
        for (node, reason), layers in lines.items():
            shown = ", ".join(layers[:4]) + (
                f" and {len(layers) - 4} more" if len(layers) > 4 else ""
            )
            out.append(f"kept the output channels of {shown} whole: at node '{node}' {reason}")
        return out


# -- weighted layers ----------------------------------------------------------------------------


def _conv_like(
    g: ChannelGraph,
    node: fx.Node,
    x: fx.Node,
    w: SpaceKey,
    b: SpaceKey | None,
    groups: int,
    transposed: bool = False,
    owner: str = "",
) -> None:
    vx, out = _val(x), _val(node)
    wshape = g.tensor(w[1]).shape
    spatial = len(wshape) - 2
    cd = vx.dim() - spatial - 1
    wk = lambda d: (w[0], w[1], d)  # noqa: E731 - tiny helper
    if cd == 1:
        g.link(g.key(x, 0), g.key(node, 0))
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    if transposed and groups != 1:
        g.freeze_node(node, "grouped transposed convolutions are not mapped")
        return
    c_out = out.shape[cd]
    if groups == 1:
        g.link(g.key(x, cd), wk(in_dim))
        g.link(g.key(node, cd), wk(out_dim))
        g.consumers.add(wk(in_dim))
    else:
        # whole groups go together: input group k, output group k, weight rows of group k
        ci, co = vx.shape[cd] // groups, c_out // groups
        g.link(g.key(x, cd), g.key(node, cd), None, (np.arange(vx.shape[cd]) // ci) * co)
        g.link(g.key(node, cd), g.key(node, cd), None, (np.arange(c_out) // co) * co)
        g.link(g.key(node, cd), wk(0))
    if b is not None:
        g.link(g.key(node, cd), b)
    g.producers.add(wk(out_dim))
    g.owner[wk(out_dim)] = owner or node.name
    for d in range(cd + 1, vx.dim()):
        g.freeze(g.key(node, d), node, "convolution mixes spatial positions")


def _linear_like(
    g: ChannelGraph, node: fx.Node, x: fx.Node, w: SpaceKey, b: SpaceKey | None, owner: str = ""
) -> None:
    vx = _val(x)
    r = vx.dim()
    g.identity(x, node, range(r - 1))
    g.link(g.key(x, r - 1), (w[0], w[1], 1))
    g.consumers.add((w[0], w[1], 1))
    g.link(g.key(node, r - 1), (w[0], w[1], 0))
    if b is not None:
        g.link(g.key(node, r - 1), b)
    g.producers.add((w[0], w[1], 0))
    g.owner[(w[0], w[1], 0)] = owner or node.name


def _channel_params(
    g: ChannelGraph, node: fx.Node, cd: int, keys: Iterable[SpaceKey | None], scale: SpaceKey | None
) -> None:
    for k in keys:
        if k is not None:
            g.link(g.key(node, cd), k)
    if scale is not None:
        g.norm_scales.add(scale)


def _module_conv(g: ChannelGraph, node: fx.Node, m: nn.Module) -> None:
    t = str(node.target)
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    b = g.param_key(t, "bias", 0) if m.bias is not None else None
    _conv_like(g, node, node.args[0], g.param_key(t, "weight", 0), b, m.groups, transposed, t)


def _module_linear(g: ChannelGraph, node: fx.Node, m: nn.Module) -> None:
    t = str(node.target)
    b = g.param_key(t, "bias", 0) if m.bias is not None else None
    _linear_like(g, node, node.args[0], g.param_key(t, "weight", 0), b, t)


def _module_batchnorm(g: ChannelGraph, node: fx.Node, m: nn.Module) -> None:
    t = str(node.target)
    x = node.args[0]
    g.identity(x, node)
    names = ["weight", "bias"] if m.affine else []
    names += ["running_mean", "running_var"] if m.running_mean is not None else []
    keys = [g.param_key(t, n, 0) for n in names]
    cd = 1 if _val(x).dim() > 1 else 0
    _channel_params(g, node, cd, keys, g.param_key(t, "weight", 0) if m.affine else None)


def _module_groupnorm(g: ChannelGraph, node: fx.Node, m: nn.GroupNorm) -> None:
    t = str(node.target)
    x = node.args[0]
    g.identity(x, node)
    c = _val(node).shape[1]
    per = c // m.num_groups
    g.link(g.key(node, 1), g.key(node, 1), None, (np.arange(c) // per) * per)
    if m.affine:
        _channel_params(
            g, node, 1, [g.param_key(t, "weight", 0), g.param_key(t, "bias", 0)],
            g.param_key(t, "weight", 0),
        )  # fmt: skip


def _module_layernorm(g: ChannelGraph, node: fx.Node, m: nn.LayerNorm) -> None:
    t = str(node.target)
    x = node.args[0]
    g.identity(x, node)
    rank = _val(node).dim()
    k = len(m.normalized_shape)
    if m.elementwise_affine:
        for i in range(k):
            g.link(g.key(node, rank - k + i), g.param_key(t, "weight", i))
            if m.bias is not None:
                g.link(g.key(node, rank - k + i), g.param_key(t, "bias", i))
        g.norm_scales.add(g.param_key(t, "weight", k - 1))


def _module_prelu(g: ChannelGraph, node: fx.Node, m: nn.PReLU) -> None:
    x = node.args[0]
    g.identity(x, node)
    if m.num_parameters > 1:
        g.link(g.key(node, 1), g.param_key(str(node.target), "weight", 0))


def _module_embedding(g: ChannelGraph, node: fx.Node, m: nn.Embedding) -> None:
    t = str(node.target)
    x = node.args[0]
    r = _val(x).dim()
    g.identity(x, node, range(r))
    w = g.param_key(t, "weight", 1)
    g.link(g.key(node, r), w)
    g.producers.add(w)
    g.owner[w] = t


def _packed_attention(
    g: ChannelGraph,
    node: fx.Node,
    inputs: list[fx.Node],
    out: SpaceKey,
    in_proj: tuple[SpaceKey, SpaceKey | None],
    out_proj: tuple[SpaceKey, SpaceKey | None],
    heads: int,
    owner: str,
    whole_heads: bool = False,
) -> None:
    """Attention whose inner width must equal its input width (``E`` rows each for q, k and
    v in one ``(3E, E)`` weight, heads of ``E / heads``): an atom is one head-dim position
    ``p`` in every head of q, k and v, the ``out_proj`` columns reading them, and the input
    and output channels of the same indices, so both widths stay equal and heads equal.
    With ``whole_heads`` an atom is instead one whole head (its ``E / heads`` rows of q, k
    and v) with the same columns and channels: heads go, their size stays.
    Every other dimension (tokens, batch, windows) stays whole: attention mixes tokens."""
    w, b = in_proj
    wo, bo = out_proj
    w_in = (w[0], w[1], 1)
    e = g.size_of(w_in)
    rows = np.arange(e)
    for x in dict.fromkeys(inputs):
        r = _val(x).dim()
        for d in range(r - 1):
            g.freeze(g.key(x, d), node, "attention mixes tokens")
        g.link(g.key(x, r - 1), w_in)
    for key in g._tensor_keys(node):
        if key != out:
            g.freeze(key, node, "attention mixes tokens")
    for part in (1, 2):
        g.link(w, w, rows, rows + part * e)
    head_dim = e // heads
    g.link(w, w, rows, rows // head_dim * head_dim if whole_heads else rows % head_dim)
    g.link(w, w_in, rows, rows)
    wo_in = (wo[0], wo[1], 1)
    g.link(wo_in, w, rows, rows + 2 * e)
    g.link(out, wo)
    g.link(wo, w, rows, rows)
    if b is not None:
        g.link(b, w)
    if bo is not None:
        g.link(out, bo)
    g.consumers.update((w_in, wo_in))
    for key in (w, wo):
        g.producers.add(key)
        g.owner[key] = owner


def _module_mha(g: ChannelGraph, node: fx.Node, m: nn.MultiheadAttention) -> None:
    """Self- or cross-attention through ``nn.MultiheadAttention`` with packed projections.

    The module insists that its inner width equals its input width and that every head has
    the same size, so an atom is one position ``p`` of the head dimension in every head (the
    q, k and v rows ``p + h·head_dim`` and the matching ``out_proj`` columns) together with
    the input and output channels of the same indices: removing it keeps both widths equal.
    """
    t = str(node.target)
    q, k, v = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    if (
        not m._qkv_same_embed_dim
        or m.in_proj_weight is None
        or m.bias_k is not None
        or m.add_zero_attn
        or not all(isinstance(a, fx.Node) and _is_tensor_node(a) for a in (q, k, v))
    ):
        g.freeze_node(node, "only packed-projection attention without bias_kv is mapped")
        return
    for name in ("key_padding_mask", "attn_mask"):
        mask = node.kwargs.get(name)
        if isinstance(mask, fx.Node):
            for key in g._tensor_keys(mask):
                g.freeze(key, node, "an attention mask")
    out_proj = (
        g.param_key(t, "out_proj.weight", 0),
        g.param_key(t, "out_proj.bias", 0) if m.out_proj.bias is not None else None,
    )
    in_proj = (
        g.param_key(t, "in_proj_weight", 0),
        g.param_key(t, "in_proj_bias", 0) if m.in_proj_bias is not None else None,
    )
    _packed_attention(
        g, node, [q, k, v], g.key(node, _val(node)[0].dim() - 1, 0), in_proj, out_proj,
        m.num_heads, t, g.whole_heads,
    )  # fmt: skip


def _module_elementwise(g: ChannelGraph, node: fx.Node, m: nn.Module) -> None:
    g.identity(node.args[0], node)


def _module_pool(g: ChannelGraph, node: fx.Node, m: nn.Module) -> None:
    digits = re.findall(r"(\d)d", type(m).__name__)
    g._pool(node, int(digits[0]) if digits else 2)


def _module_softmax(g: ChannelGraph, node: fx.Node, m: nn.Softmax) -> None:
    rank = _val(node).dim()
    d = _norm_dim(m.dim if m.dim is not None else -1, rank)
    g.identity(node.args[0], node, [i for i in range(rank) if i != d])
    g.freeze(g.key(node, d), node, "channels are normalised together here")


def _module_flatten(g: ChannelGraph, node: fx.Node, m: nn.Module) -> None:
    if not g._move_by_shape(node, reshape=True):  # nn.Flatten / nn.Unflatten are reshapes
        g._move(node, m)


_MODULE_RULES: list[tuple[Any, Callable[..., None]]] = [
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), _module_conv),
    ((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), _module_conv),
    (nn.Linear, _module_linear),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm), _module_batchnorm),
    ((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), _module_batchnorm),
    (nn.GroupNorm, _module_groupnorm),
    (nn.LayerNorm, _module_layernorm),
    (nn.PReLU, _module_prelu),
    (nn.Embedding, _module_embedding),
    (nn.MultiheadAttention, _module_mha),
    (_ELEMENTWISE_MODULES, _module_elementwise),
    (_POOL_MODULES, _module_pool),
    (nn.Softmax, _module_softmax),
    ((nn.Flatten, nn.Unflatten), _module_flatten),
]  # fmt: skip


# -- functional weighted ops ------------------------------------------------------------------


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[i] if len(node.args) > i else default


def _attr_key(g: ChannelGraph, node: Any, dim: int) -> SpaceKey | None:
    """The param space of a weight given as a ``get_attr`` node (None if absent)."""
    if node is None:
        return None
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        raise ValueError("its weight is computed, not a parameter")
    return ("p", str(node.target), dim)


def _f_linear(g: ChannelGraph, node: fx.Node) -> None:
    w = _attr_key(g, _arg(node, 1, "weight"), 0)
    _linear_like(g, node, node.args[0], w, _attr_key(g, _arg(node, 2, "bias"), 0))


def _f_conv(g: ChannelGraph, node: fx.Node) -> None:
    w = _attr_key(g, _arg(node, 1, "weight"), 0)
    groups = int(_concrete(_arg(node, 6, "groups", 1)))
    _conv_like(g, node, node.args[0], w, _attr_key(g, _arg(node, 2, "bias"), 0), groups)


def _f_layer_norm(g: ChannelGraph, node: fx.Node) -> None:
    x = node.args[0]
    g.identity(x, node)
    shape = _concrete(_arg(node, 1, "normalized_shape"))
    k = len(shape)
    rank = _val(node).dim()
    for name, i in (("weight", 2), ("bias", 3)):
        p = _arg(node, i, name)
        if p is not None:
            for j in range(k):
                g.link(g.key(node, rank - k + j), _attr_key(g, p, j))
            if name == "weight":
                g.norm_scales.add(_attr_key(g, p, k - 1))


def _f_batch_norm(g: ChannelGraph, node: fx.Node) -> None:
    x = node.args[0]
    g.identity(x, node)
    keys = [
        _attr_key(g, _arg(node, i, n), 0)
        for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))
    ]
    _channel_params(g, node, 1, keys, keys[2])


def _f_group_norm(g: ChannelGraph, node: fx.Node) -> None:
    x = node.args[0]
    g.identity(x, node)
    groups = int(_concrete(_arg(node, 1, "num_groups")))
    c = _val(node).shape[1]
    per = c // groups
    g.link(g.key(node, 1), g.key(node, 1), None, (np.arange(c) // per) * per)
    keys = [_attr_key(g, _arg(node, i, n), 0) for i, n in ((2, "weight"), (3, "bias"))]
    _channel_params(g, node, 1, keys, keys[0])


def _f_embedding(g: ChannelGraph, node: fx.Node) -> None:
    x = node.args[0]
    r = _val(x).dim()
    g.identity(x, node, range(r))
    w = _attr_key(g, _arg(node, 1, "weight"), 1)
    g.link(g.key(node, r), w)
    g.producers.add(w)
    g.owner[w] = w[1]


def _f_sdpa(g: ChannelGraph, node: fx.Node) -> None:
    q, k, v = node.args[0], node.args[1], node.args[2]
    vq, vk, vv, out = _val(q), _val(k), _val(v), _val(node)
    ro = out.dim()
    for t, val in ((q, vq), (k, vk), (v, vv)):
        for d in range(val.dim() - 2):
            if val.shape[d] == out.shape[d + ro - val.dim()]:
                g.link(g.key(t, d), g.key(node, d + ro - val.dim()))
    g.link(g.key(q, vq.dim() - 1), g.key(k, vk.dim() - 1))
    g.link(g.key(k, vk.dim() - 2), g.key(v, vv.dim() - 2))
    g.link(g.key(q, vq.dim() - 2), g.key(node, ro - 2))
    g.link(g.key(v, vv.dim() - 1), g.key(node, ro - 1))
    # the default scale 1/sqrt(head dim) is pinned to its old value by the pruner
    mask = _arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node):
        for key in g._tensor_keys(mask):
            g.freeze(key, node, "an attention mask")


def _f_swin_attention(g: ChannelGraph, node: fx.Node) -> None:
    """torchvision's ``shifted_window_attention`` (an fx leaf): packed-projection attention
    in windows of a channels-last map; its inner width is read from the input's."""
    x = node.args[0]
    w = _attr_key(g, _arg(node, 1, "qkv_weight"), 0)
    wo = _attr_key(g, _arg(node, 2, "proj_weight"), 0)
    b = _attr_key(g, _arg(node, 9, "qkv_bias"), 0)
    bo = _attr_key(g, _arg(node, 10, "proj_bias"), 0)
    heads = int(_concrete(_arg(node, 5, "num_heads")))
    for i, name in ((3, "relative_position_bias"), (11, "logit_scale")):
        extra = _arg(node, i, name)
        if isinstance(extra, fx.Node):
            for key in g._tensor_keys(extra):
                g.freeze(key, node, "per-head attention terms")
    out = g.key(node, _val(node).dim() - 1)
    _packed_attention(g, node, [x], out, (w, b), (wo, bo), heads, w[1].rpartition(".")[0])


def _f_patch_merging_pad(g: ChannelGraph, node: fx.Node) -> None:
    """torchvision's ``_patch_merging_pad``: pad H and W to even sizes and concatenate the
    four 2×2 phases along the channels (``… H/2 W/2 4C``)."""
    x = node.args[0]
    r, c = _val(x).dim(), _val(x).shape[-1]
    g.identity(x, node, range(r - 3))
    g.link(g.key(x, r - 1), g.key(node, r - 1), np.arange(4 * c) % c, None)
    for d in (r - 3, r - 2):
        for key in (g.key(x, d), g.key(node, d)):
            g.freeze(key, node, "patch merging regroups spatial positions")


def _f_elementwise_first(g: ChannelGraph, node: fx.Node) -> None:
    g.identity(node.args[0], node)


def _f_pad(g: ChannelGraph, node: fx.Node) -> None:
    x = node.args[0]
    pad = _concrete(_arg(node, 1, "pad"))
    rank = _val(x).dim()
    k = len(pad) // 2
    g.identity(x, node, range(rank - k))
    for i in range(k):
        d = rank - 1 - i
        if pad[2 * i] or pad[2 * i + 1]:
            g.freeze(g.key(x, d), node, "padding shifts this dimension")
            g.freeze(g.key(node, d), node, "padding shifts this dimension")
        else:
            g.link(g.key(x, d), g.key(node, d))


def _f_interpolate(g: ChannelGraph, node: fx.Node) -> None:
    g._pool(node, _val(node).dim() - 2)


_FUNCTIONAL_RULES: dict[Any, Callable[[ChannelGraph, fx.Node], None]] = {
    F.linear: _f_linear,
    F.conv1d: _f_conv,
    F.conv2d: _f_conv,
    F.conv3d: _f_conv,
    F.layer_norm: _f_layer_norm,
    F.batch_norm: _f_batch_norm,
    F.group_norm: _f_group_norm,
    F.embedding: _f_embedding,
    F.scaled_dot_product_attention: _f_sdpa,
    F.pad: _f_pad,
    F.interpolate: _f_interpolate,
    torch.flatten: lambda g, n: g._move(n),
}


# -- helpers ------------------------------------------------------------------------------------


def _has_tensor_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    for it in items:
        if isinstance(it, fx.Node) and isinstance(_val(it), torch.Tensor):
            return True
        if isinstance(it, list | torch.Tensor):
            return True
    return False


def _zeros_like_fake(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return torch.zeros(a.shape, dtype=torch.int64)
    return a


def _strided_dims(index: Any, rank: int) -> list[int]:
    """Source dims an index slices with a step other than 1."""
    items = index if isinstance(index, tuple) else (index,)
    explicit = sum(1 for it in items if it is not None and it is not Ellipsis)
    dims, d = [], 0
    for it in items:
        if it is Ellipsis:
            d += rank - explicit
        elif it is not None:
            if isinstance(it, slice) and it.step not in (None, 1):
                dims.append(d)
            d += 1
    return dims


def _describe(ir: GraphIR, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {type(ir.module(node)).__name__}"
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    return f"{'method' if node.op == 'call_method' else 'function'} {name}"


def analyse(ir: GraphIR, ignore: Sequence[str] = (), *, whole_heads: bool = False) -> ChannelGraph:
    """Build and solve the channel-dependency graph of ``ir``, whose nodes carry their
    values' shapes in ``meta["val"]`` (from the ``shapes`` analysis or a real run);
    ``whole_heads`` makes each head of nn.MultiheadAttention one atom."""
    if any("val" not in n.meta for n in ir.graph.nodes if n.op != "output"):
        ir.analysis("shapes")  # not observed by the caller: propagate fake tensors
    _add_torchvision_leaves()
    g = ChannelGraph(ir, whole_heads=whole_heads)
    g.build(ignore)
    g.solve()
    return g
