"""Layers a library writes out in arithmetic, raised to the torch layer they compute.

Some layers reach a captured graph as the elementary ops of their ``forward``, not as a
layer call, because torch has no module of their kind that they subclass. The passes know
layers, not these idioms, so capture raises them (exactly: the same tensors, the same
result):

* **RMS normalisation** ``w * (x * rsqrt(mean(x ** 2, -1, keepdim=True) + eps))`` (Llama,
  Qwen2, T5, Mistral and most decoders since) becomes ``F.rms_norm(x, (C,), w, eps)``, so
  pruning sees a normalisation whose statistics follow the kept channels rather than a mean
  over every channel, which would pin the hidden size.
* **Hugging Face's Conv1D** ``addmm(b, x.view(-1, C), W).view(..., N)`` (GPT-2, its weight
  stored input-major) becomes a call of an ``nn.Linear`` holding ``W.t()`` at the Conv1D's
  own path, so every pass sees the linear layer it is. The model's own Conv1D is not
  touched: the Linear holds a transposed copy of its weight and its very bias.

:func:`raise_idioms` rewrites a graph in place; ``passes/quant`` makes Linear-likes plain
Linears with the same :func:`linear_from_conv1d`.
"""

from __future__ import annotations

import operator
from typing import Any, TypeGuard

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["linear_from_conv1d", "raise_idioms"]

_POW = (operator.pow, torch.pow, "pow")
_MUL = (operator.mul, torch.mul, "mul")
_ADD = (operator.add, torch.add, "add")


def raise_idioms(graph: fx.Graph, objects: dict[str, Any]) -> list[fx.Node]:
    """Raise the idioms of the module docstring in ``graph``, whose ``get_attr`` and
    ``call_module`` targets are the paths of ``objects`` (new modules are added there);
    nodes must carry ``meta["val"]``. Returns the nodes that stand for them (the replaced
    ops are left without users, for the caller's dead-code pass)."""
    raised = []
    for node in list(graph.nodes):
        found = None
        if _is(node, (torch.rsqrt, "rsqrt")):
            found = _rms_norm(graph, node, objects)
        elif _is(node, (torch.addmm,)):
            found = _conv1d(graph, node, objects)
        if found is not None:
            raised.append(found)
    return raised


def linear_from_conv1d(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` computing ``x @ weight + bias`` (Conv1D's input-major ``weight``):
    a transposed copy of the weight, the bias itself."""
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().t().contiguous(), weight.requires_grad)
    if bias is not None:
        linear.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, False)
    return linear


def _is(node: Any, targets: tuple[Any, ...]) -> TypeGuard[fx.Node]:
    """``node`` calls one of ``targets`` (functions or method names)."""
    return (
        isinstance(node, fx.Node)
        and node.op in ("call_function", "call_method")
        and (node.target in targets)
    )


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _other(node: fx.Node, one: Any) -> Any:
    """The operand of binary ``node`` that is not ``one`` (None if neither or both are)."""
    a, b = (*node.args, None, None)[:2]
    if a is one and b is not one:
        return b
    if b is one and a is not one:
        return a
    return None


def _same_dtype_cast(node: fx.Node | None, like: Any) -> bool:
    """``node`` is ``y.to(dtype)`` that changes nothing for a value like ``like``."""
    if node is None or not _is(node, ("to", "type_as", "float")):
        return False
    got = _val(node)
    return isinstance(got, torch.Tensor) and got.dtype == like.dtype and len(node.users) == 1


def _rms_norm(graph: fx.Graph, rsqrt: fx.Node, objects: dict[str, Any]) -> fx.Node | None:
    """``rsqrt(mean(x ** 2, -1, keepdim) + eps)`` times ``x`` (then maybe a no-op cast and
    a 1-d weight) as ``F.rms_norm``."""
    add = rsqrt.args[0] if rsqrt.args else None
    if not _is(add, _ADD) or len(add.users) != 1:
        return None
    mean = next((a for a in add.args if _is(a, (torch.mean, "mean"))), None)
    eps = _other(add, mean)
    if mean is None or not isinstance(eps, float | int) or len(mean.users) != 1:
        return None
    square = mean.args[0]
    dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
    keep = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if not _is(square, _POW) or len(square.users) != 1 or square.args[1:] != (2,):
        return None
    x = square.args[0]
    xv = _val(x)
    if not isinstance(xv, torch.Tensor) or not xv.is_floating_point() or not keep:
        return None
    listed = dims if isinstance(dims, list | tuple) else [dims]
    if len(listed) != 1 or not isinstance(listed[0], int) or listed[0] % xv.dim() != xv.dim() - 1:
        return None
    scaled = _only_user(rsqrt)
    if scaled is None or not _is(scaled, _MUL) or _other(scaled, rsqrt) is not x:
        return None
    end, weight = scaled, None
    cast = _only_user(scaled)
    if cast is not None and _same_dtype_cast(cast, xv):
        end = cast
    product = _only_user(end)
    if _is(product, _MUL):
        w = _other(product, end)
        wv = objects.get(str(w.target)) if isinstance(w, fx.Node) and w.op == "get_attr" else None
        if isinstance(wv, torch.Tensor) and tuple(wv.shape) == (xv.shape[-1],):
            end, weight = product, w
    with graph.inserting_after(end):
        norm = graph.call_function(F.rms_norm, (x, [xv.shape[-1]], weight, float(eps)))
    norm.meta.update(end.meta)
    end.replace_all_uses_with(norm)
    return norm


def _conv1d(graph: fx.Graph, addmm: fx.Node, objects: dict[str, Any]) -> fx.Node | None:
    """``addmm(P.bias, x2d, P.weight)`` on the stored tensors of one module path ``P`` as a
    call of an ``nn.Linear`` at ``P``, reading ``x`` whole when it was flattened for the
    product and the result is unflattened right after."""
    if len(addmm.args) != 3 or addmm.kwargs:
        return None
    b, x2d, w = addmm.args
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (b, w)):
        return None
    assert isinstance(b, fx.Node) and isinstance(w, fx.Node)
    path, _, wname = str(w.target).rpartition(".")
    bpath, _, bname = str(b.target).rpartition(".")
    weight, bias = objects.get(str(w.target)), objects.get(str(b.target))
    if not path or (path, wname, bpath, bname) != (path, "weight", path, "bias"):
        return None
    if not (isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)):
        return None
    if weight.dim() != 2 or tuple(bias.shape) != (weight.shape[1],):
        return None
    if len(w.users) != 1 or len(b.users) != 1 or isinstance(objects.get(path), nn.Module):
        return None  # the tensors are read elsewhere, or the path is a module already called
    x, end = x2d, addmm
    flat, wide = _val(x2d), _val(addmm)
    if _is(x2d, ("view", "reshape")):
        source = _val(x2d.args[0])
        after = _only_user(addmm)
        back = _val(after)
        if (
            isinstance(source, torch.Tensor)
            and after is not None
            and _is(after, ("view", "reshape"))
            and isinstance(back, torch.Tensor)
            and tuple(back.shape) == (*source.shape[:-1], weight.shape[1])
        ):
            x, end = x2d.args[0], after
    if not isinstance(flat, torch.Tensor) or not isinstance(wide, torch.Tensor):
        return None
    objects[path] = linear_from_conv1d(weight, bias)
    with graph.inserting_after(end):
        call = graph.call_module(path, (x,))
    call.meta.update(end.meta)
    end.replace_all_uses_with(call)
    return call
