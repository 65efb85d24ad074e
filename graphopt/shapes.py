"""Shapes and costs of a graph, the engine of the built-in ``shapes`` and ``costs`` analyses.

:func:`propagate_shapes` runs the graph once on fake tensors (no real compute, no real
memory), storing each node's fake value in ``node.meta["val"]`` and counting its
multiply-accumulates with torch's FLOP counter, so functional calls and attention are
counted as well as modules. Norms, activations, linear layers and convolutions are not run:
their outputs and MACs follow from their input's shape (:data:`_SHAPE_RULES`).
:func:`node_costs` turns that into per-node parameters and MACs. Both work on a plain fx
``GraphModule``; :class:`graphopt.GraphIR` offers them as its ``shapes`` and ``costs``
analyses.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from torch.utils.flop_counter import FlopCounterMode

from .errors import GraphoptError, first_line

__all__ = [
    "FUSED_FLOPS",
    "MACS",
    "NodeCost",
    "counts_flops",
    "node_costs",
    "packed_weights",
    "propagate_shapes",
    "run_counting",
]

#: node.meta key holding a node's multiply-accumulates, set by :func:`propagate_shapes`
MACS = "graphopt_macs"


@dataclass(frozen=True)
class NodeCost:
    """Parameters owned by a node (counted at its first use) and multiply-accumulates."""

    params: int
    macs: int


#: module types (exactly these, not subclasses) whose forward never reaches an op that
#: torch's FLOP counter counts (matmuls, convolutions, attention)
_FLOP_FREE_MODULES: frozenset[type] = frozenset({
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm,
    nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.PReLU, nn.ELU, nn.Mish, nn.Softmax, nn.Dropout, nn.Dropout2d,
    nn.Dropout3d, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Unflatten, nn.Upsample,
    nn.ZeroPad2d, nn.ConstantPad2d, nn.ChannelShuffle, nn.Embedding,
})  # fmt: skip
#: functions and tensor methods that never reach a counted op
_FLOP_FREE_FUNCTIONS: frozenset[Any] = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    operator.getitem, getattr, torch.add, torch.sub, torch.mul, torch.cat, torch.stack,
    torch.flatten, torch.reshape, torch.relu, torch.sigmoid, torch.tanh, torch.transpose,
    torch.permute, torch.chunk, torch.split, torch.narrow, torch.unsqueeze, torch.squeeze,
    torch.mean, torch.sum, torch.softmax, F.relu, F.relu6, F.gelu, F.silu, F.hardswish,
    F.hardsigmoid, F.sigmoid, F.softmax, F.dropout, F.adaptive_avg_pool2d, F.avg_pool2d,
    F.max_pool2d, F.layer_norm, F.batch_norm, F.group_norm, F.pad, F.interpolate,
})  # fmt: skip
_FLOP_FREE_METHODS = frozenset({
    "add", "sub", "mul", "div", "relu", "sigmoid", "view", "reshape", "flatten", "size",
    "dim", "permute", "transpose", "contiguous", "chunk", "split", "unsqueeze", "squeeze",
    "expand", "mean", "sum", "softmax", "clone", "float", "to", "narrow", "unflatten",
})  # fmt: skip


def counts_flops(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether running ``node`` may reach an op torch's FLOP counter counts. Nodes that
    cannot are run on real tensors outside the counter, at 0 MACs, without its Python
    dispatch layer (which slows every op and decomposes batch norm into several)."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))) not in _FLOP_FREE_MODULES
    if node.op == "call_function":
        return node.target not in _FLOP_FREE_FUNCTIONS
    if node.op == "call_method":
        return node.target not in _FLOP_FREE_METHODS
    return False  # placeholders, attributes, output


def _conv_macs(m: Any, out: torch.Tensor) -> int:
    # every output element sums over in_channels/groups × kernel positions
    return out.numel() * m.weight[0].numel()


def _linear_macs(m: Any, out: torch.Tensor) -> int:
    return out.numel() * m.in_features


#: module types (exactly these) whose MACs follow from their output's shape, as torch's FLOP
#: counter computes them for the convolution and matmul they run (bias adds not counted)
_SHAPE_MACS: dict[type, Callable[[Any, torch.Tensor], int]] = {
    nn.Conv1d: _conv_macs,
    nn.Conv2d: _conv_macs,
    nn.Conv3d: _conv_macs,
    nn.Linear: _linear_macs,
    DynamicLinear: _linear_macs,
}


def run_counting(gm: fx.GraphModule, node: fx.Node, run: Callable[[], Any]) -> tuple[Any, int]:
    """``run()`` (which executes ``node``) and the multiply-accumulates it performed, counted
    by torch's FLOP counter (2 FLOPs per MAC) with :data:`FUSED_FLOPS` added, or for plain
    convolutions and linear layers from the output's shape (the same count, without the
    counter's per-op dispatch)."""
    if not counts_flops(gm, node):
        return run(), 0
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        formula = _SHAPE_MACS.get(type(m))
        if formula is not None:
            out = run()
            return out, formula(m, out)
    with FlopCounterMode(display=False, custom_mapping=FUSED_FLOPS) as counter:
        result = run()
    return result, counter.get_total_flops() // 2


