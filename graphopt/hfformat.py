"""The ``hf`` output format: a folder that transformers' own ``from_pretrained`` reloads.

A model captured from a transformers ``PreTrainedModel`` remembers its class and
configuration (``GraphModule.meta[HF_ORIGIN]``). Writing rebuilds that class from a
configuration whose sizes are read off the optimised graph, loads the graph's weights into
it by their qualified names (the graph calls the model's own modules), and saves it with
``save_pretrained`` (``config.json`` + safetensors, plus ``graphopt.json``). The usual
lowering check then reloads the folder with ``from_pretrained`` and compares its outputs
with the in-memory model, so a size the configuration cannot express is never written.

Sizes read off the graph, each of which must be the same in every layer (a transformers
configuration has one value per size):

* the hidden size, from the input embeddings' width;
* the attention heads (and key/value heads), from the query (and key) of every
  ``scaled_dot_product_attention`` call, and the head width where the configuration has a
  ``head_dim`` of its own; the attention scale the graph uses (the original head width's,
  when pruning narrowed the heads) is folded into the query projection, since the
  reloaded model scales by its new head width;
* the FFN width (``intermediate_size`` and its aliases), from the layers that had the
  original FFN width.

Refused in one sentence: a model not captured from transformers, an int8 model (a
configuration has no room for int8 kernels), sizes that differ between layers, weights
the rebuilt model has no place for.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .capture import HF_ORIGIN, remember_origin
from .errors import GraphoptError, first_line

__all__ = ["HF_ORIGIN", "check_hf", "load_hf", "read_hf_metadata", "remember_origin", "write_hf"]

#: ``GraphModule.meta`` key: the transformers class name and configuration it was captured from
METADATA_NAME = "graphopt.json"
#: configuration keys of the FFN width, by family (BERT/Llama, DistilBERT, GPT-2, OPT …)
_FFN_KEYS = ("intermediate_size", "hidden_dim", "n_inner", "ffn_dim")
_SDPA = (
    torch.nn.functional.scaled_dot_product_attention,
    torch._C._nn.scaled_dot_product_attention,
)


def check_hf(gm: fx.GraphModule) -> None:
    """Refuse, before any work, a model the ``hf`` format cannot hold."""
    if HF_ORIGIN not in gm.meta:
        raise GraphoptError(
            "the hf output format needs a model captured from transformers (hf:DIR, hf:TYPE or "
            "a PreTrainedModel); write this one as .pt2, .pt, .onnx or a folder"
        )


def _origin_class(gm: fx.GraphModule) -> tuple[Any, Any]:
    """The transformers class and a fresh copy of the original configuration."""
    import transformers

    origin = gm.meta[HF_ORIGIN]
    cls = getattr(transformers, origin["class"])
    config_cls: Any = getattr(cls, "config_class", None) or transformers.AutoConfig
    config = config_cls.from_dict(dict(origin["config"]))
    return cls, config


def _width(gm: fx.GraphModule, name: str) -> int:
    """The output width of the Linear (or embedding) called ``name``."""
    module: Any = gm.get_submodule(name)
    return int(module.weight.shape[0])


def _attention_calls(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> list[fx.Node]:
    """The attention calls, with each argument's shape recorded (``tensor_meta``)."""
    copy_gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # the shapes go on copies of the nodes
    with torch.no_grad():
        ShapeProp(copy_gm).propagate(*inputs)
    return [n for n in copy_gm.graph.nodes if n.op == "call_function" and n.target in _SDPA]


def _one(values: list[int], what: str) -> int:
    if len(set(values)) != 1:
        raise GraphoptError(
            f"the layers have different {what} ({sorted(set(values))}), which one transformers "
            "configuration cannot hold; prune to the same width in every layer (or write .pt2)"
        )
    return values[0]


def _projection(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """The Linear whose output an attention input is (through reshapes, repeats and rotary
    embeddings, which are linear in it): its qualified name."""
    while isinstance(node, fx.Node):
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Linear):
            return str(node.target)
        node = next((a for a in node.args if isinstance(a, fx.Node)), None)  # type: ignore[assignment]
    return None


