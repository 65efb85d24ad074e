"""Turning a MODEL argument into an ``nn.Module`` and example inputs.

MODEL is one of:

* ``torchvision:NAME`` — built with ``weights=None`` (pretrained weights cannot be fetched
  here; give your own with ``weights=``);
* ``package.module:callable`` or ``path/to/file.py:callable`` — a factory returning a module;

  both are built with torch seeded to :data:`BUILD_SEED`, so their random initial weights
  are the same on every load (an artifact can be compared with the model it came from);
* a ``.pt2`` torch.export archive;
* a ``.pt``/``.pth`` file: a state dict (needs a model from one of the forms above) is read
  with ``weights_only=True``; a pickled whole module runs code when loaded, so it is read
  only with ``trust_pickle=True``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import pickle
import sys
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import GraphoptError, first_line

__all__ = ["LoadedModel", "default_input_shapes", "load_model", "make_inputs", "parse_shape"]

TRUST_FLAG = "--trust-pickle"


@dataclass
class LoadedModel:
    """A model ready to trace, with the example inputs the source implies (if any)."""

    module: nn.Module
    source: str
    example_inputs: tuple[Any, ...] | None = None
    input_shapes: list[tuple[int, ...]] | None = None


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


def make_inputs(
    shapes: Sequence[tuple[int, ...]], dtypes: Sequence[str] = (), *, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Seeded random example inputs: normal floats, or small non-negative integers."""
    if dtypes and len(dtypes) not in (1, len(shapes)):
        raise GraphoptError(
            f"{len(dtypes)} input dtypes were given for {len(shapes)} inputs; give one for "
            "all inputs or one per input"
        )
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(shapes):
        dtype = _dtype(dtypes[min(i, len(dtypes) - 1)]) if dtypes else torch.float32
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(dtype))
        elif dtype == torch.bool:
            out.append(torch.randint(0, 2, shape, generator=gen).bool())
        else:
            out.append(torch.randint(0, 10, shape, generator=gen).to(dtype))
    return tuple(out)


def default_input_shapes(
    module: nn.Module, name: str | None = None
) -> list[tuple[int, ...]] | None:
    """A sensible single input for known model families, or None if none can be inferred.

    torchvision models take the crop size their weight presets declare (no download: the
    presets are plain metadata). Other models are judged by their first layer: a Conv2d
    with C input channels takes 1×C×224×224, Conv1d 1×C×128, Conv3d 1×C×16×112×112, a
    Linear 1×in_features.
    """
    if name is not None:
        shape = _torchvision_shape(name)
        if shape is not None:
            return [shape]
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return [(1, m.in_channels, 224, 224)]
        if isinstance(m, nn.Conv1d):
            return [(1, m.in_channels, 128)]
        if isinstance(m, nn.Conv3d):
            return [(1, m.in_channels, 16, 112, 112)]
        if isinstance(m, nn.Linear):
            return [(1, m.in_features)]
        if isinstance(m, nn.Embedding | nn.MultiheadAttention | nn.LSTM | nn.GRU):
            return None
    return None


#: the seed randomly initialised models are built with, so a spec loads the same weights twice
BUILD_SEED = 0


@contextlib.contextmanager
def seeded(seed: int = BUILD_SEED) -> Iterator[None]:
    """Run the body with torch's CPU generator seeded, restoring the caller's state after:
    ``torchvision:NAME`` and factories then give the same weights on every load, so a model
    can be compared with an artifact made from it, and the caller's random stream is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _torchvision_shape(name: str) -> tuple[int, ...] | None:
    from torchvision import models

    try:
        weights = models.get_model_weights(name)
    except (ValueError, KeyError):
        return None
    preset = next(iter(weights))
    size = None
    crop = getattr(preset.transforms, "keywords", {}).get("crop_size")
    if crop is not None:
        size = crop if isinstance(crop, int) else crop[0]
    if size is None:
        size = preset.meta.get("min_size", (224, 224))[0]
    if "video" in weights.__module__:
        return (1, 3, 16, size, size)
    return (1, 3, size, size)


def load_model(spec: str, *, weights: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Resolve a MODEL argument (see the module docstring) to a module in eval mode."""
    if spec.startswith("torchvision:"):
        loaded = _load_torchvision(spec.split(":", 1)[1])
    elif os.path.isdir(spec):
        raise GraphoptError(
            f"'{spec}' is a directory, not a model; give a .pt/.pth/.pt2 file, "
            "torchvision:NAME or package.module:factory"
        )
    elif spec.endswith((".pt", ".pth", ".pt2", ".bin")) or os.path.isfile(spec):
        loaded = _load_file(spec, trust_pickle=trust_pickle)
    elif ":" in spec:
        loaded = _load_factory(spec)
    else:
        raise GraphoptError(
            f"'{spec}' is neither an existing file, torchvision:NAME, nor package.module:factory"
        )
    if weights is not None:
        _apply_weights(loaded.module, weights)
    for m in loaded.module.modules():  # not .eval(): exported programs refuse it
        m.training = False
    return loaded


def _load_torchvision(name: str) -> LoadedModel:
    from torchvision import models

    available = models.list_models()
    if name not in available:
        close = [m for m in available if name.lower() in m][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise GraphoptError(
            f"torchvision has no model '{name}'{hint}; 'python -c \"import torchvision; "
            "print(torchvision.models.list_models())\"' lists them"
        )
    with seeded():
        module = models.get_model(name, weights=None)
    shapes = default_input_shapes(module, name)
    return LoadedModel(module, f"torchvision:{name}", input_shapes=shapes)


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
    return LoadedModel(module, spec, input_shapes=default_input_shapes(module))


def _is_state_dict(obj: Any) -> bool:
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) for k in obj):
        values = list(obj.values())
        if all(isinstance(v, torch.Tensor) for v in values):
            return True
        # training checkpoints: {"model": state_dict, "optimizer": ...}
        return any(_is_state_dict(v) for v in values if isinstance(v, Mapping))
    return False


def _load_file(path: str, *, trust_pickle: bool) -> LoadedModel:
    if not os.path.exists(path):
        raise GraphoptError(f"model file '{path}' does not exist; check the path")
    if path.endswith(".pt2"):
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
                f"'{path}' is a TorchScript archive, which fx cannot trace; give the Python "
                "model (package.module:factory) with --weights instead"
            ) from None
        raise GraphoptError(
            f"'{path}' is not a readable PyTorch file ({first_line(exc)}); check that it was "
            "written by torch.save and is complete"
        ) from None
    if isinstance(obj, nn.Module):
        return LoadedModel(obj, path, input_shapes=default_input_shapes(obj))
    if _is_state_dict(obj):
        raise GraphoptError(
            f"'{path}' holds a state dict, which has no model class; name the model "
            f"(torchvision:NAME or package.module:factory) and pass this file with --weights {path}"
        )
    raise GraphoptError(
        f"'{path}' holds a {type(obj).__name__}, not a model; save the module or its state dict"
    )


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
    args = tuple(example[0]) if example else None
    return LoadedModel(program.module(), path, example_inputs=args)


def _apply_weights(module: nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise GraphoptError(f"weights file '{path}' does not exist; check the path")
    try:
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
