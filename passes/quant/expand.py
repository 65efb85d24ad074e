"""Expanding torch.nn's composite transformer layers into the ops they compute.

``torch.fx`` keeps every ``torch.nn`` module opaque, so a model built from
``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` or ``nn.TransformerEncoder`` shows
the quant pass one call per layer and no ``Linear`` to quantize. :func:`expand_composites`
replaces each such call by the ops the layer computes:

* ``MultiheadAttention``: one ``Linear`` per distinct input (a single ``in_proj`` of width
  3·E for self-attention, ``q_proj`` and ``kv_proj`` when key is value, three otherwise),
  the heads split with ``unflatten``, ``F.scaled_dot_product_attention`` (or, when the
  attention weights are read, the explicit ``softmax(q·kᵀ/√d + mask)·v`` that returns them),
  and ``out_proj`` as a plain ``Linear``;
* ``TransformerEncoderLayer``: its norms, residual adds, feed-forward ``Linear``s and
  activation, with its self-attention as a ``MultiheadAttention`` call (expanded in turn);
* ``TransformerEncoder``: one call per layer and the final norm.

The expansion is exact up to float rounding (eval semantics: no dropout). Each expanded
layer's module is replaced by a plain ``nn.Module`` holding the new ``Linear`` modules, so
the model still pickles without graphopt. Layers using options the expansion does not cover
(``add_bias_kv``, ``add_zero_attn``, a tensor ``is_causal``) stay opaque, and say why.

>>> import torch, graphopt
>>> from graphopt.passes.quant.expand import expand_composites
>>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
>>> model = torch.nn.Sequential(torch.nn.Identity(), layer).eval()
>>> ir = graphopt.GraphIR.trace(model, (torch.randn(1, 5, 16),))
>>> sorted(expand_composites(ir).expanded)
['MultiheadAttention', 'TransformerEncoderLayer']
"""

from __future__ import annotations

import inspect
import math
import operator
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphopt import GraphIR, GraphoptError
from graphopt.idioms import linear_from_conv1d
from graphopt.ir import ORIGIN

__all__ = ["Expansion", "as_linear", "expand_composites", "linear_modules", "plain_linears"]


