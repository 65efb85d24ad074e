"""GraphIR: an fx ``GraphModule`` plus what passes and people need to work with it.

It carries the example inputs, per-node shapes and dtypes (propagated with fake tensors, no
real compute), per-node provenance (``node.meta["graphopt_origin"]``: the name of the
original node a node stands for), per-node parameter and MAC counts, and the pass history.

>>> import torch, graphopt
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
>>> ir = graphopt.GraphIR.trace(model, (torch.randn(1, 3, 16, 16),))
>>> [n.name for n in ir.nodes(module_type=torch.nn.Conv2d)]
['_0']
>>> ir.shape(ir.nodes(module_type=torch.nn.Conv2d)[0])
(1, 8, 14, 14)
>>> ir.total_macs()
42336
"""

from __future__ import annotations

import copy
import fnmatch
import html
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn
from torch.export import ExportedProgram

from .errors import GraphoptError
from .fxutil import fetch
from .measuring import run_model
from .shapes import NodeCost, node_costs, packed_weights, propagate_shapes
from .threads import one_thread

if TYPE_CHECKING:
    import networkx as nx

__all__ = [
    "BUILTIN_ANALYSES",
    "ORIGIN",
    "Analysis",
    "GraphIR",
    "NodeCost",
    "copy_sharing_tensors",
    "fetch",
    "free_name",
    "store_tensor",
]

#: node.meta key holding the name of the original node this node stands for
ORIGIN = "graphopt_origin"


def free_name(root: nn.Module, base: str) -> str:
    """``base``, or ``base_1``, ``base_2`` … : the first dotted path under ``root`` that holds
    nothing yet, for a new submodule or tensor."""
    name, i = base, 0
    while True:
        try:
            fetch(root, name)
        except AttributeError:
            return name
        i += 1
        name = f"{base}_{i}"


def store_tensor(root: nn.Module, target: str, value: torch.Tensor) -> torch.Tensor:
    """Put ``value`` at the dotted path ``target`` in place of what is there, keeping its
    kind: a parameter stays a parameter (with its ``requires_grad``), a buffer a buffer, a
    plain attribute plain. Returns the stored tensor."""
    owner_path, _, name = target.rpartition(".")
    owner = fetch(root, owner_path) if owner_path else root
    old = getattr(owner, name, None)
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(value, requires_grad=old.requires_grad))
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)
    return getattr(owner, name)


def _shallow_module(m: nn.Module, done: dict[int, nn.Module]) -> nn.Module:
    """A new module object with ``m``'s attributes, its own parameter, buffer and submodule
    tables, and new submodules (each copied once, so sharing is kept)."""
    if id(m) in done:
        return done[id(m)]
    new: nn.Module
    if isinstance(m, fx.GraphModule):
        # its forward lives on a class of its own, which a shallow copy would share
        memo: dict[int, Any] = {id(t): t for t in [*m.parameters(), *m.buffers()]}
        new = copy.deepcopy(m, memo)
    else:
        new = type(m).__new__(type(m))
        # straight into __dict__: Module.__setattr__ inspects every value it is given
        new.__dict__.update(m.__dict__)
        new.__dict__.update(_own_tables(m, done))
    done[id(m)] = new
    return new


def _own_tables(m: nn.Module, done: dict[int, nn.Module]) -> dict[str, Any]:
    """Own copies of every table in ``m``'s ``__dict__`` (parameters, buffers, hooks,
    non-persistent buffer names … with the same values), so that registering or replacing
    something in a copy leaves ``m`` alone; submodules are copied themselves."""
    tables: dict[str, Any] = {k: v.copy() for k, v in m.__dict__.items() if type(v) in _TABLE_TYPES}
    tables["_modules"] = {
        k: None if v is None else _shallow_module(v, done) for k, v in m._modules.items()
    }
    return tables


_TABLE_TYPES = (dict, OrderedDict, set, list)