def _sized_config(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> tuple[Any, Any, dict]:
    """The class, the configuration with the graph's sizes, and the query scale factors."""
    cls, config = _origin_class(gm)
    with torch.device("meta"):
        original = cls(config)
    embeddings = original.get_input_embeddings()
    name = next(n for n, m in original.named_modules() if m is embeddings)
    table: Any = gm.get_submodule(name)
    config.hidden_size = int(table.weight.shape[1])
    calls = _attention_calls(gm, inputs)
    rescale: dict[str, float] = {}
    if calls:
        q = [c.args[0].meta["tensor_meta"].shape for c in calls]  # type: ignore[union-attr]
        heads = _one([shape[1] for shape in q], "head counts")
        head_dim = _one([shape[-1] for shape in q], "head widths")
        config.num_attention_heads = heads
        if getattr(config, "num_key_value_heads", None) is not None:
            # read off the key projection: the attention call may see keys repeated per group
            keys = [_projection(c.args[1], gm) for c in calls]  # type: ignore[arg-type]
            widths = [_width(gm, k) // head_dim for k in keys if k]
            config.num_key_value_heads = _one(widths or [heads], "key/value head counts")
        if getattr(config, "head_dim", None) is not None:
            config.head_dim = head_dim
        for call in calls:
            scale = call.kwargs.get("scale")
            linear = _projection(call.args[0], gm)  # type: ignore[arg-type]
            if isinstance(scale, float) and linear is not None:
                rescale[linear] = scale * head_dim**0.5
    key = next((k for k in _FFN_KEYS if getattr(config, k, None)), None)
    if key is not None:
        width = getattr(config, key)
        widths = [
            _width(gm, n)
            for n, m in original.named_modules()
            if isinstance(m, nn.Linear) and m.out_features == width and _has(gm, n)
        ]
        if widths:
            setattr(config, key, _one(widths, "FFN widths"))
    return cls, config, rescale


def _has(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_submodule(name)
    except AttributeError:
        return False
    return True


def _rebuild(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> Any:
    """The transformers model with the graph's sizes and weights."""
    check_hf(gm)
    state = gm.state_dict()
    if any(t.dtype in (torch.qint8, torch.quint8) for t in state.values()) or any(
        "quantized" in type(m).__module__ for m in gm.modules()
    ):
        raise GraphoptError(
            "the hf output format holds float weights only and this model is quantized to "
            "int8; write it as .pt (or .pt2/.onnx), or drop quant for --format hf"
        )
    cls, config, rescale = _sized_config(gm, inputs)
    try:
        model = cls(config)
    except Exception as exc:
        raise GraphoptError(
            f"{cls.__name__} cannot be built with the optimised sizes ({first_line(exc)}); "
            "write .pt2 or .pt instead"
        ) from None
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            raise GraphoptError(
                f"{cls.__name__}'s configuration cannot give '{key}' the optimised shape "
                f"{tuple(tensor.shape)} (it makes {tuple(own[key].shape)}); write .pt2 or .pt"
            )
    unplaced = [k for k in state if k not in own]
    if unplaced:
        raise GraphoptError(
            f"the optimised model has weights {cls.__name__} has no place for ('{unplaced[0]}'"
            f"{' …' if len(unplaced) > 1 else ''}): a pass changed its structure; write .pt2 or .pt"
        )
    with torch.no_grad():
        for key, tensor in state.items():
            own[key].copy_(tensor)
        for linear, factor in rescale.items():
            module: Any = model.get_submodule(linear)
            module.weight.mul_(factor)
            if module.bias is not None:
                module.bias.mul_(factor)
    return model.eval()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' progress bars off while it saves or loads (graphopt shows its own)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def write_hf(gm: fx.GraphModule, inputs: tuple[Any, ...], path: str, meta: dict) -> None:
    """Write ``gm`` as a ``save_pretrained`` folder at ``path`` (see the module docstring)."""
    model = _rebuild(gm, inputs)
    names = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    with _quiet():
        model.save_pretrained(path)
    with open(os.path.join(path, METADATA_NAME), "w") as f:
        json.dump({**meta, "input_names": names}, f, indent=2)


def load_hf(path: str) -> Callable[..., Any]:
    """The folder reloaded as a user does: the class its config.json names, from_pretrained."""
    import transformers

    with open(os.path.join(path, "config.json")) as f:
        arch = json.load(f)["architectures"][0]
    with _quiet():
        model = getattr(transformers, arch).from_pretrained(path, local_files_only=True).eval()
    names = (read_hf_metadata(path) or {}).get("input_names") or []

    def run(*args: Any) -> Any:
        with torch.no_grad():
            return model(**dict(zip(names, args, strict=True)))

    return run


def read_hf_metadata(path: str) -> dict[str, Any] | None:
    """The graphopt metadata stored beside the configuration, if any."""
    file = os.path.join(path, METADATA_NAME)
    if not os.path.exists(file):
        return None
    with open(file) as f:
        return dict(json.load(f))
