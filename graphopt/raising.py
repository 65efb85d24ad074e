"""Raising a ``torch.export`` program to graphopt's vocabulary.

torch.export records a model as ATen operators (``aten.conv2d``, ``aten.add.Tensor`` …) on
lifted parameters. The passes speak the vocabulary of ``torch.fx`` symbolic tracing instead:
calls of leaf modules (``call_module`` of a ``Conv2d``, ``Linear``, ``LayerNorm`` …) and
torch-level functions and methods (``operator.add``, ``torch.cat``, ``F.relu``,
``Tensor.view`` …). :func:`raise_program` rewrites an exported program into that vocabulary
in four steps:

1. **Leaf-module calls.** When the live model is at hand, every call of a leaf module (a
   ``torch.nn`` layer, as fx keeps it, or one the user named) was recorded by export with its
   exact inputs and outputs (``preserve_module_call_signature``); the ATen nodes of each call
   become one ``call_module`` of the original module.
2. **Functions.** Every other ATen node becomes the torch function or tensor method it came
   from, from a table for the ops the passes know and, for the rest, the same-named builtin
   ``torch.*`` function or ``Tensor`` method (both are bound to the very same ATen schema). An
   op with no torch-level equivalent stays an ATen ``call_function``: the passes treat it as
   an op they do not know (prune freezes its channels, quant leaves it in float). In-place
   ops become out-of-place where no other reader can see the difference.
3. **Layers from functions.** A functional layer whose weights are stored tensors of one
   module path (``F.conv2d(x, conv1.weight, …)``) becomes a call of that module: the live
   module when it is exactly that layer, or, for a program loaded from a ``.pt2`` file with
   no model behind it, a ``torch.nn`` layer rebuilt around the same tensors.
4. **Idioms.** Layers written out in arithmetic (RMSNorm, Hugging Face's Conv1D) become
   the torch layer they compute (:mod:`graphopt.idioms`).

Nodes are named after the module they ran in (``layer1_0_conv1``, ``layer1_0_add``), so two
captures of one model give the same names (distillation pairs teacher and student by them),
and carry ``nn_module_stack`` as fx records it.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import functools
import operator
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ConstantArgument,
    InputKind,
    OutputKind,
    TensorArgument,
)
from torch.utils import _pytree as pytree

from .errors import GraphoptError
from .fxutil import fetch
from .idioms import raise_idioms

__all__ = ["raise_program"]

aten = torch.ops.aten

#: ATen nodes that only check what export assumed (metadata, scalar ranges): dropped
_CHECKS = {
    getattr(aten, name).default
    for name in (
        "_assert_tensor_metadata",
        "_assert_scalar",
        "sym_constrain_range",
        "sym_constrain_range_for_size",
    )
    if hasattr(aten, name)
}

_INT_MAX = sys.maxsize
#: node.meta key of the name a raised node is meant to have
NAME = "graphopt_name"


@dataclass
class _Call:
    """What an ATen node becomes: an fx opcode, a target, and arguments."""

    op: str
    target: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


#: the result meaning "this node is its first argument" (aliases and checks that pass through)
_SAME = _Call("same", None, (), {})


def raise_program(
    program: ExportedProgram, root: nn.Module | None = None, *, name: str | None = None
) -> fx.GraphModule:
    """An fx GraphModule computing what ``program`` computes, in graphopt's vocabulary (see
    the module docstring). ``root`` is the live model the program was exported from (its
    modules and tensors are used, not copied); without it the layers are rebuilt from the
    program's own tensors. Its inputs are the program's tensor inputs, flattened in order."""
    return _Raiser(program, root).run(name)


class _Raiser:
    def __init__(self, program: ExportedProgram, root: nn.Module | None) -> None:
        self.program = program
        self.root = root
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.objects: dict[str, Any] = {}  # attribute path -> module or tensor of the result
        self.attr_nodes: dict[str, fx.Node] = {}
        old_nodes = list(program.graph.nodes)
        self.position = {n: i for i, n in enumerate(old_nodes)}
        self.base = _alias_bases(old_nodes)
        self.first_only: set[fx.Node] = set()
        self.order: dict[fx.Node, int] = {}  # copied node -> position at copy time
        self.scopes: dict[str, list[fx.Node]] = {}  # module-stack key -> copied nodes in it
        self.replaced: dict[fx.Node, fx.Node] = {}  # raised away -> what stands for it
        self.aliases: dict[fx.Node, list[fx.Node]] = {}
        for node, base in self.base.items():
            self.aliases.setdefault(base, []).append(node)

    # -- driver ---------------------------------------------------------------------------

    def run(self, name: str | None) -> fx.GraphModule:
        self._copy()
        if self.root is not None:
            self._raise_leaf_calls()
        self._raise_layers()
        self._raise_idioms()
        _drop_dead_code(self.graph)
        self.graph = _renamed(self.graph)
        for node in self.graph.nodes:
            node.meta.pop("val", None)  # export's fake values; the shapes analysis redoes them
            node.meta["nn_module_stack"] = _fx_stack(node.meta.pop("export_stack", {}))
        gm = _graph_module(self.objects, self.graph, name or self._class_name())
        gm.train(False)
        # a pickled GraphModule is rebuilt by tracing its code again with this tracer class
        gm.graph._tracer_cls = gm._tracer_cls = OutputTracer
        return gm

    def _class_name(self) -> str:
        for node in self.program.graph.nodes:
            for path, kind in node.meta.get("nn_module_stack", {}).values():
                if path == "":
                    return str(kind).rsplit(".", 1)[-1]
        return type(self.root).__name__ if self.root is not None else "ExportedModel"

    # -- step 0: a plain graph with get_attr for parameters, buffers and constants ----------

    def _copy(self) -> None:
        sig = self.program.graph_signature
        placeholders = [n for n in self.program.graph.nodes if n.op == "placeholder"]
        specs = list(zip(placeholders, sig.input_specs, strict=True))
        for node, spec in specs:  # the model's inputs first, in order
            if spec.kind == InputKind.USER_INPUT:
                if isinstance(spec.arg, ConstantArgument):
                    self.env[node] = spec.arg.value
                else:
                    self.env[node] = self.graph.placeholder(node.name)
        for node, spec in specs:
            if spec.kind == InputKind.USER_INPUT:
                continue
            if spec.kind in (
                InputKind.PARAMETER,
                InputKind.BUFFER,
                InputKind.CONSTANT_TENSOR,
                InputKind.CUSTOM_OBJ,
            ):
                assert spec.target is not None
                self.env[node] = self._attr(spec.target)
            else:
                raise GraphoptError(
                    f"the exported program has an input of kind {spec.kind.name} (effect "
                    "tokens), which graphopt cannot raise; export the model without side effects"
                )
        for node in self.program.graph.nodes:
            if node.op == "call_function":
                self._copy_call(node)
            elif node.op == "get_attr":  # submodules of higher-order ops (cond, no_grad …)
                self.env[node] = self._attr(str(node.target), self.program.graph_module)
            elif node.op == "output":
                self._copy_output(node)

    def _attr(self, target: str, owner: nn.Module | None = None) -> fx.Node:
        if target not in self.attr_nodes:
            self.objects[target] = self._state(target, owner)
            with self.graph.inserting_after(self._last_placeholder()):
                node = self.graph.get_attr(target)
            if isinstance(self.objects[target], torch.Tensor):
                node.meta["val"] = self.objects[target]  # for rules reading ranks and shapes
            self.attr_nodes[target] = node
        return self.attr_nodes[target]

    def _last_placeholder(self) -> fx.Node | None:
        last = None
        for node in self.graph.nodes:
            if node.op not in ("placeholder", "get_attr"):
                break
            last = node
        return last

    def _state(self, target: str, owner: nn.Module | None) -> Any:
        for source in (owner, self.root):
            if source is not None:
                try:
                    return fetch(source, target)
                except AttributeError:
                    pass
        if target in self.program.state_dict:
            return self.program.state_dict[target]
        return self.program.constants[target]

    def _copy_call(self, node: fx.Node) -> None:
        if node.target in _CHECKS and not node.users:
            return
        args, kwargs = fx.map_arg((node.args, node.kwargs), lambda n: self.env[n])
        source = node.args[0] if node.args else None
        if node.target is operator.getitem and source in self.first_only:
            assert isinstance(source, fx.Node)  # the single-output op stands for item 0
            if node.args[1] == 0:
                self.env[node] = self.env[source]
            return  # the other items are read by nobody
        call = None
        if isinstance(node.target, OpOverload):
            call = self._first_item(node, args, kwargs) or self._function(node, args, kwargs)
        if call is None:
            call = _Call("call_function", node.target, args, kwargs)
        if call is _SAME:
            self.env[node] = args[0]
            return
        name = _node_name(node, call)
        new = self.graph.create_node(call.op, call.target, call.args, call.kwargs, name=name)
        new.meta[NAME] = name
        new.meta["export_stack"] = _module_stack(node)
        self.order[new] = len(self.order)
        for key in new.meta["export_stack"]:
            self.scopes.setdefault(key, []).append(new)
        for key in ("val", "stack_trace"):
            if key in node.meta:
                new.meta[key] = node.meta[key]
        self.env[node] = new

    def _copy_output(self, node: fx.Node) -> None:
        sig = self.program.graph_signature
        returned = cast(Sequence[Any], node.args[0])
        outputs = [self.env[n] if isinstance(n, fx.Node) else n for n in returned]
        user = []
        for value, spec in zip(outputs, sig.output_specs, strict=True):
            if spec.kind == OutputKind.USER_OUTPUT:
                user.append(value)
            elif spec.kind == OutputKind.BUFFER_MUTATION:
                assert spec.target is not None
                self.graph.call_function(aten.copy_.default, (self._attr(spec.target), value))
            elif spec.kind == OutputKind.USER_INPUT_MUTATION:
                assert spec.target is not None
                target = next(
                    n for n in self.graph.nodes if n.op == "placeholder" and n.name == spec.target
                )
                self.graph.call_function(aten.copy_.default, (target, value))
            else:
                raise GraphoptError(
                    f"the exported program has an output of kind {spec.kind.name}, which "
                    "graphopt cannot raise; export the model for inference"
                )
        spec = self.program.call_spec.out_spec
        if _is_plain(spec):
            self.graph.output(pytree.tree_unflatten(user, spec))
        else:  # the leaves, rebuilt into the model's own output type by the generated code
            self.graph.output(tuple(user))
            self.graph.set_codegen(OutputCodeGen(spec))

    # -- step 2: ATen functions to torch functions and methods ------------------------------

    def _function(self, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        op = node.target
        assert isinstance(op, OpOverload)
        schema = op._schema
        if schema.arguments and _writes_first(schema):
            functional = _functional_twin(op)
            if functional is None or not self._mutation_unseen(node):
                return None  # kept as the ATen in-place op: correct, opaque to the passes
            op = functional
        bound = _bind(op, args, kwargs)
        rule = _RULES.get(op.overloadpacket)
        if rule is not None:
            call = rule(bound, node)
            if call is not None:
                return call
        return _same_named(op, args, kwargs)

    def _first_item(self, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Ops returning a tuple of which only the first item is read (a decomposed program's
        batch norm, layer norm, pooling with indices) as the single-output function."""
        op = node.target
        assert isinstance(op, OpOverload)
        rule = _FIRST_ITEM.get(op.overloadpacket)
        if rule is None or not node.users:
            return None
        items = [u for u in node.users if u.target is operator.getitem]
        if len(items) != len(node.users) or any(u.args[1] != 0 and u.users for u in items):
            return None  # an item other than the first is read
        call = rule(_bind(op, args, kwargs), node)
        if call is not None:
            self.first_only.add(node)
        return call

    def _mutation_unseen(self, node: fx.Node) -> bool:
        """Whether an in-place op can run out of place: nothing that aliases the tensor it
        writes to (the tensor, its views, what it is a view of) is read after it, and it is
        not a model input, parameter or buffer."""
        target = node.args[0]
        if not isinstance(target, fx.Node):
            return False
        base = self.base.get(target, target)
        if base.op != "call_function":
            return False
        here = self.position[node]
        for member in self.aliases[base]:
            if member is node or self.position[member] > here:
                continue
            if any(self.position[u] > here for u in member.users if u is not node):
                return False
        return True

    # -- step 1: leaf-module calls ----------------------------------------------------------

    def _raise_leaf_calls(self) -> None:
        by_name = {n.name: n for n in self.program.graph.nodes}
        for entry in self.program.module_call_graph:
            if not entry.fqn or entry.signature is None:
                continue
            self._raise_call(entry.fqn, entry.signature, by_name)

    def _raise_call(self, fqn: str, signature: Any, by_name: dict[str, fx.Node]) -> None:
        path, _, count = fqn.partition("@")
        assert self.root is not None
        module = self.root.get_submodule(path)

        def value(arg: Any) -> Any:
            if isinstance(arg, TensorArgument):
                found = self.env.get(by_name[arg.name], _MISSING)
                while isinstance(found, fx.Node) and found in self.replaced:
                    found = self.replaced[found]
                return found
            if isinstance(arg, ConstantArgument):
                return arg.value
            return _MISSING

        inputs = [value(a) for a in signature.inputs]
        outputs = [value(a) for a in signature.outputs]
        if any(v is _MISSING for v in inputs + outputs):
            return
        produced = [v for v in outputs if isinstance(v, fx.Node)]
        group = self._group(path, int(count or 0), produced)
        if group is None or not all(p in group for p in produced):
            return  # e.g. a module returning its input: nothing to raise
        in_nodes = {v for v in inputs if isinstance(v, fx.Node)}
        for member in group:
            for arg in member.all_input_nodes:
                if arg in group or arg in in_nodes or arg.op == "get_attr" or _is_size(arg):
                    continue  # a free dim's size: the module reads it from its own inputs
                return  # the call reads something it was not given: not one module call
            outside = [u for u in member.users if u not in group]
            if outside and member not in produced:
                return
        getters = _leaf_paths(signature.out_spec)
        if getters is None or len(getters) != len(outputs):
            return
        args, kwargs = pytree.tree_unflatten(inputs, signature.in_spec)
        first = min(group, key=self.order.__getitem__)
        with self.graph.inserting_before(first):
            call = self.graph.call_module(path, tuple(args), dict(kwargs))
        call.meta[NAME] = path.replace(".", "_")
        call.meta["export_stack"] = _stack_through(first.meta.get("export_stack", {}), path)
        self.objects[path] = module
        for out, keys in zip(outputs, getters, strict=True):
            if not isinstance(out, fx.Node):
                continue
            getter = call
            with self.graph.inserting_after(call):
                for key in keys:
                    fn = (
                        builtins.getattr
                        if isinstance(key, str) and key.startswith(".")
                        else (operator.getitem)
                    )
                    item = key[1:] if fn is builtins.getattr else key
                    getter = self.graph.call_function(fn, (getter, item))
            out.replace_all_uses_with(getter, delete_user_cb=lambda u: u not in group)
            self.replaced[out] = getter
        for member in sorted(group, key=self.order.__getitem__, reverse=True):
            self.graph.erase_node(member)

    def _group(self, path: str, count: int, produced: list[fx.Node]) -> set[fx.Node] | None:
        """The nodes traced inside one call of the module at ``path``: those whose module
        stack holds the same entry (scope key) as the call's outputs."""
        if not produced:
            return None
        keys = {_scope_key(n.meta.get("export_stack", {}), path, count) for n in produced}
        key = keys.pop() if len(keys) == 1 else None
        return set(self.scopes.get(key, ())) if key is not None else None

    # -- step 3: functional layers on stored weights to module calls ------------------------

    def _raise_layers(self) -> None:
        shared: dict[str, nn.Module] = {}
        for node in list(self.graph.nodes):
            if node.op != "call_function" or node.target not in _LAYERS:
                continue
            built = _LAYERS[node.target](node, self.objects)
            if built is None:
                continue
            path, module, data = built
            module = self._place(path, module, shared)
            if module is None:
                continue
            with self.graph.inserting_before(node):
                call = self.graph.call_module(path, (data,))
            call.meta.update(node.meta)
            call.meta[NAME] = path.replace(".", "_")
            call.meta["export_stack"] = _stack_through(node.meta.get("export_stack", {}), path)
            node.replace_all_uses_with(call)
            self.graph.erase_node(node)

    # -- step 4: layers written out in arithmetic (RMSNorm, HF Conv1D), see idioms --------

    def _raise_idioms(self) -> None:
        for node in raise_idioms(self.graph, self.objects):
            stack = node.meta.get("export_stack", {})
            if node.op == "call_module":
                path = str(node.target)
                node.meta[NAME] = path.replace(".", "_")
                node.meta["export_stack"] = _stack_through(stack, path)
            else:
                scope = _innermost(stack).replace(".", "_")
                node.meta[NAME] = f"{scope}_rms_norm" if scope else "rms_norm"

    def _place(self, path: str, module: nn.Module, shared: dict[str, nn.Module]) -> Any:
        """The module to call at ``path``: the live one if it is exactly ``module``'s layer,
        else ``module`` itself when there is no live model; None to keep the function."""
        if path in shared:
            return shared[path] if _same_layer(shared[path], module) else None
        if self.root is not None:
            try:
                live = self.root.get_submodule(path)
            except AttributeError:
                return None
            if not _same_layer(live, module) or live._forward_hooks or live._forward_pre_hooks:
                return None
            module = live
        elif path in self.objects and not isinstance(self.objects[path], nn.Module):
            return None
        shared[path] = self.objects[path] = module
        return module


