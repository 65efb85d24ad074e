"""``sparsify``: unstructured magnitude pruning, made permanent.

Zeroes the weights of smallest absolute value — per layer (``scope=layer``, what
``torch.nn.utils.prune.l1_unstructured`` does to each layer) or ranked across all selected
layers together (``scope=global``, what ``torch.nn.utils.prune.global_unstructured`` with
``L1Unstructured`` does). ``amount`` is the fraction zeroed: ``round(amount · n)`` weights of
a layer with ``n``, or of all selected weights together.

The result keeps no masks, hooks or parametrizations: the selected weights are plain
tensors with zeros in them, so the model saves, exports and fine-tunes like any other. A
model that already carries ``torch.nn.utils.prune`` masks has them made permanent first.
Shapes and dense MACs do not change; the gain comes from compression or sparse kernels.

>>> import torch, graphopt
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 32)).eval()
>>> result = graphopt.optimize(model, "sparsify(amount=0.75)", example_inputs=(torch.randn(2, 64),))
>>> float((result.ir.gm.get_submodule("0").weight == 0).float().mean())
0.75
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

import graphopt
from graphopt import GraphIR, GraphoptError, NamePatterns, PassContext

__all__ = ["Sparsify", "magnitude_mask", "sparsifiable_weights"]

Kind = Literal["conv", "linear", "conv_transpose", "embedding", "attention"]

_KINDS: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "conv_transpose": (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
    "linear": (nn.Linear,),
    "embedding": (nn.Embedding, nn.EmbeddingBag),
    "attention": (nn.MultiheadAttention,),
}
# attention keeps its input projection as raw parameters; its out_proj is a Linear
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def sparsifiable_weights(
    model: nn.Module, kinds: tuple[str, ...]
) -> Iterator[tuple[str, nn.Module, str]]:
    """``(module path, module, parameter name)`` of every weight of the given layer kinds,
    in module order; a parameter shared by several modules is listed once."""
    types = {kind: _KINDS[kind] for kind in kinds}
    seen: set[int] = set()
    for path, module in model.named_modules():
        kind = next((k for k, t in types.items() if isinstance(module, t)), None)
        if kind is None:
            continue
        names = _ATTENTION_WEIGHTS if kind == "attention" else ("weight",)
        for name in names:
            param = getattr(module, name, None)
            if not isinstance(param, torch.Tensor) or id(param) in seen:
                continue
            seen.add(id(param))
            yield path, module, name


def magnitude_mask(scores: torch.Tensor, amount: float) -> torch.Tensor:
    """Boolean mask, ``False`` at the ``round(amount · n)`` entries of smallest magnitude."""
    count = round(amount * scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if count:
        smallest = torch.topk(scores.detach().abs().reshape(-1), count, largest=False).indices
        keep[smallest] = False
    return keep.reshape(scores.shape)


class Sparsify(graphopt.Pass):
    """The ``sparsify`` pass: see the module docstring and ``docs/passes/sparsify.md``."""

    name = "sparsify"
    summary = (
        "Zero the smallest-magnitude weights, per layer or ranked globally "
        "(unstructured; permanent, no masks left)."
    )
    exact = False
    keeps = ("shapes", "costs")  # shapes and dense counts do not change

    @dataclass
    class Options:
        amount: float = graphopt.option(
            0.5,
            "fraction of the selected weights to zero",
            ge=0,
            lt=1,
            what="a fraction",
        )
        scope: Literal["layer", "global"] = graphopt.option(
            "layer",
            "rank weights within each layer (l1_unstructured) or across all selected layers "
            "(global_unstructured)",
        )
        layers: tuple[Kind, ...] = graphopt.option(
            ("conv", "linear"),
            "which layer kinds to sparsify: conv, linear, conv_transpose, embedding, attention",
        )
        ignore: tuple[str, ...] = graphopt.option(
            (), "layers to leave alone: module paths, glob patterns allowed"
        )

    def run(self, ir: GraphIR, ctx: PassContext) -> None:
        opts = self.options
        if not opts.layers:
            raise GraphoptError("sparsify(layers=[]) selects nothing; name at least one kind")
        _make_torch_prune_permanent(ir.gm, ctx)
        selected = self._select(ir.gm, ctx)
        if not selected:
            ctx.note("nothing to sparsify: no weight of the selected layer kinds")
            return
        weights = [getattr(module, name) for _, module, name in selected]
        if opts.scope == "global":
            flat = torch.cat([w.detach().reshape(-1) for w in weights])
            masks = magnitude_mask(flat, opts.amount).split([w.numel() for w in weights])
        else:
            masks = tuple(magnitude_mask(w, opts.amount).reshape(-1) for w in weights)
        zero_total = size_total = 0
        with torch.no_grad():
            for (path, _, name), weight, keep in zip(selected, weights, masks, strict=True):
                weight.mul_(keep.reshape(weight.shape).to(weight.dtype))
                zeros = int((weight == 0).sum())
                zero_total += zeros
                size_total += weight.numel()
                label = f"{path}.{name}" if path else name
                ctx.note(
                    f"{label}: {zeros / weight.numel():.1%} zero ({zeros:,} of {weight.numel():,})"
                )
        ctx.stat("layers sparsified", len(selected))
        ctx.stat("weights zero", zero_total)
        ctx.stat("sparsity %", round(100 * zero_total / size_total, 2))
        ctx.note(
            "sparsify is lossy: follow it with distill, which keeps zero weights at zero "
            "(after other fine-tuning, run sparsify again)"
        )

    def _select(self, gm: nn.Module, ctx: PassContext) -> list[tuple[str, nn.Module, str]]:
        ignore = NamePatterns(self.options.ignore)
        selected = []
        for path, module, name in sparsifiable_weights(gm, tuple(self.options.layers)):
            if ignore.matches(path):
                ctx.note(f"kept {path}: ignored")
            elif parametrize.is_parametrized(module, name):
                ctx.note(f"kept {path}: its {name} is computed by a parametrization")
            elif not getattr(module, name).is_floating_point():
                ctx.note(f"kept {path}: its {name} is not a floating-point tensor")
            else:
                selected.append((path, module, name))
        ignore.check_all_used("sparsify", "layer of the selected kinds")
        return selected


def _make_torch_prune_permanent(gm: nn.Module, ctx: PassContext) -> None:
    """Fold masks left by ``torch.nn.utils.prune`` into plain weights (``prune.remove``)."""
    for path, module in gm.named_modules():
        hooks = [
            h for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)
        ]
        for hook in hooks:  # one per pruned tensor (several prunings share a container)
            prune.remove(module, hook._tensor_name)
            ctx.note(f"{path}.{hook._tensor_name}: torch.nn.utils.prune mask made permanent")


PASSES = (Sparsify,)
