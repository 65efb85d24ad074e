"""Which mode and form plain ``quant`` picks, and which explicit combinations are refused.

The *mode* says what is quantized: ``static`` (calibrated int8 activations and weights),
``dynamic`` (int8 Linear, activations quantized on the fly) or ``weight_only`` (int8/int4
Linear weights, float activations). ``mode=auto`` is ``dynamic`` for token models — a model
whose integer-typed inputs feed an embedding (:func:`is_token_model`) — and ``static``
otherwise.

The *form* says which kernels run, and so which output formats can hold the result:

========  ===================================================  ============================
form      what runs                                             formats
========  ===================================================  ============================
int8      fbgemm's packed int8 kernels (TorchScript objects)    ``.pt`` (and in memory)
qdq       float ops between quantize/dequantize pairs           every format; ONNX runtimes
                                                                fuse it into int8 kernels
aten      plain aten int8 kernels (``_int_mm``,                 ``.pt``, ``.pt2``, folder
          ``_weight_int8pack_mm``, ``_weight_int4pack_mm``)
onnx      ONNX integer ops (``DynamicQuantizeLinear`` +         ``.onnx`` (and in memory)
          ``MatMulInteger``), dynamic int8 only
qat       trainable fake-quant                                  every format
========  ===================================================  ============================

``form=auto`` picks, from the output format the pipeline will write (``ctx.target_format``):
the fastest form in PyTorch for ``.pt`` or no output (``int8``; ``aten`` for weight-only),
``qdq`` (static) or ``onnx`` (dynamic) for ``.onnx``, and the exportable form for ``.pt2``,
folders and other formats (``qdq`` for static, ``aten`` for dynamic and weight-only).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphopt import GraphIR, GraphoptError

__all__ = ["FORMS_OF", "check_combination", "is_token_model", "pick_form"]

#: the forms each mode has
FORMS_OF = {
    "static": ("int8", "qdq", "qat"),
    "dynamic": ("int8", "aten", "onnx"),
    "weight_only": ("aten",),
}
#: formats written through torch.export / ONNX, which cannot hold fbgemm's packed weights
EXPORTED = ("pt2", "onnx", "folder")
#: forms that the ONNX exporter cannot translate (aten int8 kernels have no ONNX op)
NOT_ONNX = ("int8", "aten")


def _where(target_format: str | None) -> str:
    """How a message names an output format: "a .onnx file", "a directory"."""
    if target_format == "folder":
        return "a directory"
    return f"a .{target_format} file" if target_format in ("pt", "pt2", "onnx") else "it"


def check_combination(form: str, mode: str, target_format: str | None) -> None:
    """Refuse, in one sentence, explicit options that cannot work together or be written."""
    if mode != "auto" and form != "auto" and form not in FORMS_OF[mode]:
        forms = ", ".join(FORMS_OF[mode])
        raise GraphoptError(
            f"quant(mode={mode}) has the form(s) {forms}, not form={form}; drop form= to let "
            "quant pick one"
        )
    if target_format is None:
        return
    if target_format == "hf":
        raise GraphoptError(
            "quant makes int8 kernels that a transformers save_pretrained folder (--format hf) "
            "cannot hold; write the int8 model with -o model.pt (or .pt2, .onnx), or drop quant"
        )
    where = _where(target_format)
    if form == "int8" and target_format in EXPORTED:
        raise GraphoptError(
            f"quant(form=int8) runs fbgemm kernels whose packed weights only a .pt file can "
            f"hold, not {where}; drop form= (quant then picks the form {where} can hold) or "
            "write -o model.pt"
        )
    if target_format == "onnx" and (form == "aten" or mode == "weight_only"):
        what = f"form={form}" if form == "aten" else f"mode={mode}"
        raise GraphoptError(
            f"quant({what}) uses aten int8 kernels that have no ONNX operator; use plain quant "
            "(int8 in ONNX: QDQ, or dynamic int8 for token models) for -o model.onnx, or "
            "write -o model.pt/.pt2"
        )
    if form == "onnx" and target_format != "onnx":
        raise GraphoptError(
            f"quant(form=onnx) writes ONNX integer ops, which only a .onnx file holds, not "
            f"{where}; drop form= (quant then picks the form {where} can hold) or write "
            "-o model.onnx"
        )


def pick_form(form: str, mode: str, target_format: str | None) -> tuple[str, str]:
    """The form to build and, when ``form=auto`` chose it, why (for the ledger)."""
    if form != "auto":
        return form, ""
    if mode == "weight_only":
        return "aten", ""
    if target_format in (None, "pt"):
        chosen = "int8"
    elif target_format == "onnx":
        chosen = "qdq" if mode == "static" else "onnx"
    else:
        chosen = "qdq" if mode == "static" else "aten"
    if target_format is None:
        return chosen, f"form={chosen}, the fastest in PyTorch (no output format given)"
    return chosen, f"form={chosen}, the fastest form {_where(target_format)} holds"


def _is_embedding(node: fx.Node, ir: GraphIR) -> fx.Node | None:
    """The indices argument of an embedding lookup (module, functional or aten), or None."""
    if node.op == "call_module" and isinstance(ir.module(node), nn.Embedding | nn.EmbeddingBag):
        arg = node.args[0] if node.args else node.kwargs.get("input")
    elif node.op == "call_function" and node.target in (F.embedding, torch.embedding):
        arg = node.args[0] if node.target is F.embedding else node.args[1]
    elif node.op == "call_function" and node.target is torch.ops.aten.embedding.default:
        arg = node.args[1]
    else:
        return None
    return arg if isinstance(arg, fx.Node) else None


def _integer(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and not val.dtype.is_floating_point


def is_token_model(ir: GraphIR) -> bool:
    """Whether an integer-typed model input feeds an embedding lookup (a token model).

    The lookup's indices must be integers computed from that input (directly, or through
    reshapes, slicing and index arithmetic), which is what token ids look like in any
    framework's graph: torch modules, Hugging Face models, or an exported aten graph."""
    ir.analysis("shapes")
    inputs = {n for n in ir.graph.nodes if n.op == "placeholder" and _integer(n)}
    if not inputs:
        return False
    for node in ir.graph.nodes:
        indices = _is_embedding(node, ir)
        if indices is None or not _integer(indices):
            continue
        seen, stack = set(), [indices]
        while stack:
            current = stack.pop()
            if current in inputs:
                return True
            if current in seen:
                continue
            seen.add(current)
            stack.extend(a for a in current.all_input_nodes if _integer(a))
    return False