_MISSING = object()

OpOverload = torch._ops.OpOverload


# -- helpers: schemas and aliasing -------------------------------------------------------------


def _writes_first(schema: Any) -> bool:
    info = schema.arguments[0].alias_info
    return info is not None and info.is_write and not schema.arguments[0].kwarg_only


def _functional_twin(op: OpOverload) -> OpOverload | None:
    """``aten.add.Tensor`` for ``aten.add_.Tensor``: what functionalisation runs instead."""
    name = op.overloadpacket.__name__
    if not name.endswith("_") or name.endswith("__"):
        return None
    packet = getattr(aten, name[:-1], None)
    twin = getattr(packet, op._overloadname, None) if packet is not None else None
    return twin if isinstance(twin, OpOverload) else None


def _alias_bases(nodes: Sequence[fx.Node]) -> dict[fx.Node, fx.Node]:
    """For each node, the node whose storage its value shares: views and in-place results
    lead back to what they view or write to; everything else is its own base."""
    base: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        source = None
        if node.op == "call_function" and isinstance(node.target, OpOverload):
            schema = node.target._schema
            if schema.returns and schema.returns[0].alias_info is not None and node.args:
                source = node.args[0]
        elif node.op == "call_function" and node.target is operator.getitem:
            source = node.args[0]
        if isinstance(source, fx.Node):
            base[node] = base.get(source, source)
        else:
            base[node] = node
    return base


