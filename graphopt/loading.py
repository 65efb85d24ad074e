"""Turning a MODEL argument into a module (or exported program) and example inputs.

MODEL is one of:

* ``torchvision:NAME``, ``timm:NAME`` — built with random weights (nothing is downloaded;
  give your own with ``weights=``); ``hf:TYPE`` (``hf:bert``, ``hf:llama`` …) — a Hugging Face
  transformers family's default configuration with random weights; ``hf:DIR`` — a folder
  written by ``save_pretrained``. All three take builder options after ``?``:
  ``timm:resnet18?num_classes=10``, ``hf:bert?num_hidden_layers=2&hidden_size=128``
  (see :mod:`graphopt.sources`);
* ``package.module:callable`` or ``path/to/file.py:callable`` — a factory returning a module;

  every built model is made with torch seeded to :data:`BUILD_SEED`, so its random initial
  weights are the same on every load (an artifact can be compared with the model it came
  from);
* a ``.pt2`` torch.export archive (raised back to graphopt's vocabulary when captured);
* a ``.pt``/``.pth`` file: a state dict (needs a model from one of the forms above) is read
  with ``weights_only=True``; a pickled whole module runs code when loaded, so it is read
  only with ``trust_pickle=True``.

:class:`ModelSpec` bundles MODEL with the options that say how to load and capture it;
:func:`load_ir` turns one into a :class:`~graphopt.GraphIR`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import pickle
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import GraphoptError, first_line
from .inputs import (
    InputSpec,
    LoadedModel,
    default_input_shapes,
    float_inputs,
    seeded,
)

if TYPE_CHECKING:
    from torch.export import ExportedProgram

    from .ir import GraphIR

__all__ = [
    "InputSpec",
    "LoadedModel",
    "ModelSpec",
    "default_input_shapes",
    "example_inputs",
    "load_ir",
    "load_model",
    "make_inputs",
    "parse_shape",
]

TRUST_FLAG = "--trust-pickle"

#: what a MODEL argument can be, for messages that say what graphopt loads instead
MODEL_FORMS = (
    "a .pt/.pth/.pt2 file, torchvision:NAME, timm:NAME, hf:TYPE, hf:DIR or package.module:factory"
)

#: the share of available memory the example inputs may take (activations need the rest)
INPUT_MEMORY_SHARE = 0.25


@dataclass
class ModelSpec:
    """A MODEL argument and how to load and capture it: what ``graphopt optimize``,
    ``inspect`` and ``report`` take on the command line, and what :func:`graphopt.load`
    takes in Python.

    ``input_shapes``/``input_dtypes`` override the model's own example inputs (one dtype for
    all inputs or one per input); ``leaf_modules`` and ``concrete_args`` steer fx tracing;
    ``capture`` is ``"auto"`` (fx, then torch.export), ``"fx"`` or ``"export"``.
    """

    spec: str
    weights: str | None = None
    trust_pickle: bool = False
    input_shapes: Sequence[Sequence[int]] = ()
    input_dtypes: Sequence[str] = ()
    leaf_modules: Sequence[str] = ()
    concrete_args: dict[str, Any] | None = None
    capture: str = "auto"

    def load(self) -> GraphIR:
        """Load and capture the model (see :func:`load_ir`)."""
        return load_ir(self)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) to a tuple of positive ints."""
    parts = text.replace("x", ",").replace("×", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise GraphoptError(
            f"input shape '{text}' is not a list of positive integers; write e.g. 1,3,224,224"
        )
    return shape


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise GraphoptError(f"unknown input dtype '{name}'; use e.g. float32, float16 or int64")
    return dtype


def _available_memory() -> int | None:
    """Bytes of memory available to this process (Linux's MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def check_input_memory(specs: Sequence[InputSpec]) -> None:
    """Refuse example inputs that would take more than :data:`INPUT_MEMORY_SHARE` of the
    available memory, before anything is allocated."""
    need = sum(math.prod(s.shape) * _dtype(s.dtype).itemsize for s in specs)
    available = _available_memory()
    if available is None or need <= INPUT_MEMORY_SHARE * available:
        return
    shapes = " and ".join(",".join(map(str, s.shape)) for s in specs)
    raise GraphoptError(
        f"an example input of shape {shapes} needs {_size(need)}, more than a quarter of the "
        f"{_size(available)} of memory available; give a smaller --input-shape"
    )


def make_example(specs: Sequence[InputSpec], *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded example tensors for ``specs``: normal floats, token ids below ``high`` (small
    non-negative integers when unbounded), random booleans, or ones."""
    check_input_memory(specs)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in specs:
        dtype = _dtype(spec.dtype)
        if spec.ones:
            out.append(torch.ones(spec.shape, dtype=dtype))
        elif dtype.is_floating_point:
            out.append(torch.randn(spec.shape, generator=gen).to(dtype))
        elif dtype == torch.bool:
            out.append(torch.randint(0, 2, spec.shape, generator=gen).bool())
        else:
            out.append(torch.randint(0, spec.high or 10, spec.shape, generator=gen).to(dtype))
    return tuple(out)


def _check_dtype_count(dtypes: Sequence[str], n: int) -> None:
    if dtypes and len(dtypes) not in (1, n):
        raise GraphoptError(
            f"{len(dtypes)} input dtypes were given for {n} inputs; give one for all inputs or "
            "one per input"
        )


def make_inputs(
    shapes: Sequence[tuple[int, ...]], dtypes: Sequence[str] = (), *, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Seeded random example inputs: normal floats, or small non-negative integers."""
    _check_dtype_count(dtypes, len(shapes))
    specs = [
        InputSpec(None, tuple(shape), dtypes[min(i, len(dtypes) - 1)] if dtypes else "float32")
        for i, shape in enumerate(shapes)
    ]
    return make_example(specs, seed=seed)


def example_inputs(
    loaded: LoadedModel,
    shapes: Sequence[Sequence[int]] = (),
    dtypes: Sequence[str] = (),
) -> tuple[Any, ...]:
    """The example inputs of a loaded model: its own defaults, or the given shapes and
    dtypes applied to them (an input the user gives no shape for takes the shape of the
    input it follows, as an attention mask follows the token ids)."""
    specs = loaded.inputs
    if shapes:
        if not specs or len(shapes) > len(specs):
            specs = [InputSpec(None, tuple(s)) for s in shapes]
        else:
            given = [tuple(s) for s in shapes]
            specs = [
                _reshaped(spec, given[i] if i < len(given) else _followed(spec, given))
                for i, spec in enumerate(specs)
            ]
    elif loaded.example_inputs is not None:
        return loaded.example_inputs
    if not specs:
        raise GraphoptError(
            f"cannot guess the input of '{loaded.source}'; give its shape with --input-shape, "
            "e.g. --input-shape 1,3,224,224"
        )
    _check_dtype_count(dtypes, len(specs))
    if dtypes:
        specs = [_retyped(spec, dtypes[min(i, len(dtypes) - 1)]) for i, spec in enumerate(specs)]
    return make_example(specs)


def _followed(spec: InputSpec, given: list[tuple[int, ...]]) -> tuple[int, ...]:
    if spec.follows is not None and spec.follows < len(given):
        return given[spec.follows]
    return spec.shape


def _reshaped(spec: InputSpec, shape: tuple[int, ...]) -> InputSpec:
    return InputSpec(spec.name, shape, spec.dtype, spec.high, spec.ones, spec.follows)


def _retyped(spec: InputSpec, dtype: str) -> InputSpec:
    return InputSpec(spec.name, spec.shape, dtype, spec.high, spec.ones, spec.follows)


_ZOOS = ("torchvision:", "timm:", "hf:")


def load_model(spec: str, *, weights: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Resolve a MODEL argument (see the module docstring) to a module in eval mode, or an
    exported program."""
    if spec.startswith(_ZOOS):
        from . import sources

        loaded = sources.load_zoo(spec)
    elif os.path.isdir(spec):
        raise GraphoptError(
            f"'{spec}' is a directory, not a model; give {MODEL_FORMS} (a Hugging Face folder "
            f"is hf:{spec})"
        )
    elif spec.endswith((".pt", ".pth", ".pt2", ".bin")) or os.path.isfile(spec):
        loaded = _load_file(spec, trust_pickle=trust_pickle)
    elif ":" in spec:
        loaded = _load_factory(spec)
    else:
        raise GraphoptError(
            f"'{spec}' is neither an existing file nor a model spec; give {MODEL_FORMS}"
        )
    if weights is not None:
        if loaded.module is None:
            raise GraphoptError(
                f"--weights applies to a model built from code, not to the exported program "
                f"'{spec}'; give the model's factory with --weights, or the archive alone"
            )
        _apply_weights(loaded.module, weights)
    if loaded.module is not None:
        for m in loaded.module.modules():  # not .eval(): exported programs refuse it
            m.training = False
    return loaded


def load_ir(spec: ModelSpec) -> GraphIR:
    """Load ``spec.spec``, make its example inputs and capture it as a
    :class:`~graphopt.GraphIR` with shapes propagated.

    With ``capture="auto"``, a graph fx traced but that does not run on its example inputs
    is captured again with torch.export; if that fails too, the first error stands."""
    from .ir import GraphIR

    loaded = load_model(spec.spec, weights=spec.weights, trust_pickle=spec.trust_pickle)
    inputs = example_inputs(loaded, spec.input_shapes, spec.input_dtypes)
    model: Any = loaded.program if loaded.program is not None else loaded.module
    by_name = len(spec.input_shapes) <= len(loaded.inputs or [])
    names = loaded.input_names if by_name else None

    def capture(how: str) -> GraphIR:
        return GraphIR.trace(
            model,
            inputs,
            leaf_modules=spec.leaf_modules,
            concrete_args=spec.concrete_args,
            source=loaded.source,
            capture=how,
            input_names=names,
        )

    ir = capture(spec.capture)
    try:
        ir.analysis("shapes")
    except GraphoptError as exc:
        if spec.capture != "auto" or ir.capture != "fx":
            raise
        try:
            ir = capture("export")
            ir.analysis("shapes")
        except GraphoptError:
            raise exc from None
    return ir


def _import_target(spec: str) -> Any:
    where, _, attr = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise GraphoptError(f"model file '{where}' does not exist; check the path")
            mod_name = "_graphopt_user_" + os.path.splitext(os.path.basename(where))[0]
            spec_obj = importlib.util.spec_from_file_location(mod_name, where)
            assert spec_obj is not None and spec_obj.loader is not None
            module = importlib.util.module_from_spec(spec_obj)
            sys.modules[mod_name] = module
            spec_obj.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(where)
    except GraphoptError:
        raise
    except ModuleNotFoundError as exc:
        raise GraphoptError(
            f"cannot import '{where}' for model '{spec}': {first_line(exc)}; check the module "
            "path and that its package is installed or in the current directory"
        ) from None
    except Exception as exc:
        raise GraphoptError(
            f"importing '{where}' for model '{spec}' failed with {type(exc).__name__}: "
            f"{first_line(exc)}; fix that module first"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise GraphoptError(
                f"'{where}' has no attribute '{attr}'; name an existing model class or factory "
                "after the colon"
            )
        obj = getattr(obj, part)
    return obj


def _load_factory(spec: str) -> LoadedModel:
    factory = _import_target(spec)
    if isinstance(factory, nn.Module):
        module = factory
    elif callable(factory):
        try:
            with seeded():
                module = factory()
        except Exception as exc:
            raise GraphoptError(
                f"calling '{spec}' failed with {type(exc).__name__}: {first_line(exc)}; the "
                "factory must build the model without arguments"
            ) from None
    else:
        raise GraphoptError(f"'{spec}' is neither a module nor callable; name a model factory")
    if not isinstance(module, nn.Module):
        raise GraphoptError(
            f"'{spec}' returned a {type(module).__name__}, not a torch.nn.Module; the factory "
            "must return the model"
        )
    return LoadedModel(module, spec, inputs=float_inputs(default_input_shapes(module)))


def _is_state_dict(obj: Any) -> bool:
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) for k in obj):
        values = list(obj.values())
        if all(isinstance(v, torch.Tensor) for v in values):
            return True
        # training checkpoints: {"model": state_dict, "optimizer": ...}
        return any(_is_state_dict(v) for v in values if isinstance(v, Mapping))
    return False


#: what files of other frameworks are, by suffix: graphopt reads PyTorch models only
_FOREIGN = {
    ".onnx": "an ONNX model",
    ".ort": "an ONNX Runtime model",
    ".tflite": "a TensorFlow Lite model",
    ".pb": "a TensorFlow graph",
    ".h5": "a Keras model",
    ".keras": "a Keras model",
    ".gguf": "a GGUF model",
    ".engine": "a TensorRT engine",
    ".plan": "a TensorRT engine",
    ".mlmodel": "a Core ML model",
    ".mlpackage": "a Core ML model",
    ".xml": "an OpenVINO model",
}
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"


def _load_file(path: str, *, trust_pickle: bool) -> LoadedModel:
    if not os.path.exists(path):
        raise GraphoptError(f"model file '{path}' does not exist; check the path")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in _FOREIGN:
        raise GraphoptError(
            f"'{path}' is named as {_FOREIGN[suffix]}, which graphopt cannot read; give the "
            f"PyTorch model it came from: {MODEL_FORMS}"
        )
    if suffix == ".safetensors":
        raise GraphoptError(
            f"'{path}' holds weights only; give the model (hf:DIR for the folder with its "
            f"config.json, or another model spec) and pass this file with --weights {path}"
        )
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
        raise GraphoptError(
            f"'{path}' is not a PyTorch file (it is neither a zip archive written by torch.save "
            f"or torch.export.save nor a pickle); give {MODEL_FORMS}"
        )
    if suffix == ".pt2" or (magic == _ZIP_MAGIC and _is_export_archive(path)):
        return _load_pt2(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc) and "Unsupported global" not in str(exc):
            raise GraphoptError(
                f"'{path}' is not a readable PyTorch file ({first_line(exc)}); check that it "
                "was written by torch.save and is complete"
            ) from None
        if not trust_pickle:
            raise GraphoptError(
                f"'{path}' holds a pickled Python object, and loading it can run arbitrary code; "
                f"pass {TRUST_FLAG} if you trust where it came from, or save a state dict instead"
            ) from None
        obj = _load_pickle(path)
    except Exception as exc:
        if zipfile.is_zipfile(path) and _is_torchscript(path):
            raise GraphoptError(
                f"'{path}' is a TorchScript archive, which graphopt cannot capture; give the "
                "Python model (package.module:factory) with --weights instead"
            ) from None
        raise GraphoptError(
            f"'{path}' is not a readable PyTorch file ({first_line(exc)}); check that it was "
            "written by torch.save and is complete"
        ) from None
    if isinstance(obj, nn.Module):
        return LoadedModel(obj, path, inputs=float_inputs(default_input_shapes(obj)))
    if _is_state_dict(obj):
        raise GraphoptError(
            f"'{path}' holds a state dict, which has no model class; name the model "
            f"(torchvision:NAME, timm:NAME, hf:… or package.module:factory) and pass this file "
            f"with --weights {path}"
        )
    raise GraphoptError(
        f"'{path}' holds a {type(obj).__name__}, not a model; save the module or its state dict"
    )


def _is_export_archive(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("serialized_exported_program.json") or
                       n.endswith("models/model.json") for n in z.namelist())  # fmt: skip
    except zipfile.BadZipFile:
        return False


def _load_pickle(path: str) -> nn.Module:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise GraphoptError(
            f"'{path}' could not be unpickled ({type(exc).__name__}: {first_line(exc)}); the "
            "classes it refers to must be importable"
        ) from None
    return obj


def _is_torchscript(path: str) -> bool:
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _load_pt2(path: str) -> LoadedModel:
    try:
        program = torch.export.load(path)
    except Exception as exc:
        raise GraphoptError(
            f"'{path}' is not a readable torch.export archive ({first_line(exc)}); check that it "
            "was written by torch.export.save and is complete"
        ) from None
    example = getattr(program, "example_inputs", None)
    flat = None
    if example:
        from torch.utils import _pytree as pytree

        flat = tuple(t for t in pytree.tree_leaves(tuple(example)) if isinstance(t, torch.Tensor))
    return LoadedModel(None, path, example_inputs=flat, inputs=_program_inputs(program),
                       program=program)  # fmt: skip


def _program_inputs(program: ExportedProgram) -> list[InputSpec] | None:
    """The tensor inputs a program was exported for, from its placeholders' recorded values."""
    from torch.export.graph_signature import InputKind, TensorArgument

    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    specs = []
    for node, spec in zip(placeholders, program.graph_signature.input_specs, strict=True):
        if spec.kind != InputKind.USER_INPUT or not isinstance(spec.arg, TensorArgument):
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        shape = tuple(int(d) for d in val.shape)
        dtype = str(val.dtype).replace("torch.", "")
        specs.append(InputSpec(None, shape, dtype))
    return specs or None


def _apply_weights(module: nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise GraphoptError(f"weights file '{path}' does not exist; check the path")
    state: Any
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise GraphoptError(
            f"weights file '{path}' is not a state dict readable with weights_only=True "
            f"({first_line(exc)}); save it with torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(state, Mapping) and not _is_flat_state_dict(state):
        nested = [v for v in state.values() if isinstance(v, Mapping) and _is_flat_state_dict(v)]
        if len(nested) == 1:
            state = nested[0]
    if not (isinstance(state, Mapping) and _is_flat_state_dict(state)):
        raise GraphoptError(
            f"weights file '{path}' does not hold a state dict of tensors; save it with "
            "torch.save(model.state_dict(), path)"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise GraphoptError(
            f"weights file '{path}' does not match the model ({detail[:300]}); give the weights "
            "saved from this architecture"
        ) from None


def _is_flat_state_dict(obj: Mapping[Any, Any]) -> bool:
    return bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def load_data(spec: str) -> Any:
    """A data spec: a tensor file (a tensor, a list of tensors, or a list of input tuples,
    read with ``weights_only=True``) or ``package.module:callable`` returning an iterable of
    batches. A single tensor is split into batches of one along its first dimension."""
    if os.path.isfile(spec) and not spec.endswith(".py"):
        try:
            obj = torch.load(spec, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise GraphoptError(
                f"data file '{spec}' is not readable with weights_only=True ({first_line(exc)}); "
                "save a tensor or a list of tensors with torch.save"
            ) from None
        if isinstance(obj, torch.Tensor):
            return [(t.unsqueeze(0),) for t in obj]
        if isinstance(obj, list | tuple) and obj:
            return [b if isinstance(b, tuple | list) else (b,) for b in obj]
        raise GraphoptError(
            f"data file '{spec}' holds a {type(obj).__name__}; save a tensor or a list of batches"
        )
    if ":" not in spec:
        raise GraphoptError(
            f"data spec '{spec}' is neither a file nor package.module:callable; give one of those"
        )
    factory = _import_target(spec)
    try:
        data = factory() if callable(factory) else factory
    except Exception as exc:
        raise GraphoptError(
            f"calling data factory '{spec}' failed with {type(exc).__name__}: {first_line(exc)}"
        ) from None
    if not hasattr(data, "__iter__"):
        raise GraphoptError(f"data factory '{spec}' returned a {type(data).__name__}, not batches")
    return data