@dataclass
class Expansion:
    """What :func:`expand_composites` did: layers expanded (by class) and layers left whole."""

    expanded: Counter[str] = field(default_factory=Counter)
    kept: list[str] = field(default_factory=list)  #: "node: reason"


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``weight`` and ``bias`` (no random initialisation)."""
    out_features, in_features = weight.shape
    layer = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias is not None)
    layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
    if bias is not None:
        layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
    return layer


def _additive(mask: Any, is_bool: bool, dtype: torch.dtype) -> Any:
    """A boolean mask (True = masked out) as the additive float mask attention adds."""
    if not is_bool:
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))


class _Attention(nn.Module):
    """``nn.MultiheadAttention``'s forward for one call's constants, written so fx traces it.

    The projections are new plain ``Linear`` modules built from the layer's weights, one per
    distinct input (``groups`` lists which of q, k, v each one produces)."""

    def __init__(self, mha: nn.MultiheadAttention, groups: list[str], cfg: dict[str, Any]) -> None:
        super().__init__()
        self.heads, self.cfg, self.groups = mha.num_heads, cfg, groups
        self.scale = 1.0 / math.sqrt(mha.head_dim)
        weight: dict[str, torch.Tensor]
        if mha._qkv_same_embed_dim:
            w = mha.in_proj_weight.detach()
            weight = dict(zip("qkv", w.chunk(3), strict=True))
        else:
            weight = {
                "q": mha.q_proj_weight.detach(),
                "k": mha.k_proj_weight.detach(),
                "v": mha.v_proj_weight.detach(),
            }
        bias: dict[str, Any] = {"q": None, "k": None, "v": None}
        if mha.in_proj_bias is not None:
            bias = dict(zip("qkv", mha.in_proj_bias.detach().chunk(3), strict=True))
        for group in groups:
            w = torch.cat([weight[c] for c in group]).clone()
            b = torch.cat([bias[c] for c in group]).clone() if bias["q"] is not None else None
            name = "in_proj" if group == "qkv" else f"{group}_proj"
            self.add_module(name, _linear(w, b))
        out = mha.out_proj
        self.out_proj = _linear(out.weight, out.bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cfg, heads = self.cfg, self.heads
        given = {"q": query, "k": key, "v": value}
        proj: dict[str, Any] = {}
        for group in self.groups:
            x = given[group[0]]
            if not cfg["batch_first"]:
                x = x.transpose(0, 1)
            if cfg["unbatched"]:
                x = x.unsqueeze(0)
            y = getattr(self, "in_proj" if group == "qkv" else f"{group}_proj")(x)
            parts = y.chunk(len(group), dim=-1) if len(group) > 1 else None
            for i, c in enumerate(group):
                part = y if parts is None else parts[i]
                proj[c] = part.unflatten(-1, (heads, -1)).transpose(1, 2)  # N, H, L, D
        q, k, v = proj["q"], proj["k"], proj["v"]
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, cfg["mask_bool"], cfg["dtype"])
            if cfg["mask_3d"]:
                mask = mask.unflatten(0, (-1, heads))
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, cfg["kpm_bool"], cfg["dtype"])
            if cfg["unbatched"]:
                pad = pad.unsqueeze(0)
            pad = pad[:, None, None, :]
            mask = pad if mask is None else mask + pad
        weights = None
        if cfg["need_weights"]:
            scores = (q * self.scale) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            attn = torch.softmax(scores, dim=-1)
            out = attn @ v
            weights = attn.mean(dim=1) if cfg["average"] else attn
            if cfg["unbatched"]:
                weights = weights.squeeze(0)
        elif cfg["causal"]:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if cfg["unbatched"]:
            out = out.squeeze(0)
        elif not cfg["batch_first"]:
            out = out.transpose(0, 1)
        return out, weights


class _EncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer``'s forward (eval), over the layer's own submodules."""

    # the layer's submodules, added by name in __init__
    self_attn: Any
    linear1: Any
    linear2: Any
    norm1: Any
    norm2: Any
    dropout: Any
    dropout1: Any
    dropout2: Any
    act: Any

    def __init__(self, layer: nn.TransformerEncoderLayer, causal: bool) -> None:
        super().__init__()
        for name, child in layer.named_children():
            self.add_module(name, child)
        self.act = layer.activation
        self.norm_first, self.causal = layer.norm_first, causal

    def _sa(self, x: Any, mask: Any, pad: Any) -> Any:
        out = self.self_attn(
            x,
            x,
            x,
            attn_mask=mask,
            key_padding_mask=pad,
            need_weights=False,
            is_causal=self.causal,
        )[0]
        return self.dropout1(out)

    def _ff(self, x: Any) -> Any:
        return self.dropout2(self.linear2(self.dropout(self.act(self.linear1(x)))))

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa(self.norm1(x), src_mask, src_key_padding_mask)
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self._sa(x, src_mask, src_key_padding_mask))
        return self.norm2(x + self._ff(x))