def copy_sharing_tensors(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with a new graph and new modules sharing ``gm``'s tensors: changing
    the copy's graph, modules, training flags or node metadata leaves ``gm`` alone, writing
    into a tensor does not. It costs a fraction of a deep copy. (Built
    empty and then filled: ``GraphModule(root, graph)`` would re-register every target the
    graph names, one ``setattr`` each.)"""
    new = fx.GraphModule(nn.Module(), fx.Graph(), type(gm).__name__)
    own = set(new.__dict__)
    new.__dict__.update({k: v for k, v in gm.__dict__.items() if k not in own})
    new.__dict__.update(_own_tables(gm, {}))
    new.training = gm.training
    new.meta = dict(getattr(gm, "meta", {}))
    new.graph = copy.deepcopy(gm.graph)
    # what a pickled copy is rebuilt with (e.g. a tracer keeping a model's output type)
    for key in _REBUILT_WITH:
        if key in gm.__dict__:
            new.__dict__[key] = gm.__dict__[key]
    return new


#: what ``GraphModule.__init__`` sets afresh that a copy must take from the original: the
#: tracer a pickled module is rebuilt with, and its extras
_REBUILT_WITH = ("_tracer_cls", "_tracer_extras")


#: an analysis: computed from an IR on request, cached on it until a pass invalidates it
Analysis = Callable[["GraphIR"], Any]


def _shapes(ir: GraphIR) -> bool:
    propagate_shapes(ir.gm, ir.example_inputs)
    return True


def _costs(ir: GraphIR) -> dict[str, NodeCost]:
    ir.analysis("shapes")
    return node_costs(ir.gm)


def _outputs(ir: GraphIR) -> Any:
    return run_model(ir.gm, ir.example_inputs)


#: the analyses every IR knows unless it is given another table: ``shapes`` (each node's
#: fake value in ``node.meta["val"]`` and its MACs), ``costs`` (per-node params and MACs)
#: and ``outputs`` (what the model returns for the example inputs, run as
#: :func:`graphopt.run_model` runs it)
BUILTIN_ANALYSES: Mapping[str, Analysis] = {
    "shapes": _shapes,
    "costs": _costs,
    "outputs": _outputs,
}


class GraphIR:
    """A traced model with example inputs, shapes, provenance, costs and history.

    ``analyses`` is the table of analyses :meth:`analysis` computes from (by default
    :data:`BUILTIN_ANALYSES`; the pass manager gives the IRs it runs on its registry's
    table, plugins' analyses included).
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        example_inputs: Sequence[Any],
        *,
        source: str = "",
        history: Sequence[str] = (),
        analyses: Mapping[str, Analysis] | None = None,
    ) -> None:
        self.gm = gm
        self.example_inputs = tuple(example_inputs)
        self.source = source
        self.history = list(history)
        self.analyses: Mapping[str, Analysis] = (
            analyses if analyses is not None else BUILTIN_ANALYSES
        )
        self._analyses: dict[str, Any] = {}
        for node in gm.graph.nodes:
            node.meta.setdefault(ORIGIN, node.name)

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def trace(
        cls,
        model: nn.Module | ExportedProgram,
        example_inputs: Sequence[Any],
        *,
        leaf_modules: Iterable[str] = (),
        concrete_args: dict[str, Any] | None = None,
        source: str = "",
        capture: str = "auto",
        input_names: Sequence[str] | None = None,
    ) -> GraphIR:
        """Capture ``model`` as a graph (see :mod:`graphopt.capture`): with torch.fx symbolic
        tracing, with torch.export raised to the same vocabulary, or (``capture="auto"``)
        fx first and export if fx fails. A GraphModule is used as is (unless export is
        forced or modules must be kept opaque), an ``ExportedProgram`` is raised.

        ``leaf_modules`` names modules (by qualified name or class name) to keep as single
        calls, and ``concrete_args`` fixes forward arguments to constants: the usual cures
        for a model whose Python control flow depends on its inputs. ``input_names`` binds
        the example inputs to ``forward``'s arguments by name (e.g. ``input_ids``,
        ``attention_mask``); arguments with defaults that get no input are not inputs.
        """
        from .capture import CAPTURE, CAPTURE_MODES, remember_origin
        from .capture import capture as run_capture

        if capture not in CAPTURE_MODES:
            raise GraphoptError(
                f"capture must be one of {', '.join(CAPTURE_MODES)}, not '{capture}'"
            )
        if isinstance(model, ExportedProgram):
            if capture != "fx":
                from .raising import raise_program

                gm = raise_program(model)
                gm.meta[CAPTURE] = "export"
                return cls(gm, example_inputs, source=source)
            model = model.module()
        keep = isinstance(model, fx.GraphModule) and not leaf_modules and not concrete_args
        if keep and capture != "export":
            assert isinstance(model, fx.GraphModule)
            return cls(model, example_inputs, source=source)
        gm = run_capture(
            model,
            example_inputs,
            input_names=input_names,
            leaf_modules=leaf_modules,
            concrete_args=concrete_args,
            mode=capture,
        )
        remember_origin(model, gm)  # what the hf output format rebuilds
        return cls(gm, example_inputs, source=source)

    @property
    def capture(self) -> str:
        """How the graph was captured: ``"fx"`` (symbolic tracing) or ``"export"``."""
        from .capture import CAPTURE

        return str(self.gm.meta.get(CAPTURE, "fx"))

    def copy(self, *, share_tensors: bool = False) -> GraphIR:
        """A deep copy sharing nothing with this IR (modules, parameters, graph). With
        ``share_tensors`` the graph and every module are new but parameters and buffers are
        the same tensors: replacing a tensor (:func:`store_tensor`) or a module attribute in
        the copy leaves this IR alone, writing into a shared tensor does not. It costs a
        fraction of a deep copy (no tensor data is copied)."""
        if share_tensors:
            return GraphIR(
                copy_sharing_tensors(self.gm),
                self.example_inputs,
                source=self.source,
                history=self.history,
                analyses=self.analyses,
            )
        try:
            with one_thread():  # a copy per tensor
                gm = copy.deepcopy(self.gm)
        except RuntimeError as exc:
            if "deepcopy protocol" not in str(exc):
                raise
            raise GraphoptError(
                "the model holds a computed tensor as an attribute (as torch.nn.utils.prune "
                "leaves behind), which cannot be copied; make it permanent first with "
                "torch.nn.utils.prune.remove(module, 'weight'), or detach it"
            ) from None
        return GraphIR(
            gm,
            self.example_inputs,
            source=self.source,
            history=self.history,
            analyses=self.analyses,
        )

    # -- graph access -----------------------------------------------------------------------

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def module(self, node: fx.Node) -> nn.Module:
        """The submodule a ``call_module`` node calls."""
        return self.gm.get_submodule(str(node.target))

    def fetch(self, target: str) -> Any:
        """What the module holds at a dotted path (see :func:`fetch`)."""
        return fetch(self.gm, target)

    def free_name(self, base: str) -> str:
        """A dotted path for a new submodule or tensor, ``base`` or ``base_1`` … (see
        :func:`free_name`)."""
        return free_name(self.gm, base)

    def nodes(
        self,
        *,
        op: str | None = None,
        module_type: type | tuple[type, ...] | None = None,
        target: Any = None,
        name: str | None = None,
        where: Callable[[fx.Node], bool] | None = None,
    ) -> list[fx.Node]:
        """Nodes matching every given filter.

        ``op`` is an fx opcode (``call_module``, ``call_function`` …); ``module_type`` keeps
        ``call_module`` nodes whose module is an instance of it; ``target`` compares the
        node's target (a function, method name or module path); ``name`` is a glob pattern
        over node names; ``where`` any predicate.
        """
        found = []
        for node in self.graph.nodes:
            if op is not None and node.op != op:
                continue
            if module_type is not None and not (
                node.op == "call_module" and isinstance(self.module(node), module_type)
            ):
                continue
            if target is not None and node.target != target:
                continue
            if name is not None and not fnmatch.fnmatchcase(node.name, name):
                continue
            if where is not None and not where(node):
                continue
            found.append(node)
        return found

    @staticmethod
    def position(node: fx.Node) -> int:
        """Where ``node`` stands in its graph's order (0 for the first node); sorting by it
        puts nodes in execution order, and erasing in reverse of it never erases a node
        that still has users among the others."""
        for i, n in enumerate(node.graph.nodes):
            if n is node:
                return i
        raise ValueError(f"node {node.name} is not in its graph")

    def replace(self, old: fx.Node, new: fx.Node) -> None:
        """Route every use of ``old`` to ``new``, hand ``new`` its provenance, erase ``old``."""
        if new.meta.get(ORIGIN) in (None, new.name):
            new.meta[ORIGIN] = old.meta.get(ORIGIN, old.name)
        old.replace_all_uses_with(new)
        self.graph.erase_node(old)

    def replace_calls(
        self, nodes: Sequence[fx.Node], chain: Sequence[tuple[str, nn.Module]]
    ) -> list[str]:
        """Replace ``call_module`` nodes of one submodule by calls of the modules in
        ``chain``, one after another (the first gets each call's arguments, the next the
        previous output), e.g. a conv by a depthwise and a pointwise conv. Each
        ``(suffix, module)`` is added once, at :meth:`free_name` of ``TARGET_suffix``, and
        shared by every call; every new node carries the old node's provenance. Returns the
        new modules' paths."""
        base = str(nodes[0].target)
        paths = []
        for suffix, module in chain:
            paths.append(self.free_name(f"{base}_{suffix}"))
            self.gm.add_submodule(paths[-1], module)
        for node in nodes:
            last = node
            for path in paths:
                with self.graph.inserting_after(last):
                    new = self.graph.call_module(path, node.args if last is node else (last,))
                new.meta[ORIGIN] = node.meta.get(ORIGIN, node.name)
                last = new
            self.replace(node, last)
        return paths

    def recompile(self) -> None:
        """Regenerate the module's code after graph edits and drop unused submodules."""
        self.graph.lint()
        self.gm.delete_all_unused_submodules()
        self.gm.recompile()

    # -- analyses -----------------------------------------------------------------------------

    def analysis(self, name: str) -> Any:
        """The named analysis from :attr:`analyses`, computed on first request and cached
        until invalidated."""
        if name not in self._analyses:
            try:
                compute = self.analyses[name]
            except KeyError as exc:
                if isinstance(exc, GraphoptError):  # the table explained it (a registry's)
                    raise
                raise GraphoptError(
                    f"unknown analysis '{name}'; known analyses: {', '.join(sorted(self.analyses))}"
                ) from None
            self._analyses[name] = compute(self)
        return self._analyses[name]

    def provide(self, name: str, value: Any) -> None:
        """Record ``value`` as the named analysis of the graph as it is now, computed by other
        means (a pass that has just run the graph knows its shapes); the next change must
        :meth:`invalidate` it as usual."""
        self._analyses[name] = value

    def has_analysis(self, name: str) -> bool:
        """Whether ``name`` is computed and still valid (cached), without computing it."""
        return name in self._analyses

    def invalidate(self, keep: Iterable[str] = ()) -> None:
        """Forget every cached analysis except those in ``keep``."""
        keep = set(keep)
        self._analyses = {k: v for k, v in self._analyses.items() if k in keep}

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        """The static shape of a node's tensor value (None if it is not a tensor)."""
        self.analysis("shapes")
        val = node.meta.get("val")
        return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else None

    def dtype(self, node: fx.Node) -> torch.dtype | None:
        self.analysis("shapes")
        val = node.meta.get("val")
        return val.dtype if isinstance(val, torch.Tensor) else None

    def costs(self) -> dict[str, NodeCost]:
        """Per-node parameters and MACs, keyed by node name."""
        return self.analysis("costs")

    def total_params(self) -> int:
        """Parameters, plus the weights packed for quantized kernels (int8 models)."""
        packed = sum(
            t.numel()
            for m in self.gm.modules()
            for value in vars(m).values()
            if isinstance(value, torch.ScriptObject)
            for t in packed_weights(value)
        )
        return sum(p.numel() for p in self.gm.parameters()) + packed

    def total_macs(self) -> int:
        return sum(c.macs for c in self.costs().values())

    # -- views -------------------------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per node: the data behind the table, JSON and graph views."""
        costs = self.costs()
        out = []
        for node in self.graph.nodes:
            shape = self.shape(node)
            dtype = self.dtype(node)
            target = node.target
            kind = type(self.module(node)).__name__ if node.op == "call_module" else None
            out.append(
                {
                    "name": node.name,
                    "op": node.op,
                    "target": target if isinstance(target, str) else _callable_name(target),
                    "module": kind,
                    "shape": list(shape) if shape is not None else None,
                    "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
                    "params": costs[node.name].params,
                    "macs": costs[node.name].macs,
                    "origin": node.meta.get(ORIGIN),
                    "inputs": [a.name for a in node.all_input_nodes],
                }
            )
        return out

    def to_networkx(self) -> nx.DiGraph:
        """The dataflow graph as a networkx DiGraph whose node attributes are :meth:`rows`."""
        import networkx as nx

        g = nx.DiGraph()
        for row in self.rows():
            g.add_node(row["name"], **{k: v for k, v in row.items() if k != "inputs"})
            for src in row["inputs"]:
                g.add_edge(src, row["name"])
        return g

    def summary(self, *, limit: int | None = None) -> Any:
        """A rich Table of nodes with shapes, params and MACs, and the totals."""
        from rich.table import Table

        table = Table(title=f"{self.source or type(self.gm).__name__}", show_lines=False)
        for col, justify in [
            ("node", "left"),
            ("op", "left"),
            ("target", "left"),
            ("shape", "left"),
            ("dtype", "left"),
            ("params", "right"),
            ("MACs", "right"),
        ]:
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        rows = self.rows()
        shown = rows if limit is None else rows[:limit]
        for r in shown:
            table.add_row(*_cells(r))
        if len(shown) < len(rows):
            table.add_row(f"… {len(rows) - len(shown)} more", "", "", "", "", "", "")
        table.caption = (
            f"{len(rows)} nodes, {self.total_params():,} params, {self.total_macs():,} MACs"
        )
        return table

    def __rich__(self) -> Any:
        return self.summary(limit=60)

    def __repr__(self) -> str:
        return (
            f"GraphIR({self.source or type(self.gm).__name__}: {len(self.graph.nodes)} nodes, "
            f"history={self.history})"
        )

    def _repr_html_(self) -> str:
        rows = self.rows()
        head = "".join(
            f"<th>{h}</th>" for h in ("node", "op", "target", "shape", "dtype", "params", "MACs")
        )
        body = []
        for r in rows:
            body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r)) + "</tr>")
        caption = html.escape(
            f"{self.source or type(self.gm).__name__}: {len(rows)} nodes, "
            f"{self.total_params():,} params, {self.total_macs():,} MACs"
        )
        return (
            f"<table><caption>{caption}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>"
        )


def _cells(row: dict[str, Any]) -> list[str]:
    """One node's row as the text the table and HTML views show."""
    return [
        row["name"],
        row["op"],
        row["module"] or str(row["target"]),
        "×".join(map(str, row["shape"])) if row["shape"] is not None else "",
        row["dtype"] or "",
        f"{row['params']:,}" if row["params"] else "",
        f"{row['macs']:,}" if row["macs"] else "",
    ]


def _callable_name(target: Any) -> str:
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if name is None:
        return str(target)
    module = {"torch._C._nn": "torch.nn.functional", "_operator": "operator"}.get(module, module)
    return f"{module}.{name}" if module and module != "builtins" else name
