"""Lowering: writing the optimised model out, atomically, and checking what was written.

The output format follows the path: ``.pt2`` (torch.export archive), ``.pt`` (pickled
GraphModule), ``.onnx`` (ONNX, checked with ``onnx.checker`` and run with onnxruntime), or a
directory (readable generated Python and a weights file, loadable without graphopt). Every
format is an :class:`Exporter` contributed through ``graphopt_register_exporters``, so a
plugin can add one. Each write goes to a temporary path beside the target, in a folder of
its own; the artifact is reloaded from there and its outputs compared with the in-memory
model; only then is it renamed into place. On any failure nothing is left at the target. An
exporter that writes anything beside the one path it was given is refused: that file would
otherwise be lost silently.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from .capture import quiet_export
from .contributions import Contributions, PluginRef, plugin_failure
from .errors import GraphoptError, PluginError, first_line
from .extensions import Exporter
from .hfformat import check_hf, load_hf, read_hf_metadata, write_hf
from .hookspecs import hookimpl
from .inputs import dynamic_shapes, free_dim_candidates, grown, varied
from .ir import copy_sharing_tensors
from .measuring import deviation, run_model

__all__ = [
    "ARTIFACT_TOLERANCE",
    "DYNAMIC_DIMS",
    "ONNX_TRANSLATIONS",
    "Exporter",
    "check_output",
    "export_program",
    "load_folder",
    "lower",
    "pick_exporter",
    "program_runner",
    "read_metadata",
    "write_onnx",
]

METADATA_NAME = "graphopt.json"
#: ``GraphModule.meta`` key a pass may set to widen the artifact check for its model: the
#: largest relative error it accepts between the artifact and the in-memory model (e.g. an
#: int8 model that another runtime's int8 kernels round differently)
ARTIFACT_TOLERANCE = "graphopt.artifact_tolerance"
#: ``GraphModule.meta`` key a pass may set to a dict mapping the custom ops it put in the graph
#: to their ONNX translations (onnxscript functions), passed to ``torch.onnx.export`` as its
#: ``custom_translation_table``
ONNX_TRANSLATIONS = "graphopt.onnx_translations"


def _strip(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` without fake tensors in node metadata (they cannot be serialised),
    its modules out of training mode. It shares ``gm``'s tensors: no writer changes them,
    and copying the weights would cost more than writing them."""
    clone = copy_sharing_tensors(gm)
    for node in clone.graph.nodes:
        node.meta.pop("val", None)
    for m in clone.modules():  # not .eval(): exported programs refuse it
        m.training = False
    return clone


# -- .pt2 --------------------------------------------------------------------------------------


#: ``graphopt.json`` key naming the input dims a ``.pt2`` or ``.onnx`` artifact leaves free
DYNAMIC_DIMS = "dynamic_dims"


def export_program(
    gm: fx.GraphModule, inputs: tuple[Any, ...], meta: dict[str, Any] | None = None
) -> torch.export.ExportedProgram:
    """``gm`` exported with torch.export, its batch dim (and a token model's sequence dim)
    left free where the graph allows it, else with the example inputs' shapes. Which dims
    are free is recorded under :data:`DYNAMIC_DIMS` in ``meta``; :func:`verify` runs the
    artifact at other sizes of them."""
    model = _strip(gm)
    for dims in free_dim_candidates(inputs):
        shapes = dynamic_shapes(dims, len(inputs))
        try:
            with quiet_export():
                program = torch.export.export(model, grown(inputs, dims), dynamic_shapes=shapes)
        except Exception:  # a dim the graph fixes (a reshape to the example's batch, …)
            continue
        if meta is not None:
            meta[DYNAMIC_DIMS] = {
                str(i): {str(d): n for d, n in f.items()} for i, f in dims.items()
            }
        return program
    try:
        return torch.export.export(model, inputs)
    except Exception as exc:
        raise GraphoptError(
            f"torch.export cannot export the optimised model ({first_line(exc)}); choose another "
            "output format, e.g. -o model.pt"
        ) from None


def _write_pt2(gm: fx.GraphModule, inputs: tuple[Any, ...], path: str, meta: dict) -> None:
    program = export_program(gm, inputs, meta)
    torch.export.save(program, path, extra_files={METADATA_NAME: json.dumps(meta)})


def _load_pt2(path: str) -> Callable[..., Any]:
    return program_runner(torch.export.load(path))


_STATE_INPUTS = {InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR,
                 InputKind.CUSTOM_OBJ}  # fmt: skip