def _keep_shape(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """Batch norms, layer norms and activations: an empty tensor like the input, 0 MACs. A
    norm whose sizes do not match raises as running it would."""
    is_norm = isinstance(module, nn.modules.batchnorm._NormBase | nn.LayerNorm)
    if is_norm and not x.is_floating_point():
        return None  # let the real op say what it thinks of that
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        x.dim() < 2 or x.shape[1] != module.num_features
    ):
        raise RuntimeError(
            f"running_mean should contain {x.shape[1] if x.dim() > 1 else 0} elements "
            f"not {module.num_features}"
        )
    if isinstance(module, nn.LayerNorm):
        k = len(module.normalized_shape)
        if tuple(x.shape[x.dim() - k :]) != tuple(module.normalized_shape):
            raise RuntimeError(
                f"LayerNorm over {list(module.normalized_shape)} given an input of shape "
                f"{list(x.shape)}"
            )
    return torch.empty_like(x), 0


def _linear_shape(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """A Linear's output from its input's shape; also torch's dynamic int8 Linear, whose
    packed weights cannot enter fake-tensor mode (float in, float out, the same MACs)."""
    assert isinstance(module, nn.Linear | DynamicLinear)
    weight: Any = module.weight
    dtype = torch.float32 if callable(weight) else weight.dtype  # dynamic: weight() unpacks
    if x.dim() == 0 or x.dtype != dtype:
        return None  # mixed dtypes: the real op decides
    if x.shape[-1] != module.in_features:
        raise RuntimeError(
            f"mat1 and mat2 shapes cannot be multiplied ({x.shape[-1]} features into a "
            f"Linear of {module.in_features})"
        )
    out = x.new_empty((*x.shape[:-1], int(module.out_features)))
    return out, _linear_macs(module, out)


def _conv_shape(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """A (non-transposed) convolution's output from the input's shape: each spatial size is
    ``(n + 2·padding − dilation·(kernel − 1) − 1) // stride + 1`` (other padding modes pad
    the same amount explicitly first)."""
    assert isinstance(module, nn.modules.conv._ConvNd)
    spatial = len(module.kernel_size)
    if x.dtype != module.weight.dtype or x.dim() not in (spatial + 1, spatial + 2):
        return None  # the real op decides
    if x.shape[-spatial - 1] != module.in_channels:
        raise RuntimeError(
            f"expected input to have {module.in_channels} channels, but got "
            f"{x.shape[-spatial - 1]} channels instead"
        )
    sizes = []
    for i, n in enumerate(x.shape[-spatial:]):
        k, s, d = module.kernel_size[i], module.stride[i], module.dilation[i]
        if module.padding == "same":
            sizes.append(n)
            continue
        p = 0 if module.padding == "valid" else module.padding[i]
        size = (n + 2 * int(p) - d * (k - 1) - 1) // s + 1
        if size <= 0:
            raise RuntimeError(
                f"calculated output size {size} is too small (input {n}, kernel {k})"
            )
        sizes.append(size)
    out = x.new_empty((*x.shape[: -spatial - 1], module.out_channels, *sizes))
    return out, _conv_macs(module, out)


#: module types (exactly these) whose output shape, dtype and MACs follow from their input's:
#: shape propagation makes an empty fake tensor instead of running them under fake tensors,
#: where a batch norm decomposes into several ops (half of the propagation's time on a
#: ResNet) and each op pays the fake-tensor and FLOP-counter dispatch
_SHAPE_RULES: dict[type, Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, int] | None]] = {
    **dict.fromkeys(
        (
            nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.ReLU, nn.ReLU6,
            nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
            nn.Mish, nn.Dropout, nn.Dropout2d, nn.Identity,
        ),
        _keep_shape,
    ),
    nn.Linear: _linear_shape,
    DynamicLinear: _linear_shape,
    nn.Conv1d: _conv_shape,
    nn.Conv2d: _conv_shape,
    nn.Conv3d: _conv_shape,
}  # fmt: skip