class _Encoder(nn.Module):
    """``nn.TransformerEncoder``'s forward (eval, no grad): its layers, then its norm.

    Where torch would run the layers on a nested tensor (``enable_nested_tensor`` with a
    padding mask and no attention mask), its output is zero at the padded positions; so is
    this one's."""

    def __init__(self, encoder: nn.TransformerEncoder, causal: bool, zero_padding: bool) -> None:
        super().__init__()
        self.layers = encoder.layers
        self.norm = encoder.norm
        self.causal, self.zero_padding = causal, zero_padding

    def forward(
        self,
        src: torch.Tensor,
        mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = src
        for layer in self.layers:
            out = layer(
                out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=self.causal
            )
        if self.zero_padding and src_key_padding_mask is not None:
            # padded where the mask is True (bool) or -inf (additive): non-zero either way
            out = out.masked_fill((src_key_padding_mask != 0)[..., None], 0.0)
        if self.norm is not None:
            out = self.norm(out)
        return out


def _bind(module: nn.Module, node: fx.Node) -> dict[str, Any]:
    """The call's arguments by parameter name, defaults filled in."""
    bound = inspect.signature(module.forward).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _val(value: Any) -> Any:
    return value.meta.get("val") if isinstance(value, fx.Node) else value


def _is_bool(value: Any) -> bool:
    val = _val(value)
    return isinstance(val, torch.Tensor) and val.dtype == torch.bool


def _attention(mha: nn.MultiheadAttention, node: fx.Node) -> tuple[nn.Module, dict[str, Any]] | str:
    args = _bind(mha, node)
    if mha.bias_k is not None or mha.add_zero_attn:
        return "add_bias_kv/add_zero_attn are not expanded"
    if isinstance(args["is_causal"], fx.Node) or isinstance(args["need_weights"], fx.Node):
        return "is_causal/need_weights computed at run time"
    query = _val(args["query"])
    if not isinstance(query, torch.Tensor):
        return "no shape known for the query"
    reads_weights = any(
        u.target is not operator.getitem or (u.args[1] == 1 and u.users) for u in node.users
    )
    causal = bool(args["is_causal"])
    if causal and args["attn_mask"] is None:
        return "is_causal without attn_mask (torch refuses it too)"
    cfg = {
        "batch_first": mha.batch_first,
        "dtype": query.dtype,
        "unbatched": query.dim() == 2,
        "need_weights": bool(args["need_weights"]) and reads_weights,
        "average": bool(args["average_attn_weights"]),
        "mask_bool": _is_bool(args["attn_mask"]),
        "mask_3d": getattr(_val(args["attn_mask"]), "ndim", 0) == 3,
        "kpm_bool": _is_bool(args["key_padding_mask"]),
        # torch drops the mask for a causal hint only without padding mask or weights
        "causal": causal and args["key_padding_mask"] is None and not args["need_weights"],
    }
    q, k, v = args["query"], args["key"], args["value"]
    groups = ["qkv"] if q is k is v else (["q", "kv"] if k is v else ["q", "k", "v"])
    if q is k and k is not v:
        groups = ["qk", "v"]
    if q is v and k is not v and q is not k:
        groups = ["qv", "k"]
    inputs = {n: args[n] for n in ("query", "key", "value", "attn_mask", "key_padding_mask")}
    return _Attention(mha, groups, cfg), inputs


def _causal_hint(value: Any) -> bool | str:
    if isinstance(value, fx.Node):
        return "is_causal computed at run time"
    return bool(value)


def _encoder_layer(
    layer: nn.TransformerEncoderLayer, node: fx.Node
) -> tuple[nn.Module, dict[str, Any]] | str:
    args = _bind(layer, node)
    causal = _causal_hint(args["is_causal"])
    if isinstance(causal, str):
        return causal
    inputs = {n: args[n] for n in ("src", "src_mask", "src_key_padding_mask")}
    return _EncoderLayer(layer, causal), inputs


def _encoder(
    encoder: nn.TransformerEncoder, node: fx.Node
) -> tuple[nn.Module, dict[str, Any]] | str:
    args = _bind(encoder, node)
    causal = _causal_hint(args["is_causal"])
    if isinstance(causal, str):
        return causal
    first = encoder.layers[0] if len(encoder.layers) else None
    nested = (
        getattr(encoder, "use_nested_tensor", False)
        and isinstance(first, nn.TransformerEncoderLayer)
        and args["mask"] is None
        and args["src_key_padding_mask"] is not None
    )
    inputs = {n: args[n] for n in ("src", "mask", "src_key_padding_mask")}
    return _Encoder(encoder, causal, bool(nested)), inputs


Expander = Callable[[Any, fx.Node], "tuple[nn.Module, dict[str, Any]] | str"]

#: composite torch.nn layers and how to write each one's forward in traceable ops
EXPANDERS: dict[type[nn.Module], Expander] = {
    nn.MultiheadAttention: _attention,
    nn.TransformerEncoderLayer: _encoder_layer,
    nn.TransformerEncoder: _encoder,
}


#: the expanders that need no shapes (the others read the query's rank and mask dtypes)
SHAPELESS = (nn.TransformerEncoderLayer, nn.TransformerEncoder)


def _assert_none(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "_assert_is_none"


def _inline(ir: GraphIR, call: fx.Node, ref: nn.Module, inputs: dict[str, Any]) -> Any:
    """Trace ``ref`` on the call's inputs and put its ops in place of ``call``.

    ``ref``'s submodules land at the call's module path (in a plain ``nn.Module``), so the
    new ``call_module`` nodes name them there. Returns the new output (a node or a tuple)."""
    concrete = {k: v for k, v in inputs.items() if not isinstance(v, fx.Node)}
    sub = fx.Tracer().trace(ref, concrete_args=concrete)
    graph, prefix = ir.graph, str(call.target)
    params = list(inputs)
    env: dict[fx.Node, Any] = {}
    origin = call.meta.get(ORIGIN, call.name)
    result: Any = None
    placeholders = 0
    with graph.inserting_before(call):
        for n in sub.nodes:
            if n.op == "placeholder":
                env[n] = inputs[params[placeholders]]
                placeholders += 1
                continue
            if _assert_none(n):
                continue
            if n.op == "output":
                result = fx.node.map_arg(n.args[0], lambda a: env[a])
                continue
            target = f"{prefix}.{n.target}" if n.op in ("call_module", "get_attr") else n.target
            new = graph.create_node(
                n.op,
                target,
                fx.node.map_arg(n.args, lambda a: env[a]),
                fx.node.map_arg(n.kwargs, lambda a: env[a]),
                name=f"{call.name}_{n.name}",
            )
            new.meta[ORIGIN] = origin
            env[n] = new
    return result


def _replace_call(ir: GraphIR, call: fx.Node, result: Any) -> bool:
    """Route the users of ``call`` to ``result``; False (nothing changed) if they read the
    output in a way this cannot follow."""
    if isinstance(result, fx.Node):
        call.replace_all_uses_with(result)
        ir.graph.erase_node(call)
        return True
    whole = [u for u in call.users if u.target is not operator.getitem]
    if whole:  # the tuple itself is used (returned, passed on): build it
        with ir.graph.inserting_before(call):
            packed = ir.graph.call_function(tuple, (list(result),))
        for user in whole:
            user.replace_input_with(call, packed)
    for user in list(call.users):
        if not isinstance(user.args[1], int):
            return False
        if user.users and not isinstance(result[user.args[1]], fx.Node):
            return False
    for user in list(call.users):
        value = result[user.args[1]]
        if isinstance(value, fx.Node):
            user.replace_all_uses_with(value)
        ir.graph.erase_node(user)
    ir.graph.erase_node(call)
    return True


def _container(ref: nn.Module) -> nn.Module:
    """A plain ``nn.Module`` with ``ref``'s submodules (pickles without graphopt)."""
    box = nn.Module()
    for name, child in ref.named_children():
        box.add_module(name, child)
    return box


def _set_module(gm: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


def _remove_dead(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase inlined nodes nobody reads (e.g. attention weights no one asked for)."""
    for node in reversed(nodes):
        if node.graph is graph and not node.users and node.op not in ("output", "placeholder"):
            graph.erase_node(node)


def expand_composites(ir: GraphIR) -> Expansion:
    """Replace every call of a layer in :data:`EXPANDERS` by the ops it computes, until none
    is left (an encoder becomes layers, a layer attention, attention Linears). Returns what
    was expanded and what was kept whole, with why."""
    done = Expansion()
    refused: set[fx.Node] = set()
    while True:
        ir.invalidate()
        try:
            ir.analysis("shapes")
            known = True
        except GraphoptError:  # e.g. an encoder that runs a nested tensor: expand it first
            known = False
        calls = [
            n
            for n in ir.graph.nodes
            if n.op == "call_module"
            and type(ir.module(n)) in EXPANDERS
            and n not in refused
            and (known or type(ir.module(n)) in SHAPELESS)
        ]
        if not calls:
            break
        boxes: dict[str, nn.Module] = {}
        for call in calls:
            module = ir.module(call)
            made = EXPANDERS[type(module)](module, call)
            if isinstance(made, str):
                refused.add(call)
                done.kept.append(f"{call.name}: {made}")
                continue
            ref, inputs = made
            path = str(call.target)
            box = boxes.get(path)
            if box is not None:  # a shared layer: every call uses the same new modules
                for name, child in ref.named_children():
                    if hasattr(box, name):
                        setattr(ref, name, getattr(box, name))
                    else:
                        box.add_module(name, child)
            before = set(ir.graph.nodes)
            result = _inline(ir, call, ref, inputs)
            new = [n for n in ir.graph.nodes if n not in before]
            if not _replace_call(ir, call, result):
                for n in reversed(new):
                    ir.graph.erase_node(n)
                refused.add(call)
                done.kept.append(f"{call.name}: its output is read in a way not followed")
                continue
            _remove_dead(ir.graph, new)
            boxes.setdefault(path, _container(ref))
            done.expanded[type(module).__name__] += 1
        for path, box in boxes.items():
            _set_module(ir.gm, path, box)
        ir.recompile()
    return done


def as_linear(module: nn.Module) -> nn.Linear | None:
    """A plain ``nn.Linear`` computing what ``module`` computes, if it is Linear-like: a
    subclass of ``nn.Linear`` that keeps its forward (``NonDynamicallyQuantizableLinear``),
    or Hugging Face's ``Conv1D`` (``x @ W + b`` with ``W`` stored input-major)."""
    if isinstance(module, nn.Linear):
        if type(module) is nn.Linear or type(module).forward is not nn.Linear.forward:
            return None
        return _linear(module.weight, module.bias)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    is_conv1d = type(module).__name__ == "Conv1D" and hasattr(module, "nf")
    if is_conv1d and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return linear_from_conv1d(weight, bias)
    return None


def _tensor_attr(ir: GraphIR, node: Any) -> torch.Tensor | None:
    """The parameter or buffer a ``get_attr`` node reads, else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = ir.fetch(str(node.target))
    return value if isinstance(value, torch.Tensor) else None


def _functional_linear(ir: GraphIR, node: fx.Node) -> tuple[Any, nn.Linear] | None:
    """``F.linear(x, W, b)`` or ``torch.addmm(b, x, W)`` (Hugging Face's Conv1D once fx
    has traced through it) on stored weights: the input and an equivalent ``nn.Linear``."""
    if node.op != "call_function" or node.kwargs:
        return None
    if node.target is F.linear and 2 <= len(node.args) <= 3:
        x, w_node = node.args[0], node.args[1]
        b_node = node.args[2] if len(node.args) == 3 else None
        weight = _tensor_attr(ir, w_node)
        bias = _tensor_attr(ir, b_node) if b_node is not None else None
        if weight is None or weight.dim() != 2 or (b_node is not None and bias is None):
            return None
        return x, _linear(weight, bias)  # shares the stored tensors
    if node.target is torch.addmm and len(node.args) == 3:
        b_node, x, w_node = node.args
        weight, bias = _tensor_attr(ir, w_node), _tensor_attr(ir, b_node)
        if weight is None or bias is None or weight.dim() != 2 or bias.dim() != 1:
            return None
        if len(w_node.users) != 1:  # type: ignore[union-attr]  # a transposed copy: sole use
            return None
        return x, linear_from_conv1d(weight, bias)
    return None


def linear_modules(root: nn.Module, paths: Collection[str] | None = None) -> list[str]:
    """Replace, in place, every Linear-like submodule of ``root`` (or those of ``paths``) by
    the plain ``nn.Linear`` computing the same (see :func:`as_linear`): Hugging Face's GPT-2
    ``Conv1D`` among them, so that any int8 Linear kernel, graphopt's or
    ``torch.ao.quantization.quantize_dynamic``'s, takes them. Returns the paths replaced.

    >>> from transformers.pytorch_utils import Conv1D
    >>> model = torch.nn.Sequential(Conv1D(8, 4))
    >>> linear_modules(model), type(model[0]).__name__
    (['0'], 'Linear')
    """
    done = []
    for path, module in list(root.named_modules()):
        linear = as_linear(module) if paths is None or path in paths else None
        if linear is not None:
            _set_module(root, path, linear)
            done.append(path)
    return done


def plain_linears(ir: GraphIR) -> int:
    """Make every Linear-like computation a call of a plain ``nn.Linear``: Linear-like
    modules (see :func:`as_linear`) and functional linears on stored weights (see
    :func:`_functional_linear`). Exact: the same weights, the same op. Returns how many."""
    called = {str(n.target) for n in ir.graph.nodes if n.op == "call_module"}
    done = len(linear_modules(ir.gm, called))
    for node in list(ir.graph.nodes):
        found = _functional_linear(ir, node)
        if found is None:
            continue
        x, linear = found
        path = ir.free_name(f"{node.name}_linear")
        ir.gm.add_submodule(path, linear)
        with ir.graph.inserting_before(node):
            call = ir.graph.call_module(path, (x,))
        reads = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
        ir.replace(node, call)
        for attr in reads:  # the weights' reads, now unused: the originals are not kept
            if not attr.users:
                ir.graph.erase_node(attr)
        done += 1
    if done:
        ir.recompile()
        ir.invalidate()
    return done