def program_runner(program: torch.export.ExportedProgram) -> Callable[..., Any]:
    """A function running ``program``'s graph with its parameters, buffers and constants
    passed in as the lifted inputs they are, for checking a written ``.pt2``.

    ``ExportedProgram.module()`` would do, but its unlifting registers each attribute with
    a scan over every submodule, which grows with the square of the graph (6 s of a
    4k-node graph's lowering, 60 % of it at 16k nodes). A program with effect tokens or
    other inputs of a kind this does not know falls back on ``module()``."""
    sig = program.graph_signature
    if any(spec.kind not in (*_STATE_INPUTS, InputKind.USER_INPUT) for spec in sig.input_specs):
        return program.module()
    state = {**program.state_dict, **program.constants}
    lifted = [
        state[spec.target] if spec.kind in _STATE_INPUTS and spec.target is not None else None
        for spec in sig.input_specs
    ]
    user = [i for i, spec in enumerate(sig.output_specs) if spec.kind == OutputKind.USER_OUTPUT]

    def run(*args: Any) -> Any:
        flat, _ = pytree.tree_flatten((args, {}))
        given = iter(flat)
        inputs = [next(given) if value is None else value for value in lifted]
        with torch.no_grad():
            outputs = program.graph_module(*inputs)
        return pytree.tree_unflatten([outputs[i] for i in user], program.call_spec.out_spec)

    return run


def _meta_pt2(path: str) -> dict[str, Any] | None:
    extra = {METADATA_NAME: ""}
    torch.export.load(path, extra_files=extra)
    return json.loads(extra[METADATA_NAME]) if extra[METADATA_NAME] else None


# -- .pt ---------------------------------------------------------------------------------------


def _write_pt(gm: fx.GraphModule, inputs: tuple[Any, ...], path: str, meta: dict) -> None:
    clone = _strip(gm)
    # A plain attribute survives pickling (GraphModule.meta does not).
    clone.__dict__["graphopt_metadata"] = meta
    torch.save(clone, path)