def _linear_dynamic_shape(
    x: torch.Tensor, packed: Any, *args: Any, **kwargs: Any
) -> tuple[torch.Tensor, int]:
    """``quantized::linear_dynamic`` (float in, float out) from the packed weight's rows."""
    with unset_fake_temporarily():  # the real packed weight, not a fake of it
        out_features = int(packed.unpack()[0].shape[0])
    out = x.new_empty((*x.shape[:-1], out_features))
    return out, x.numel() * out_features


#: functions of packed weights (TorchScript objects, which fake-tensor mode cannot take): the
#: output and MACs from the input's shape and the packed weight's
_PACKED_RULES: dict[Any, Callable[..., tuple[torch.Tensor, int]]] = {
    torch.ops.quantized.linear_dynamic.default: _linear_dynamic_shape,
}


class _FakeCostInterpreter(fx.Interpreter):
    """Runs each node under fake tensors and records its value and MAC count. (One FLOP
    counter spans the run: entered per node it would cost more than it saves here.)"""

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode, counter: FlopCounterMode) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.mode = mode
        self.counter = counter
        self.failure: tuple[fx.Node, Exception] | None = None
        self.ruled_macs = 0  # MACs of a module given by a shape rule instead of the counter

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        rule = _SHAPE_RULES.get(type(module))
        if rule is not None and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            ruled = rule(module, args[0])
            if ruled is not None:
                result, self.ruled_macs = ruled
                return result
        return super().call_module(target, args, kwargs)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        rule = _PACKED_RULES.get(target)
        if rule is not None:
            result, self.ruled_macs = rule(*args, **kwargs)
            return result
        return super().call_function(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        self.ruled_macs = 0
        try:
            with self.mode:
                result = super().run_node(n)
        except Exception as exc:
            # Remember the failure; fx's run loop rewrites the message of what passes through.
            self.failure = (n, exc)
            raise
        n.meta["val"] = result
        # FLOP counter reports 2 FLOPs per multiply-accumulate.
        n.meta[MACS] = (self.counter.get_total_flops() - before) // 2 + self.ruled_macs
        return result

    def describe_failure(self) -> str:
        assert self.failure is not None
        node, exc = self.failure
        kind = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if node.op == "call_module":
            kind = type(self.module.get_submodule(str(node.target))).__name__
        return (
            f"the example input does not fit the model: node '{node.name}' ({kind}) failed "
            f"with: {first_line(exc)}; give the right input with --input-shape"
        )


def _attention_macs(query: Any, key: Any) -> int:
    """MACs of multi-head attention with input/output projections, from the input shapes."""
    batch, length, embed = (1, *query) if len(query) == 2 else query
    source = key[-2]
    projections = length * embed * embed * 2 + source * embed * embed * 2  # q, out; k, v
    scores_and_values = 2 * length * source * embed
    return batch * (projections + scores_and_values)


def _fused_mha_flops(query: Any, key: Any, *args: Any, **kwargs: Any) -> int:
    # aten._native_multi_head_attention: nn.MultiheadAttention's inference fast path
    return 2 * _attention_macs(query, key)


def _fused_encoder_layer_flops(src: Any, *args: Any, **kwargs: Any) -> int:
    # aten._transformer_encoder_layer_fwd: nn.TransformerEncoderLayer's inference fast path;
    # positional args 14 and 16 are the two feed-forward weights (F×E and E×F).
    tokens = src[0] * src[1] if len(src) == 3 else src[0]
    ffn = tokens * (args[13][0] * args[13][1] + args[15][0] * args[15][1])
    return 2 * (_attention_macs(src, src) + ffn)


def _cpu_attention_flops(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    # aten._scaled_dot_product_flash_attention_for_cpu, what F.scaled_dot_product_attention
    # runs on CPU: batch × heads × L × S × (E for Q·Kᵀ + Ev for attention·V)
    *lead, length, embed = query
    source, value_embed = key[-2], value[-1]
    return 2 * math.prod(lead) * length * source * (embed + value_embed)


def _int_mm_flops(a: Any, b: Any, *args: Any, **kwargs: Any) -> int:
    # aten._int_mm: int8 (M × K) @ (K × N) into int32
    return 2 * a[0] * a[1] * b[1]


def _int8pack_mm_flops(x: Any, weight: Any, *args: Any, **kwargs: Any) -> int:
    # aten._weight_int8pack_mm: x (M × K) @ int8 weight (N × K)ᵀ
    return 2 * x[0] * x[1] * weight[0]


def _int4pack_mm_flops(x: Any, weight: Any, group: Any, scale_zero: Any, **kwargs: Any) -> int:
    # aten._weight_int4pack_mm_for_cpu: x (M × K), packed int4 weight, per-group scales and
    # zeros shaped K/group × N × 2
    return 2 * x[0] * x[1] * scale_zero[1]


#: FLOP formulas for ops torch's counter does not know: the fast paths that
#: nn.MultiheadAttention and nn.TransformerEncoderLayer take in eval mode without grad, the
#: CPU attention kernel, and the int8/int4 matrix products of quantized Linears
FUSED_FLOPS = {
    torch.ops.aten._native_multi_head_attention: _fused_mha_flops,
    torch.ops.aten._transformer_encoder_layer_fwd: _fused_encoder_layer_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._int_mm: _int_mm_flops,
    torch.ops.aten._weight_int8pack_mm: _int8pack_mm_flops,
    torch.ops.aten._weight_int4pack_mm_for_cpu: _int4pack_mm_flops,
}


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Fill ``node.meta["val"]`` and MAC counts (``node.meta[MACS]``) for every node of
    ``gm``, running it on fake copies of ``example_inputs``."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    inputs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]
    n_placeholders = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if len(inputs) != n_placeholders:
        raise GraphoptError(
            f"the model takes {n_placeholders} input(s) but {len(inputs)} example input(s) were "
            "given; give one --input-shape per input"
        )
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=FUSED_FLOPS) as counter:
        interpreter = _FakeCostInterpreter(gm, mode, counter)
        try:
            interpreter.run(*inputs)
        except Exception:
            if interpreter.failure is None:
                raise
            raise GraphoptError(interpreter.describe_failure()) from None


def node_costs(gm: fx.GraphModule) -> dict[str, NodeCost]:
    """Per-node parameters (each parameter counted at its first use) and MACs, from the
    MAC counts :func:`propagate_shapes` left in the nodes' metadata."""
    seen: set[int] = set()
    out = {}
    for node in gm.graph.nodes:
        params = 0
        tensors: list[torch.Tensor] = []
        if node.op == "call_module":
            tensors = list(gm.get_submodule(str(node.target)).parameters())
        elif node.op == "get_attr":
            value = operator.attrgetter(str(node.target))(gm)
            if isinstance(value, torch.nn.Parameter):
                tensors = [value]
            elif id(value) not in seen:  # unpacking makes new tensors: count the pack once
                seen.add(id(value))
                params += sum(t.numel() for t in packed_weights(value))
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                params += t.numel()
        out[node.name] = NodeCost(params=params, macs=int(node.meta.get(MACS, 0)))
    return out


def packed_weights(value: Any) -> list[torch.Tensor]:
    """The tensors inside a packed-weight object of the quantized kernels (what
    ``quantized::conv2d_prepack``/``linear_prepack`` return), so int8 weights count as
    parameters; an empty list for anything else."""
    if not isinstance(value, torch.ScriptObject) or not hasattr(value, "unpack"):
        return []
    try:
        unpacked = value.unpack()
    except Exception:  # a packed object of a kind that cannot unpack on this build
        return []
    return [t for t in unpacked if isinstance(t, torch.Tensor)]