def _bind(op: OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Arguments by schema name, explicit ones only (defaults stay the callee's)."""
    out = {}
    positional = [a for a in op._schema.arguments if not a.kwarg_only]
    for a, v in zip(positional, args, strict=False):
        out[a.name] = v
    out.update(kwargs)
    return out


def _same_named(op: OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call | None:
    """The builtin ``torch.NAME`` or ``Tensor.NAME`` bound to ``op``'s schema, if any."""
    name = op.overloadpacket.__name__
    fn = getattr(torch, name, None)
    if type(fn).__name__ == "builtin_function_or_method" and not name.startswith("_"):
        return _Call("call_function", fn, args, kwargs)
    first = op._schema.arguments[0] if op._schema.arguments else None
    method = getattr(torch.Tensor, name, None)
    if (
        first is not None
        and first.name == "self"
        and type(method).__name__ == "method_descriptor"
        and not name.startswith("_")
    ):
        return _Call("call_method", name, args, kwargs)
    return None


# -- the table: ATen ops the passes know, as the torch calls fx records ----------------------


def _fn(target: Any, *args: Any, **kwargs: Any) -> _Call:
    return _Call("call_function", target, args, {k: v for k, v in kwargs.items()})


def _method(name: str, *args: Any, **kwargs: Any) -> _Call:
    return _Call("call_method", name, args, kwargs)


def _given(a: dict[str, Any], *names: str) -> dict[str, Any]:
    return {n: a[n] for n in names if n in a}


def _binary(plain: Callable[..., Any], full: Any) -> Callable[[dict[str, Any], fx.Node], _Call]:
    def rule(a: dict[str, Any], node: fx.Node) -> _Call:
        if a.get("alpha", 1) != 1:
            return _fn(full, a["self"], a["other"], alpha=a["alpha"])
        return _fn(plain, a["self"], a["other"])

    return rule


def _rank(node: fx.Node) -> int | None:
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _index_prefix(dim: int, node: fx.Node) -> tuple[Any, ...] | None:
    rank = _rank(node)
    if dim < 0:
        if rank is None:
            return None
        dim += rank
    return (slice(None),) * dim


def _slice(a: dict[str, Any], node: fx.Node) -> _Call | None:
    prefix = _index_prefix(a.get("dim", 0), node)
    if prefix is None:
        return None
    start, end, step = a.get("start"), a.get("end"), a.get("step", 1)
    if any(isinstance(v, fx.Node) for v in (start, end, step)):  # a bound set by a free dim
        if start in (None, 0) and step == 1 and isinstance(end, fx.Node):
            # narrow, not a slice object: a pickled graph is traced again on loading, and
            # a slice cannot carry a traced size into a stored tensor's indexing
            return _fn(torch.narrow, a["self"], a.get("dim", 0), 0, end)
        return None
    item = slice(
        None if start in (None, 0) else start,
        None if end is None or (isinstance(end, int) and end >= _INT_MAX) else end,
        None if step == 1 else step,
    )
    return _fn(operator.getitem, a["self"], (*prefix, item) if prefix else item)


def _select(a: dict[str, Any], node: fx.Node) -> _Call | None:
    prefix = _index_prefix(a["dim"], node)
    if prefix is None:
        return None
    return _fn(operator.getitem, a["self"], (*prefix, a["index"]) if prefix else a["index"])


def _index(a: dict[str, Any], node: fx.Node) -> _Call:
    items = tuple(slice(None) if i is None else i for i in a["indices"])
    return _fn(operator.getitem, a["self"], items if len(items) != 1 else items[0])


def _to(a: dict[str, Any], node: fx.Node) -> _Call | None:
    if a.get("layout") not in (None, torch.strided) or a.get("pin_memory"):
        return None
    names = ("device", "dtype", "non_blocking", "copy")
    rest = {k: a[k] for k in names if a.get(k) is not None and a.get(k) is not False}
    if a.get("memory_format") not in (None, torch.preserve_format):
        rest["memory_format"] = a["memory_format"]
    if "other" in a:
        return _method("to", a["self"], a["other"], **rest)
    return _method("to", a["self"], **rest)


def _softmax(fn: Any) -> Callable[[dict[str, Any], fx.Node], _Call]:
    def rule(a: dict[str, Any], node: fx.Node) -> _Call:
        return _fn(fn, a["self"], a["dim"], **_given(a, "dtype"))

    return rule


def _reduce(fn: Any) -> Callable[[dict[str, Any], fx.Node], _Call]:
    def rule(a: dict[str, Any], node: fx.Node) -> _Call:
        if "dim" not in a:
            return _fn(fn, a["self"], **_given(a, "dtype"))
        return _fn(fn, a["self"], a["dim"], a.get("keepdim", False), **_given(a, "dtype"))

    return rule


def _pool(fn: Any) -> Callable[[dict[str, Any], fx.Node], _Call]:
    def rule(a: dict[str, Any], node: fx.Node) -> _Call:
        stride = a.get("stride") or None  # [] means "as the kernel"
        rest = {k: a[k] for k in ("padding", "dilation", "ceil_mode") if k in a}
        return _fn(fn, a["self"], a["kernel_size"], stride, **rest)

    return rule


def _avg_pool(fn: Any) -> Callable[[dict[str, Any], fx.Node], _Call]:
    def rule(a: dict[str, Any], node: fx.Node) -> _Call:
        stride = a.get("stride") or None
        names = ("padding", "ceil_mode", "count_include_pad", "divisor_override")
        return _fn(fn, a["self"], a["kernel_size"], stride, **_given(a, *names))

    return rule


def _interpolate(mode: str) -> Callable[[dict[str, Any], fx.Node], _Call | None]:
    def rule(a: dict[str, Any], node: fx.Node) -> _Call | None:
        x = a.get("input", a.get("self"))
        size, scale = a.get("output_size"), a.get("scale_factors")
        if any(a.get(k) is not None for k in ("scales", "scales_h", "scales_w", "scales_d")):
            return None  # sizes and scales both given: F.interpolate would not pass both
        if (size is None) == (scale is None):
            return None
        extra = {"align_corners": a["align_corners"]} if "align_corners" in a else {}
        where = {"size": size} if size is not None else {"scale_factor": scale}
        return _fn(F.interpolate, x, mode=mode, **where, **extra)

    return rule


def _conv(fn: Any) -> Callable[[dict[str, Any], fx.Node], _Call]:
    def rule(a: dict[str, Any], node: fx.Node) -> _Call:
        names = ("stride", "padding", "dilation", "groups")
        return _fn(fn, a["input"], a["weight"], a.get("bias"), *(a[n] for n in names if n in a))

    return rule


def _conv_transpose(fn: Any) -> Callable[[dict[str, Any], fx.Node], _Call]:
    def rule(a: dict[str, Any], node: fx.Node) -> _Call:
        names = ("stride", "padding", "output_padding", "groups", "dilation")
        return _fn(fn, a["input"], a["weight"], a.get("bias"), *(a[n] for n in names if n in a))

    return rule


def _convolution(a: dict[str, Any], node: fx.Node) -> _Call | None:
    """``aten.convolution`` (what decomposed programs hold) as the F.conv call it stands for."""
    weight_rank = _rank_of(a["weight"])
    if weight_rank is None or weight_rank not in (3, 4, 5):
        return None
    spatial = weight_rank - 2
    x, w, b = a["input"], a["weight"], a["bias"]
    fn: Any
    if a["transposed"]:
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[spatial - 1]
        return _fn(fn, x, w, b, a["stride"], a["padding"], a["output_padding"], a["groups"],
                   a["dilation"])  # fmt: skip
    fn = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    return _fn(fn, x, w, b, a["stride"], a["padding"], a["dilation"], a["groups"])


def _rank_of(value: Any) -> int | None:
    val = value.meta.get("val") if isinstance(value, fx.Node) else value
    return val.dim() if isinstance(val, torch.Tensor) else None


_REQUIRED = object()


def _reordered(fn: Any, *names: tuple[str, Any]) -> Callable[[dict[str, Any], fx.Node], _Call]:
    """``fn`` given the ATen op's arguments in ``fn``'s own order: (name, default) pairs,
    a default of :data:`_REQUIRED` for an argument the op always has."""

    def rule(a: dict[str, Any], node: fx.Node) -> _Call:
        return _fn(fn, *(a[n] if d is _REQUIRED else a.get(n, d) for n, d in names))

    return rule


_AFFINE = (("weight", None), ("bias", None))
_batch_norm = _reordered(
    F.batch_norm,
    ("input", _REQUIRED),
    ("running_mean", None),
    ("running_var", None),
    *_AFFINE,
    ("training", False),
    ("momentum", 0.1),
    ("eps", 1e-5),
)
_layer_norm = _reordered(
    F.layer_norm, ("input", _REQUIRED), ("normalized_shape", _REQUIRED), *_AFFINE, ("eps", 1e-5)
)
_group_norm = _reordered(
    F.group_norm, ("input", _REQUIRED), ("num_groups", _REQUIRED), *_AFFINE, ("eps", 1e-5)
)


def _embedding(a: dict[str, Any], node: fx.Node) -> _Call | None:
    if a.get("scale_grad_by_freq") or a.get("sparse"):
        return None
    padding = a.get("padding_idx", -1)
    return _fn(F.embedding, a["indices"], a["weight"], None if padding == -1 else padding)


def _sdpa(a: dict[str, Any], node: fx.Node) -> _Call:
    extra = _given(a, "attn_mask", "dropout_p", "is_causal", "scale")
    if a.get("enable_gqa"):
        extra["enable_gqa"] = True
    return _fn(F.scaled_dot_product_attention, a["query"], a["key"], a["value"], **extra)


def _pad(a: dict[str, Any], node: fx.Node) -> _Call:
    mode = a.get("mode", "constant")
    if mode != "constant":
        return _fn(F.pad, a["self"], a["pad"], mode)
    value = a.get("value")
    return _fn(F.pad, a["self"], a["pad"], mode, value if value is not None else 0.0)


def _gelu(a: dict[str, Any], node: fx.Node) -> _Call:
    if a.get("approximate", "none") != "none":
        return _fn(F.gelu, a["self"], approximate=a["approximate"])
    return _fn(F.gelu, a["self"])


def _clamp(a: dict[str, Any], node: fx.Node) -> _Call:
    return _fn(torch.clamp, a["self"], **_given(a, "min", "max"))


def _unary(fn: Any, *names: str) -> Callable[[dict[str, Any], fx.Node], _Call]:
    def rule(a: dict[str, Any], node: fx.Node) -> _Call:
        return _fn(fn, a["self"], *(a[n] for n in names if n in a))

    return rule


def _as_method(name: str, *names: str) -> Callable[[dict[str, Any], fx.Node], _Call]:
    def rule(a: dict[str, Any], node: fx.Node) -> _Call:
        return _method(name, a["self"], *(a[n] for n in names if n in a))

    return rule


def _split(a: dict[str, Any], node: fx.Node) -> _Call:
    sizes = a["split_size"] if "split_size" in a else a["split_sizes"]
    return _fn(torch.split, a["self"], sizes, a.get("dim", 0))


def _dropout(a: dict[str, Any], node: fx.Node) -> _Call:
    return _fn(F.dropout, a["input"], a["p"], a["train"])


def _same(a: dict[str, Any], node: fx.Node) -> _Call:
    return _SAME


def _linear(a: dict[str, Any], node: fx.Node) -> _Call:
    return _fn(F.linear, a["input"], a["weight"], a.get("bias"))


def _transposed_weight(value: Any) -> Any:
    """``W`` when ``value`` is ``W.t()`` (or a [1, 0] permute) of a stored 2-d tensor."""
    if not (isinstance(value, fx.Node) and value.op == "call_method" and value.args):
        return None
    source = value.args[0]
    dims = value.args[1] if len(value.args) > 1 else None
    plain = value.target == "t" or (value.target == "permute" and dims in ([1, 0], (1, 0)))
    ok = plain and isinstance(source, fx.Node) and source.op == "get_attr"
    return source if ok else None


def _addmm(a: dict[str, Any], node: fx.Node) -> _Call | None:
    """``addmm(b, x, W.t())`` (a decomposed program's linear layer) as ``F.linear``."""
    w = _transposed_weight(a["mat2"])
    if w is None or a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
        return None
    return _fn(F.linear, a["mat1"], w, a["self"])


def _mm(a: dict[str, Any], node: fx.Node) -> _Call | None:
    w = _transposed_weight(a["mat2"])
    return _fn(F.linear, a["self"], w) if w is not None else None


def _einsum(a: dict[str, Any], node: fx.Node) -> _Call:
    return _fn(torch.einsum, a["equation"], *a["tensors"])


_RULES: dict[Any, Callable[[dict[str, Any], fx.Node], Any]] = {
    aten.add: _binary(operator.add, torch.add),
    aten.sub: _binary(operator.sub, torch.sub),
    aten.mul: _binary(operator.mul, torch.mul),
    aten.div: lambda a, n: (
        _fn(torch.div, a["self"], a["other"], rounding_mode=a["rounding_mode"])
        if a.get("rounding_mode") is not None
        else _fn(operator.truediv, a["self"], a["other"])
    ),
    aten.rsub: lambda a, n: (
        _fn(operator.sub, a["other"], a["self"]) if a.get("alpha", 1) == 1 else None
    ),
    aten.pow: lambda a, n: _fn(operator.pow, a["self"], a["exponent"]),
    aten.neg: _unary(operator.neg),
    aten.floor_divide: lambda a, n: _fn(operator.floordiv, a["self"], a["other"]),
    aten.remainder: lambda a, n: _fn(operator.mod, a["self"], a["other"]),
    aten.__and__: lambda a, n: _fn(operator.and_, a["self"], a["other"]),
    aten.__or__: lambda a, n: _fn(operator.or_, a["self"], a["other"]),
    aten.bitwise_not: _unary(operator.invert),
    aten.matmul: lambda a, n: _fn(torch.matmul, a["self"], a["other"]),
    aten.addmm: _addmm,
    aten.mm: _mm,
    aten.einsum: _einsum,
    aten.relu: _unary(F.relu),
    aten.relu6: _unary(F.relu6),
    aten.gelu: _gelu,
    aten.silu: _unary(F.silu),
    aten.hardswish: _unary(F.hardswish),
    aten.hardsigmoid: _unary(F.hardsigmoid),
    aten.hardtanh: _unary(F.hardtanh, "min_val", "max_val"),
    aten.leaky_relu: _unary(F.leaky_relu, "negative_slope"),
    aten.mish: _unary(F.mish),
    aten.elu: lambda a, n: (
        _fn(F.elu, a["self"], a.get("alpha", 1.0))
        if a.get("scale", 1) == 1 and a.get("input_scale", 1) == 1
        else None
    ),
    aten.softplus: _unary(F.softplus, "beta", "threshold"),
    aten.log_sigmoid: _unary(F.logsigmoid),
    aten.sigmoid: _unary(torch.sigmoid),
    aten.tanh: _unary(torch.tanh),
    aten.clamp: _clamp,
    aten.clamp_min: lambda a, n: _fn(torch.clamp, a["self"], min=a["min"]),
    aten.clamp_max: lambda a, n: _fn(torch.clamp, a["self"], max=a["max"]),
    aten.softmax: _softmax(F.softmax),
    aten._softmax: lambda a, n: _fn(F.softmax, a["self"], a["dim"]),
    aten.log_softmax: _softmax(F.log_softmax),
    aten.mean: _reduce(torch.mean),
    aten.sum: _reduce(torch.sum),
    aten.view: _as_method("view", "size"),
    aten._unsafe_view: _as_method("view", "size"),
    aten.reshape: _as_method("reshape", "shape"),
    aten.permute: _as_method("permute", "dims"),
    aten.transpose: _as_method("transpose", "dim0", "dim1"),
    aten.t: _as_method("t"),
    aten.unsqueeze: _as_method("unsqueeze", "dim"),
    aten.squeeze: _as_method("squeeze", "dim"),
    aten.expand: _as_method("expand", "size"),
    aten.expand_as: _as_method("expand_as", "other"),
    aten.contiguous: _as_method("contiguous"),
    aten.clone: _as_method("clone"),
    aten.unflatten: _as_method("unflatten", "dim", "sizes"),
    aten.flatten: lambda a, n: _fn(
        torch.flatten, a["self"], a.get("start_dim", 0), a.get("end_dim", -1)
    ),
    aten.alias: _same,
    aten.sym_size: lambda a, n: _method("size", a["self"], a["dim"]),
    aten.sym_numel: lambda a, n: _method("numel", a["self"]),
    aten.lift_fresh_copy: _as_method("clone"),
    aten.slice: _slice,
    aten.select: _select,
    aten.index: _index,
    aten.split: _split,
    aten.split_with_sizes: _split,
    aten.chunk: lambda a, n: _fn(torch.chunk, a["self"], a["chunks"], a.get("dim", 0)),
    aten.unbind: lambda a, n: _fn(torch.unbind, a["self"], a.get("dim", 0)),
    aten.cat: lambda a, n: _fn(torch.cat, a["tensors"], a.get("dim", 0)),
    aten.stack: lambda a, n: _fn(torch.stack, a["tensors"], a.get("dim", 0)),
    aten.to: _to,
    aten._to_copy: _to,
    aten.type_as: _as_method("type_as", "other"),
    aten.masked_fill: _as_method("masked_fill", "mask", "value"),
    aten.linear: _linear,
    aten.conv1d: _conv(F.conv1d),
    aten.conv2d: _conv(F.conv2d),
    aten.conv3d: _conv(F.conv3d),
    aten.conv_transpose1d: _conv_transpose(F.conv_transpose1d),
    aten.conv_transpose2d: _conv_transpose(F.conv_transpose2d),
    aten.conv_transpose3d: _conv_transpose(F.conv_transpose3d),
    aten.convolution: _convolution,
    aten.batch_norm: _batch_norm,
    aten.layer_norm: _layer_norm,
    aten.group_norm: _group_norm,
    aten.embedding: _embedding,
    aten.scaled_dot_product_attention: _sdpa,
    aten.max_pool1d: _pool(F.max_pool1d),
    aten.max_pool2d: _pool(F.max_pool2d),
    aten.max_pool3d: _pool(F.max_pool3d),
    aten.avg_pool1d: _avg_pool(F.avg_pool1d),
    aten.avg_pool2d: _avg_pool(F.avg_pool2d),
    aten.avg_pool3d: _avg_pool(F.avg_pool3d),
    aten.adaptive_avg_pool1d: lambda a, n: _fn(F.adaptive_avg_pool1d, a["self"], a["output_size"]),
    aten.adaptive_avg_pool2d: lambda a, n: _fn(F.adaptive_avg_pool2d, a["self"], a["output_size"]),
    aten.adaptive_avg_pool3d: lambda a, n: _fn(F.adaptive_avg_pool3d, a["self"], a["output_size"]),
    aten.upsample_nearest2d: _interpolate("nearest"),
    aten.upsample_bilinear2d: _interpolate("bilinear"),
    aten.upsample_bicubic2d: _interpolate("bicubic"),
    aten.pad: _pad,
    aten.constant_pad_nd: _pad,
    aten.dropout: _dropout,
}


#: ops returning a tuple whose first item is what the single-output function returns
_FIRST_ITEM: dict[Any, Callable[[dict[str, Any], fx.Node], Any]] = {
    aten._native_batch_norm_legit_no_training: lambda a, n: _batch_norm(
        {**a, "training": False}, n
    ),
    aten.native_layer_norm: _layer_norm,
    aten.native_group_norm: _reordered(
        F.group_norm, ("input", _REQUIRED), ("group", _REQUIRED), *_AFFINE, ("eps", _REQUIRED)
    ),
    aten.max_pool1d_with_indices: _pool(F.max_pool1d),
    aten.max_pool2d_with_indices: _pool(F.max_pool2d),
    aten.max_pool3d_with_indices: _pool(F.max_pool3d),
    aten.adaptive_max_pool1d: lambda a, n: _fn(F.adaptive_max_pool1d, a["self"], a["output_size"]),
    aten.adaptive_max_pool2d: lambda a, n: _fn(F.adaptive_max_pool2d, a["self"], a["output_size"]),
    aten.adaptive_max_pool3d: lambda a, n: _fn(F.adaptive_max_pool3d, a["self"], a["output_size"]),
}


# -- functional layers on stored tensors, as modules -------------------------------------------


def _stored(value: Any, objects: dict[str, Any], name: str) -> tuple[str, Any] | None:
    """(owner path, tensor) when ``value`` is a ``get_attr`` of ``PATH.name``."""
    if not (isinstance(value, fx.Node) and value.op == "get_attr"):
        return None
    target = str(value.target)
    owner, _, last = target.rpartition(".")
    if last != name or not owner:
        return None
    return owner, objects[target]


def _owner(
    objects: dict[str, Any], pairs: Sequence[tuple[Any, str]], required: str
) -> tuple[str, dict[str, Any]] | None:
    """The one module path owning every given stored tensor (``None`` arguments are
    absent tensors), with the tensors by name; ``required`` must be present."""
    found: dict[str, Any] = {}
    owners = set()
    for value, name in pairs:
        if value is None:
            continue
        stored = _stored(value, objects, name)
        if stored is None:
            return None
        owners.add(stored[0])
        found[name] = stored[1]
    if len(owners) != 1 or required not in found:
        return None
    return owners.pop(), found


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _adopt(module: nn.Module, tensors: dict[str, Any]) -> nn.Module:
    """``module`` holding ``tensors`` (the program's own parameters and buffers)."""
    for name, value in tensors.items():
        if isinstance(value, nn.Parameter):
            setattr(module, name, value)
        elif name in module._buffers:
            module._buffers[name] = value
        else:
            setattr(module, name, nn.Parameter(value, requires_grad=False))
    return module


def _tensors(m: nn.Module) -> list[torch.Tensor]:
    return [*m.parameters(recurse=False), *m.buffers(recurse=False)]


def _same_layer(a: nn.Module, b: nn.Module) -> bool:
    """The same kind of layer with the same settings, holding the very same tensors."""
    ta, tb = _tensors(a), _tensors(b)
    return (
        type(a) is type(b)
        and a.extra_repr() == b.extra_repr()
        and len(ta) == len(tb)
        and all(x is y for x, y in zip(ta, tb, strict=True))
    )


_Built = tuple[str, nn.Module, Any]


def _weight_and_bias(node: fx.Node, objects: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The owner and tensors of a layer function's stored weight (argument 1) and bias (2)."""
    pairs = [(_arg(node, 1, "weight"), "weight"), (_arg(node, 2, "bias"), "bias")]
    return _owner(objects, pairs, "weight")


def _expand(value: Any, n: int) -> tuple[int, ...]:
    """A convolution setting as one int per spatial dimension."""
    if isinstance(value, list | tuple):
        return tuple(value) * (n if len(value) == 1 else 1)
    return (value,) * n


def _conv_layer(
    node: fx.Node, objects: dict[str, Any], *, transposed: bool = False
) -> _Built | None:
    found = _weight_and_bias(node, objects)
    if found is None:
        return None
    path, tensors = found
    w = tensors["weight"]
    spatial = w.dim() - 2
    groups = int(_arg(node, 6, "groups", 1))

    def setting(i: int, name: str, default: int) -> tuple[int, ...]:
        return _expand(_arg(node, i, name, default), spatial)

    cls: Any
    if transposed:  # F.conv_transposeNd(x, w, b, stride, padding, output_padding, groups, dilation)
        cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[spatial - 1]
        channels = (w.shape[0], w.shape[1] * groups)
        settings: dict[str, Any] = {
            "stride": setting(3, "stride", 1),
            "padding": setting(4, "padding", 0),
            "output_padding": setting(5, "output_padding", 0),
            "dilation": setting(7, "dilation", 1),
        }
    else:  # F.convNd(x, w, b, stride, padding, dilation, groups)
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial - 1]
        channels = (w.shape[1] * groups, w.shape[0])
        padding = _arg(node, 4, "padding", 0)
        settings = {
            "stride": setting(3, "stride", 1),
            "padding": padding if isinstance(padding, str) else setting(4, "padding", 0),
            "dilation": setting(5, "dilation", 1),
        }
    with torch.device("meta"):
        module = cls(
            *channels, tuple(w.shape[2:]), groups=groups, bias="bias" in tensors, **settings
        )
    return path, _adopt(module, tensors), node.args[0]


def _linear_layer(node: fx.Node, objects: dict[str, Any]) -> _Built | None:
    found = _weight_and_bias(node, objects)
    if found is None:
        return None
    path, tensors = found
    w = tensors["weight"]
    if w.dim() != 2:
        return None
    with torch.device("meta"):
        module = nn.Linear(w.shape[1], w.shape[0], bias="bias" in tensors)
    return path, _adopt(module, tensors), node.args[0]


def _batch_norm_layer(node: fx.Node, objects: dict[str, Any]) -> _Built | None:
    if _arg(node, 5, "training", False):
        return None
    pairs = [
        (_arg(node, 1, "running_mean"), "running_mean"),
        (_arg(node, 2, "running_var"), "running_var"),
        (_arg(node, 3, "weight"), "weight"),
        (_arg(node, 4, "bias"), "bias"),
    ]
    found = _owner(objects, pairs, "running_mean")
    rank = _rank(node)
    if found is None or "running_var" not in found[1] or rank not in (2, 3, 4, 5):
        return None
    path, tensors = found
    if ("weight" in tensors) != ("bias" in tensors):
        return None
    counter = objects.get(f"{path}.num_batches_tracked")
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]
    momentum = _arg(node, 6, "momentum", 0.1)
    with torch.device("meta"):
        module = cls(
            tensors["running_mean"].shape[0],
            eps=float(_arg(node, 7, "eps", 1e-5)),
            momentum=momentum,
            affine="weight" in tensors,
        )
    if counter is not None:
        tensors["num_batches_tracked"] = counter
    module.training = False
    return path, _adopt(module, tensors), node.args[0]


def _layer_norm_layer(node: fx.Node, objects: dict[str, Any]) -> _Built | None:
    pairs = [(_arg(node, 2, "weight"), "weight"), (_arg(node, 3, "bias"), "bias")]
    found = _owner(objects, pairs, "weight")
    if found is None:
        return None
    path, tensors = found
    with torch.device("meta"):
        module = nn.LayerNorm(
            list(_arg(node, 1, "normalized_shape")),
            eps=float(_arg(node, 4, "eps", 1e-5)),
            bias="bias" in tensors,
        )
    return path, _adopt(module, tensors), node.args[0]


def _group_norm_layer(node: fx.Node, objects: dict[str, Any]) -> _Built | None:
    pairs = [(_arg(node, 2, "weight"), "weight"), (_arg(node, 3, "bias"), "bias")]
    found = _owner(objects, pairs, "weight")
    if found is None or "bias" not in found[1]:
        return None
    path, tensors = found
    with torch.device("meta"):
        module = nn.GroupNorm(
            int(_arg(node, 1, "num_groups")),
            tensors["weight"].shape[0],
            eps=float(_arg(node, 4, "eps", 1e-5)),
        )
    return path, _adopt(module, tensors), node.args[0]


def _embedding_layer(node: fx.Node, objects: dict[str, Any]) -> _Built | None:
    found = _owner(objects, [(_arg(node, 1, "weight"), "weight")], "weight")
    if found is None or any(_arg(node, i, n) for i, n in ((4, "scale_grad_by_freq"),
                                                         (6, "sparse"))):  # fmt: skip
        return None
    path, tensors = found
    w = tensors["weight"]
    if w.dim() != 2 or _arg(node, 3, "max_norm") is not None:
        return None
    with torch.device("meta"):
        module = nn.Embedding(w.shape[0], w.shape[1], padding_idx=_arg(node, 2, "padding_idx"))
    return path, _adopt(module, tensors), node.args[0]


_LAYERS: dict[Any, Callable[[fx.Node, dict[str, Any]], _Built | None]] = {
    F.conv1d: _conv_layer,
    F.conv2d: _conv_layer,
    F.conv3d: _conv_layer,
    **dict.fromkeys(
        (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d),
        functools.partial(_conv_layer, transposed=True),
    ),
    F.linear: _linear_layer,
    F.batch_norm: _batch_norm_layer,
    F.layer_norm: _layer_norm_layer,
    F.group_norm: _group_norm_layer,
    F.embedding: _embedding_layer,
}


def _spec_class(spec: pytree.TreeSpec) -> Any:
    """The class a tree node rebuilds: pytree records a named tuple as the ``namedtuple``
    kind with the class as its context."""
    return spec.context if spec.type is collections.namedtuple else spec.type


def _is_plain(spec: pytree.TreeSpec) -> bool:
    """Whether an output structure is made of tuples, lists, dicts and None only (an fx
    output node holds those as they are)."""
    if spec.is_leaf():
        return True
    if spec.type not in (tuple, list, dict, type(None)):
        return False
    return all(_is_plain(child) for child in spec.children())


class OutputCodeGen(fx.graph.CodeGen):
    """Code generation for a graph whose output node holds the leaves of a structure fx
    cannot hold (a named tuple, an output dataclass such as Hugging Face's ``ModelOutput``):
    the generated ``forward`` returns the model's own type, built from the leaves, while
    the passes see plain tensors at the output node."""

    def __init__(self, spec: pytree.TreeSpec) -> None:
        super().__init__()
        self.spec = spec
        self.classes: dict[str, type] = {}
        self._names(spec)

    def _names(self, spec: pytree.TreeSpec) -> None:
        if spec.is_leaf():
            return
        kind, context = _spec_class(spec), spec.context
        if kind not in (tuple, list, dict, OrderedDict, type(None)):
            keyed = isinstance(context, list | tuple) and all(isinstance(k, str) for k in context)
            if not (hasattr(kind, "_fields") or keyed):
                raise GraphoptError(
                    f"the model returns a {kind.__name__}, which graphopt cannot rebuild; "
                    "return tensors, tuples, dicts or dataclasses"
                )
            self.classes[f"_out_{kind.__name__}"] = kind
        for child in spec.children():
            self._names(child)

    def additional_globals(self) -> list[tuple[str, Any]]:
        return list(self.classes.items())

    def generate_output(self, output_args: Any, **kwargs: Any) -> str:
        leaves = list(output_args) if isinstance(output_args, list | tuple) else None
        if leaves is None or len(leaves) != self.spec.num_leaves:
            return super().generate_output(output_args, **kwargs)  # a pass rewrote the output
        return f"return {self._expr(self.spec, iter(leaves))}"

    def _expr(self, spec: pytree.TreeSpec, leaves: Iterator[Any]) -> str:
        if spec.is_leaf():
            return repr(next(leaves))
        items = [self._expr(child, leaves) for child in spec.children()]
        kind, context = _spec_class(spec), spec.context
        if kind is type(None):
            return "None"
        if kind is tuple:
            return f"({', '.join(items)}{',' if len(items) == 1 else ''})"
        if kind is list:
            return f"[{', '.join(items)}]"
        if kind in (dict, OrderedDict):
            return "{" + ", ".join(f"{k!r}: {v}" for k, v in zip(context, items, strict=True)) + "}"
        name = f"_out_{kind.__name__}"
        if hasattr(kind, "_fields"):  # a named tuple
            return f"{name}({', '.join(items)})"
        return f"{name}({', '.join(f'{k}={v}' for k, v in zip(context, items, strict=True))})"

    def process_outputs(self, outputs: Any) -> Any:
        if isinstance(outputs, list | tuple) and len(outputs) == self.spec.num_leaves:
            return pytree.tree_unflatten(list(outputs), self.spec)
        return outputs


class OutputTracer(fx.Tracer):
    """The tracer a saved raised graph is rebuilt with when unpickled: an output dataclass
    (Hugging Face's ``ModelOutput``, a dict subclass) stays a call of its class, as fx keeps
    a named tuple, instead of becoming a plain dict."""

    def create_arg(self, a: Any) -> Any:
        if dataclasses.is_dataclass(a) and not isinstance(a, type):
            fields = {f.name: getattr(a, f.name) for f in dataclasses.fields(a)}
            kwargs = {k: self.create_arg(v) for k, v in fields.items() if v is not None}
            return self.create_node("call_function", type(a), (), kwargs)
        return super().create_arg(a)


# -- the result: dead code out, modules and tensors in place ----------------------------------


def _renamed(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` whose nodes take the names meant for them, in order: the names
    of nodes raised away are free again, so a module's first call is ``relu``, not
    ``relu_1``."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        node.name = node.meta.pop(NAME, node.name)
        env[node] = new.node_copy(node, env.__getitem__)
    new.set_codegen(graph._codegen)
    return new


def _drop_dead_code(graph: fx.Graph) -> None:
    """Erase nodes whose value nobody reads and that change nothing (fx's own pass needs an
    owning module to judge module calls; a leaf call here is pure)."""
    for node in reversed(graph.nodes):
        if node.users or node.op in ("placeholder", "output"):
            continue
        if node.op == "call_module" or node.op == "get_attr" or not node.is_impure():
            graph.erase_node(node)


def _graph_module(objects: dict[str, Any], graph: fx.Graph, name: str) -> fx.GraphModule:
    """A GraphModule running ``graph`` whose attributes are ``objects`` at their paths.

    The modules in ``objects`` (the live model's layers) are placed, never modified: a path
    through one of them is checked to lead to the same tensor; plain modules fill the
    levels between (fx's own copying would re-register tensors inside the live modules)."""
    gm = fx.GraphModule(nn.Module(), fx.Graph(), name)
    used = {str(n.target) for n in graph.nodes if n.op in ("get_attr", "call_module")}
    placed: set[int] = set()
    for target in sorted(used, key=lambda t: t.count(".")):
        obj = objects[target]
        *prefix, field = target.split(".")
        owner: nn.Module = gm
        for item in prefix:
            child = owner._modules.get(item)
            if child is None:
                child = nn.Module()
                owner.add_module(item, child)
            owner = child
            if id(owner) in placed:
                break
        if id(owner) in placed:
            try:
                same = fetch(gm, target) is obj
            except AttributeError:
                same = False
            if not same:
                raise GraphoptError(
                    f"raising the exported program found two different values at '{target}'; "
                    "this is a graphopt bug, please report it"
                )
            continue
        if isinstance(obj, nn.Module):
            owner.add_module(field, obj)
            placed.add(id(obj))
        elif isinstance(obj, nn.Parameter):
            owner.register_parameter(field, obj)
        elif isinstance(obj, torch.Tensor):
            owner.register_buffer(field, obj)
        else:
            setattr(owner, field, obj)
    gm.graph = graph
    return gm


# -- names and module stacks -------------------------------------------------------------------


def _is_size(node: fx.Node) -> bool:
    """Whether ``node`` computes a size of a free dim (a symbolic int, no data)."""
    return isinstance(node.meta.get("val"), torch.SymInt)


def _innermost(stack: dict[str, Any]) -> str:
    paths = [v[0] for v in stack.values() if isinstance(v, tuple) and v[0]]
    return paths[-1] if paths else ""


#: torch.export's stand-in scope for nodes made outside any module (a free dim's size)
_NO_MODULE = "_empty_nn_module_stack"


def _module_stack(node: fx.Node) -> dict[str, Any]:
    """The modules an exported node ran in (export's ``nn_module_stack``), without the
    stand-in scope export gives nodes made outside any module."""
    stack = node.meta.get("nn_module_stack") or {}
    return {
        k: v
        for k, v in stack.items()
        if not (isinstance(v, tuple) and str(v[0]).startswith(_NO_MODULE))
    }


def _node_name(node: fx.Node, call: _Call) -> str:
    """``SCOPE_OP``: the module the node ran in, then what it does (fx dedups repeats)."""
    if call.op == "call_method":
        what = str(call.target)
    elif isinstance(call.target, OpOverload):
        what = call.target.overloadpacket.__name__
    else:
        what = getattr(call.target, "__name__", None) or node.name
    what = what.strip("_") or "op"
    scope = _innermost(_module_stack(node))
    if not scope or scope.rsplit(".", 1)[-1] == what:  # relu inside module 'relu': 'relu'
        return scope.replace(".", "_") or what
    return f"{scope.replace('.', '_')}_{what}"


def _scope_key(stack: dict[str, Any], path: str, count: int) -> str | None:
    """The stack key of the ``count``-th call of the module at ``path``."""
    for key, value in stack.items():
        if not (isinstance(value, tuple) and value[0] == path):
            continue
        _, _, suffix = key.rpartition("@")
        index = int(suffix) if "@" in key and suffix.isdigit() else 0
        if index == count:
            return key
    return None


def _stack_through(stack: dict[str, Any], path: str) -> dict[str, Any]:
    """The entries of ``stack`` down to (and including) the module at ``path``."""
    out = {}
    for key, value in stack.items():
        out[key] = value
        if isinstance(value, tuple) and value[0] == path:
            break
    return out


def _fx_stack(stack: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """An export module stack as fx records one: keyed by path (``@N`` for repeated calls),
    valued (path, class), the root left out; classes are resolved when already imported."""
    out: dict[str, tuple[str, Any]] = {}
    for key, value in stack.items():
        if not isinstance(value, tuple) or not value[0]:
            continue
        path, kind = value
        _, at, suffix = key.rpartition("@")
        name = f"{path}@{suffix}" if at and suffix.isdigit() else path
        out[name] = (path, _resolve_class(kind))
    return out


def _resolve_class(kind: Any) -> Any:
    if not isinstance(kind, str):
        return kind
    module, _, name = kind.rpartition(".")
    return getattr(sys.modules.get(module), name, kind)


def _leaf_paths(spec: pytree.TreeSpec) -> list[list[Any]] | None:
    """How to reach each leaf of ``spec`` from the value: item keys, or ``".attr"``."""
    dummy = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    out = []
    for path, _ in pytree.tree_flatten_with_path(dummy)[0]:
        keys: list[Any] = []
        for key in path:
            if isinstance(key, pytree.SequenceKey):
                keys.append(key.idx)
            elif isinstance(key, pytree.MappingKey):
                keys.append(key.key)
            elif isinstance(key, pytree.GetAttrKey):
                keys.append("." + key.name)
            else:
                return None
        out.append(keys)
    return out