def _load_pt(path: str) -> Callable[..., Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def _meta_pt(path: str) -> dict[str, Any] | None:
    return getattr(_load_pt(path), "graphopt_metadata", None)


# -- directory: generated Python + weights ------------------------------------------------------


def _import_line(name: str, value: Any) -> str:
    if isinstance(value, type(torch)):
        return f"import {value.__name__} as {name}" if value.__name__ != name else f"import {name}"
    if isinstance(value, float):
        return f"{name} = float({str(value)!r})"
    if value is type(None):
        return "NoneType = type(None)"
    module, qual = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if module and qual and "." not in qual:
        return (
            f"from {module} import {qual} as {name}"
            if qual != name
            else f"from {module} import {name}"
        )
    raise GraphoptError(
        f"the generated code needs '{name}' ({value!r}), which cannot be imported by name; "
        "choose another output format (-o model.pt2, model.pt or a .onnx file)"
    )


def _write_folder(gm: fx.GraphModule, inputs: tuple[Any, ...], path: str, meta: dict) -> None:
    program = export_program(gm, inputs, meta)
    sig = program.graph_signature
    graph_module = program.graph_module
    state = dict(program.state_dict)
    state.update(program.constants)
    lifted = {
        **sig.inputs_to_parameters,
        **sig.inputs_to_buffers,
        **sig.inputs_to_lifted_tensor_constants,
    }
    weights = {}
    for node in graph_module.graph.nodes:
        if node.op == "placeholder" and node.name in lifted:
            weights[node.name] = state[lifted[node.name]].detach().contiguous()
    params = set(sig.inputs_to_parameters)
    code = graph_module.graph.python_code("self")
    imports = sorted({_import_line(k, v) for k, v in code.globals.items()} | {"import torch"})
    arg_list = [n.name for n in graph_module.graph.nodes if n.op == "placeholder"]
    call_args = ", ".join(
        f"self.{name}" if name in lifted else f"flat_inputs[{sig.user_inputs.index(name)}]"
        for name in arg_list
    )
    body = textwrap.indent(code.src.replace("def forward(self,", "def _graph(self,", 1), "    ")
    out_spec = pytree.treespec_dumps(program.call_spec.out_spec)
    in_spec = pytree.treespec_dumps(program.call_spec.in_spec)
    title = f"{meta.get('source') or 'model'} optimised by graphopt {meta.get('graphopt', '')}"
    source = f'''"""{title}.

Pipeline: {meta.get("pipeline", "")}
Generated code; it needs only PyTorch. Load it with:

    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("optimised", "<this folder>/__init__.py")
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    model = module.OptimisedModel()
"""

{chr(10).join(imports)}
from pathlib import Path

from torch.utils import _pytree as _pytree

_HERE = Path(__file__).resolve().parent
_PARAMETERS = {sorted(params)!r}
_IN_SPEC = _pytree.treespec_loads({in_spec!r})
_OUT_SPEC = _pytree.treespec_loads({out_spec!r})


class OptimisedModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        weights = torch.load(_HERE / "weights.pt", map_location="cpu", weights_only=True)
        for name, tensor in weights.items():
            if name in _PARAMETERS:
                self.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
            else:
                self.register_buffer(name, tensor)

    def forward(self, *args, **kwargs):
        flat_inputs, _ = _pytree.tree_flatten((args, kwargs))
        flat_outputs = self._graph({call_args})
        return _pytree.tree_unflatten(list(flat_outputs), _OUT_SPEC)
{body}'''
    os.makedirs(path)
    torch.save(weights, os.path.join(path, "weights.pt"))
    with open(os.path.join(path, "model.py"), "w") as f:
        f.write(source)
    with open(os.path.join(path, "__init__.py"), "w") as f:
        f.write("from .model import OptimisedModel\n\n__all__ = ['OptimisedModel']\n")
    with open(os.path.join(path, METADATA_NAME), "w") as f:
        json.dump(meta, f, indent=2)


def load_folder(path: str) -> Callable[..., Any]:
    """Import a folder artifact's generated code and build its model (what a user of the
    folder does, without leaving the module in ``sys.modules``)."""
    name = f"_graphopt_artifact_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(path, "__init__.py"), submodule_search_locations=[path]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        return module.OptimisedModel()
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def _meta_folder(path: str) -> dict[str, Any] | None:
    file = os.path.join(path, METADATA_NAME)
    if not os.path.exists(file):
        return None
    with open(file) as f:
        return json.load(f)


# -- .onnx -------------------------------------------------------------------------------------


def write_onnx(gm: fx.GraphModule, inputs: tuple[Any, ...], path: str, meta: dict) -> None:
    """Export ``gm`` to ONNX at ``path`` with ``meta`` stored in its metadata, checked with
    ``onnx.checker``."""
    import onnx

    # onnxscript's constant folder logs the ops it declines to fold ("Evaluation failed:
    # cannot reshape …", on index arithmetic of token models) as warnings: not the user's
    # concern, kept off the console
    exported = export_program(gm, inputs, meta)
    quiet = logging.getLogger("onnxscript")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        program = torch.onnx.export(
            exported,
            inputs,
            dynamo=True,
            verbose=False,
            custom_translation_table=gm.meta.get(ONNX_TRANSLATIONS) or None,
        )
        assert program is not None
        model = program.model_proto
    except Exception as exc:
        raise GraphoptError(
            f"the model cannot be exported to ONNX ({first_line(exc)}); choose another output "
            "format (-o model.pt2, model.pt or a directory)"
        ) from None
    finally:
        quiet.setLevel(level)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_NAME, json.dumps(meta)
    onnx.save(model, path)
    onnx.checker.check_model(path, full_check=True)


def _load_onnx(path: str) -> Callable[..., Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*args: Any) -> list[torch.Tensor]:
        feeds = {n: a.numpy() for n, a in zip(names, args, strict=False)}
        return [torch.from_numpy(o) for o in session.run(None, feeds)]

    return run


def _meta_onnx(path: str) -> dict[str, Any] | None:
    import onnx

    model = onnx.load(path, load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_NAME:
            return json.loads(prop.value)
    return None


BUILTIN_EXPORTERS = (
    Exporter("pt2", (".pt2",), _write_pt2, _load_pt2, _meta_pt2, summary="torch.export archive"),
    Exporter("pt", (".pt", ".pth"), _write_pt, _load_pt, _meta_pt, summary="pickled GraphModule"),
    Exporter(
        "onnx",
        (".onnx",),
        write_onnx,
        _load_onnx,
        _meta_onnx,
        tolerance=1e-3,
        summary="ONNX, checked with onnx.checker and onnxruntime",
    ),
    Exporter(
        "folder",
        (),
        _write_folder,
        load_folder,
        _meta_folder,
        directory=True,
        summary="generated Python + weights.pt, loadable without graphopt",
    ),
    # chosen by name (--format hf), never by the path: the folder format stays the default
    Exporter(
        "hf",
        (),
        write_hf,
        load_hf,
        read_hf_metadata,
        directory=True,
        tolerance=1e-4,
        summary="transformers save_pretrained folder (config + safetensors) for from_pretrained",
        check=check_hf,
    ),
)


@hookimpl
def graphopt_register_exporters(register: Any) -> None:
    for exporter in BUILTIN_EXPORTERS:
        register(exporter)


# -- choosing, writing, verifying ---------------------------------------------------------------


def pick_exporter(
    out: str, exporters: Mapping[str, Exporter], format: str | None = None
) -> Exporter:
    """The exporter for an output path: ``format`` when given (an exporter's name, e.g.
    ``"hf"``); else a path ending in a slash is a folder; otherwise a file suffix names its
    format (even where a directory of that name exists, which :func:`check_output` then
    refuses); a path without a suffix, or an existing directory whose suffix names no
    format, is a folder."""
    if format is not None:
        return _named_exporter(out, exporters, format)
    suffix = os.path.splitext(out.rstrip("/" + os.sep))[1].lower()
    by_suffix = next((e for e in exporters.values() if suffix and suffix in e.suffixes), None)
    folders = [e for e in exporters.values() if e.directory]
    slash = out.endswith(("/", os.sep))
    if folders and (slash or not suffix or (by_suffix is None and os.path.isdir(out))):
        return folders[0]
    if by_suffix is not None and not slash:
        return by_suffix
    known = ", ".join(s for e in exporters.values() for s in e.suffixes)
    note = exporters.fault_note() if isinstance(exporters, Contributions) else ""
    raise GraphoptError(
        f"no output format for '{out}'; name a file ending in {known}, or a directory{note}"
    )


def _named_exporter(out: str, exporters: Mapping[str, Exporter], format: str) -> Exporter:
    """The exporter called ``format``, if ``out`` is a path it can write."""
    if format not in exporters:
        note = exporters.fault_note() if isinstance(exporters, Contributions) else ""
        raise GraphoptError(
            f"no output format '{format}'; choose one of {', '.join(sorted(exporters))}{note}"
        )
    exporter = exporters[format]
    suffix = os.path.splitext(out.rstrip("/" + os.sep))[1].lower()
    if not exporter.directory and suffix not in exporter.suffixes:
        raise GraphoptError(
            f"the {format} output format writes {', '.join(exporter.suffixes)} files, not "
            f"'{out}'; give -o a name ending in {exporter.suffixes[0]}"
        )
    return exporter


def check_output(
    out: str, exporters: Mapping[str, Exporter], format: str | None = None
) -> Exporter:
    """Fail early, before any work, if ``out`` cannot be written (in ``format``, when given:
    an exporter's name)."""
    exporter = pick_exporter(out, exporters, format)
    target = os.path.abspath(out.rstrip("/") or out)
    foreign = not os.path.exists(os.path.join(target, METADATA_NAME))
    if exporter.directory and os.path.isdir(target) and os.listdir(target) and foreign:
        raise GraphoptError(
            f"output directory '{out}' exists and was not written by graphopt; choose a new "
            "or empty directory"
        )
    if os.path.isdir(target) and not exporter.directory:
        raise GraphoptError(
            f"output '{out}' is an existing directory, but its suffix names the "
            f"{exporter.name} format, a file; give another file name, or end the path with "
            f"'/' to write the folder format into that directory"
        )
    parent = os.path.dirname(target)
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not _can_create_in(existing):
        raise GraphoptError(
            f"cannot write '{out}': '{existing}' is not a writable directory; choose another -o"
        )
    return exporter


def _can_create_in(folder: str) -> bool:
    """Whether files can really be made in ``folder`` (access() says yes to root on /proc)."""
    if not os.path.isdir(folder):
        return False
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".graphopt-probe-", dir=folder))
    except OSError:
        return False
    return True


def lower(
    gm: fx.GraphModule,
    example_inputs: tuple[Any, ...],
    out: str | os.PathLike[str],
    metadata: dict[str, Any],
    exporters: Mapping[str, Exporter],
    format: str | None = None,
    *,
    expected: Any = None,
) -> dict[str, Any]:
    """Write ``gm`` to ``out`` atomically and verify the artifact; return the check figures.

    ``out`` names a directory when it ends with a slash or has no suffix, unless ``format``
    names the exporter (see :func:`pick_exporter`). ``expected`` is what ``gm`` returns for
    ``example_inputs`` when the caller has just run it (:attr:`graphopt.Result.outputs`);
    without it the check runs ``gm`` again."""
    out = os.fspath(out)
    metadata = dict(metadata)  # a writer records the dims it left free in its own copy
    exporter = check_output(out, exporters, format)
    if exporter.check is not None:
        exporter.check(gm)
    target = os.path.abspath(out.rstrip("/") or out)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp_root = tempfile.mkdtemp(prefix=".graphopt-", dir=parent)
    tmp = os.path.join(tmp_root, os.path.basename(target))
    try:
        try:
            exporter.write(gm, example_inputs, tmp, metadata)
        except GraphoptError:
            raise
        except Exception as exc:
            raise GraphoptError(
                f"writing the {exporter.name} artifact failed ({type(exc).__name__}: "
                f"{first_line(exc)}); choose another output format"
            ) from None
        owner = _plugin_of(exporter, exporters)
        _check_one_artifact(exporter, owner, tmp_root, os.path.basename(target))
        check = verify(exporter, tmp, gm, example_inputs, owner=owner, expected=expected)
        free = metadata.get(DYNAMIC_DIMS)
        if free:
            dims = {int(i): {int(d): n for d, n in f.items()} for i, f in free.items()}
            other = varied(example_inputs, dims)
            again = verify(exporter, tmp, gm, other, owner=owner)
            check["free_dims"] = sorted({n for f in dims.values() for n in f.values()})
            check["also_checked_at"] = {
                n: other[i].shape[d] for i, f in dims.items() for d, n in f.items()
            }
            check["rel_err"] = max(check["rel_err"], again["rel_err"])
            check["max_abs_err"] = max(check["max_abs_err"], again["max_abs_err"])
        _replace(tmp, target, exporter.directory)
        return check
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def _plugin_of(exporter: Exporter, exporters: Mapping[str, Exporter]) -> PluginRef | None:
    """The third-party plugin that contributed ``exporter`` (None for graphopt's own)."""
    owner = exporters.owner(exporter.name) if isinstance(exporters, Contributions) else None
    return owner if owner is not None and not owner.builtin else None


def _check_one_artifact(
    exporter: Exporter, owner: PluginRef | None, folder: str, name: str
) -> None:
    """Refuse an exporter that wrote nothing at the path it was given, or something
    beside it: only that path is moved to ``-o``, so the rest would be lost."""
    found = sorted(os.listdir(folder))
    if found == [name]:
        return
    who = f"the {exporter.name} output format" + (f" of plugin '{owner.name}'" if owner else "")
    advice = f"; {owner.advice()}" if owner else ""
    if name not in found:
        raise GraphoptError(
            f"{who} wrote nothing at the path it was given, so there is nothing to move to "
            f"the output{advice}"
        )
    kind = "folder" if exporter.directory else "file"
    raise GraphoptError(
        f"{who} wrote {', '.join(f for f in found if f != name)} beside the one {kind} it "
        f"was given; only that {kind} is moved to the output, so nothing was written{advice}"
    )


def verify(
    exporter: Exporter,
    path: str,
    gm: fx.GraphModule,
    example_inputs: tuple[Any, ...],
    *,
    owner: PluginRef | None = None,
    expected: Any = None,
) -> dict[str, Any]:
    """Reload an artifact and compare its outputs with the in-memory model's (``expected``,
    when already known, else ``gm`` is run); ``owner`` is the third-party plugin behind
    ``exporter``, blamed when its artifact fails to run."""
    try:
        got = run_model(exporter.load(path), example_inputs)
    except GraphoptError:
        raise
    except Exception as exc:
        if owner is not None:
            what = f"running the written artifact of output format '{exporter.name}'"
            raise PluginError(owner.name, plugin_failure(owner, what, exc)) from exc
        raise GraphoptError(
            f"the written {exporter.name} artifact cannot be loaded back and run "
            f"({type(exc).__name__}: {first_line(exc)}); nothing was written"
        ) from None
    # compared leaf by leaf: a runtime may return a list where the model returns a tuple
    dev = deviation(got, run_model(gm, example_inputs) if expected is None else expected)
    tolerance = max(exporter.tolerance, float(gm.meta.get(ARTIFACT_TOLERANCE, 0.0)))
    if dev.rel_err > tolerance:
        raise GraphoptError(
            f"the written {exporter.name} artifact does not reproduce the model (relative error "
            f"{dev.rel_err:.2e} > {tolerance:.0e}); nothing was written"
        )
    return {"format": exporter.name, "max_abs_err": dev.max_abs_err, "rel_err": dev.rel_err}


def _replace(tmp: str, target: str, directory: bool) -> None:
    if directory and os.path.isdir(target):
        old = target + f".old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def read_metadata(path: str, exporters: Mapping[str, Exporter]) -> dict[str, Any] | None:
    """The graphopt metadata (pipeline, ledger, versions) stored in an artifact, if any."""
    return pick_exporter(path, exporters).read_metadata(path)
