"""Model zoos as MODEL sources: ``torchvision:NAME``, ``timm:NAME``, ``hf:TYPE`` and ``hf:DIR``.

Every zoo model is built with random weights from a seeded generator; nothing is ever
downloaded (Hugging Face loading runs with the hub offline and ``local_files_only``). Options
after ``?`` go to the builder, values read as JSON where they parse (``2``, ``true``,
``[1, 2]``) and as text otherwise:

* ``torchvision:resnet18?num_classes=10`` — keyword arguments of
  ``torchvision.models.get_model``;
* ``timm:convnext_nano?num_classes=10`` — keyword arguments of ``timm.create_model``;
* ``hf:bert?num_hidden_layers=2&hidden_size=128`` — configuration values of the family's
  default configuration (``architectures=BertForMaskedLM`` picks the task head); with
  ``hf:DIR`` they override values of the saved configuration.

Default inputs: torchvision models take their weight preset's crop size, timm models their
``pretrained_cfg`` input size, Hugging Face text models ``input_ids`` (1×128, ids below the
vocabulary size) and an ``attention_mask`` of ones, image models ``pixel_values`` of the
configured image size.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import GraphoptError, first_line
from .inputs import InputSpec, LoadedModel, default_input_shapes, float_inputs, seeded

__all__ = ["load_zoo", "split_options", "torchvision_shape"]

#: token sequence length of a Hugging Face text model's default input
DEFAULT_TOKENS = 128


def split_options(text: str) -> tuple[str, dict[str, Any]]:
    """``"bert?num_hidden_layers=2&hidden_size=64"`` → ``("bert", {...: 2, ...: 64})``."""
    name, _, query = text.partition("?")
    options: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise GraphoptError(
                f"model option '{item}' is not KEY=VALUE; write e.g. {name}?num_classes=10"
            )
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return name, options


def load_zoo(spec: str) -> LoadedModel:
    """Build a ``torchvision:``, ``timm:`` or ``hf:`` model (see the module docstring)."""
    zoo, _, rest = spec.partition(":")
    name, options = split_options(rest)
    if not name:
        raise GraphoptError(f"'{spec}' names no model; write e.g. {zoo}:NAME")
    if zoo == "torchvision":
        return _torchvision(name, options, spec)
    if zoo == "timm":
        return _timm(name, options, spec)
    return _hf(name, options, spec)


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    close += [k for k in known if name.lower() in k and k not in close][: 5 - len(close)]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _build(what: str, spec: str, build: Any) -> nn.Module:
    try:
        with seeded():
            module = build()
    except GraphoptError:
        raise
    except Exception as exc:
        raise GraphoptError(
            f"building '{spec}' failed with {type(exc).__name__}: {first_line(exc)}; check the "
            f"{what} options after '?'"
        ) from None
    return module


# -- torchvision ------------------------------------------------------------------------------


def torchvision_shape(name: str) -> tuple[int, ...] | None:
    """The input a torchvision model's weight presets declare (plain metadata, no download)."""
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


def _torchvision(name: str, options: dict[str, Any], spec: str) -> LoadedModel:
    from torchvision import models

    available = models.list_models()
    if name not in available:
        raise GraphoptError(
            f"torchvision has no model '{name}'{_suggest(name, available)}; 'python -c \"import "
            "torchvision; print(torchvision.models.list_models())\"' lists them"
        )
    module = _build("torchvision", spec, lambda: models.get_model(name, weights=None, **options))
    shape = torchvision_shape(name)  # the crop size its weight presets declare
    shapes = [shape] if shape is not None else default_input_shapes(module)
    return LoadedModel(module, spec, inputs=float_inputs(shapes))


# -- timm -------------------------------------------------------------------------------------


def _timm(name: str, options: dict[str, Any], spec: str) -> LoadedModel:
    try:
        import timm
    except ImportError:
        raise GraphoptError(
            f"'{spec}' needs timm, which is not installed; pip install 'graphopt[timm]'"
        ) from None
    if not timm.is_model(name):
        raise GraphoptError(
            f"timm has no model '{name}'{_suggest(name, timm.list_models())}; "
            "'python -c \"import timm; print(timm.list_models())\"' lists them"
        )
    options = {**options, "pretrained": False}
    module = _build("timm", spec, lambda: timm.create_model(name, **options))
    cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    shapes = [(1, *size)] if size else default_input_shapes(module)
    return LoadedModel(module, spec, inputs=float_inputs(shapes))


# -- Hugging Face transformers ------------------------------------------------------------------

_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """The hub offline (read by huggingface_hub when first imported) and transformers'
    logging quiet while a model loads; the environment is restored after."""
    saved = {k: os.environ.get(k) for k in _OFFLINE}
    os.environ.update(_OFFLINE)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _hf(name: str, options: dict[str, Any], spec: str) -> LoadedModel:
    with _offline():
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise GraphoptError(
                f"'{spec}' needs transformers, which is not installed; pip install 'graphopt[hf]'"
            ) from None
        if os.path.isdir(name):
            module = _hf_directory(name, options, spec)
        else:
            module = _hf_type(name, options, spec)
    config = module.config
    if hasattr(config, "use_cache"):
        config.use_cache = False  # no key/value cache in the outputs: logits only
    return LoadedModel(module, spec, inputs=_hf_inputs(module, spec))


def _hf_class(arch: str, spec: str) -> Any:
    import transformers

    cls = getattr(transformers, arch, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise GraphoptError(
            f"'{spec}' names architecture '{arch}', which transformers "
            f"{transformers.__version__} does not have; give a known architecture"
        )
    return cls


def _hf_directory(path: str, options: dict[str, Any], spec: str) -> nn.Module:
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise GraphoptError(
            f"'{path}' has no config.json; give a folder written by save_pretrained"
        )
    arch = options.pop("architectures", None)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, **options)
    except Exception as exc:
        raise GraphoptError(
            f"the configuration in '{path}' cannot be read ({first_line(exc)}); give a folder "
            "written by save_pretrained"
        ) from None
    if getattr(config, "auto_map", None):
        raise GraphoptError(
            f"'{path}' needs its own modelling code (auto_map), which graphopt does not run; "
            "load the model in Python and pass it to graphopt.optimize"
        )
    names = [arch] if isinstance(arch, str) else (config.architectures or [])
    cls = _hf_class(names[0], spec) if names else _hf_auto(config)
    try:
        with seeded():  # weights missing from the folder are initialised, reproducibly
            return cls.from_pretrained(
                path, config=config, local_files_only=True, dtype=torch.float32
            )
    except Exception as exc:
        raise GraphoptError(
            f"the weights in '{path}' cannot be loaded into {cls.__name__} ({first_line(exc)}); "
            "give a complete folder written by save_pretrained"
        ) from None


def _hf_type(model_type: str, options: dict[str, Any], spec: str) -> nn.Module:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    known = sorted(CONFIG_MAPPING_NAMES)
    parent = os.path.dirname(model_type)
    if model_type.startswith((".", "/", "~")) or (parent and os.path.isdir(parent)):
        raise GraphoptError(
            f"folder '{model_type}' does not exist; give a folder written by save_pretrained"
        )
    if model_type not in CONFIG_MAPPING_NAMES:
        looks_like_hub = "/" in model_type or "-" in model_type
        hint = (
            "; graphopt never downloads: save the model with save_pretrained and give hf:DIR"
            if looks_like_hub
            else "; give a model type (hf:bert, hf:llama …) or a folder written by save_pretrained"
        )
        raise GraphoptError(
            f"'{model_type}' is neither a transformers model type{_suggest(model_type, known)} "
            f"nor a folder{hint}"
        )
    arch = options.pop("architectures", None)
    default = AutoConfig.for_model(model_type)
    for key in options:
        if not hasattr(default, key):
            known_keys = sorted(default.to_dict())
            raise GraphoptError(
                f"the {model_type} configuration has no '{key}'{_suggest(key, known_keys)}; "
                "give configuration keys after '?'"
            )
    config = AutoConfig.for_model(model_type, **options)
    cls = _hf_class(arch, spec) if isinstance(arch, str) else _hf_auto(config)
    with seeded():
        try:
            if hasattr(cls, "from_config"):
                return cls.from_config(config)
            return cls(config)
        except Exception as exc:
            raise GraphoptError(
                f"building '{spec}' failed with {type(exc).__name__}: {first_line(exc)}; check "
                "the configuration values after '?'"
            ) from None


def _hf_auto(config: Any) -> Any:
    """The task head for a configuration: image classification for vision models, a causal
    LM head for decoder-only text models, sequence classification for encoders, else the
    bare model."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
    )
    from transformers.models.auto import modeling_auto as names

    kind = config.model_type
    if kind in names.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return AutoModelForImageClassification
    causal = kind in names.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if causal and kind not in names.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    if kind in names.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return AutoModelForSequenceClassification
    return AutoModel


def _hf_inputs(module: nn.Module, spec: str) -> list[InputSpec]:
    """Default inputs of a transformers model, bound to ``forward`` by name."""
    config: Any = module.config
    main = getattr(module, "main_input_name", "input_ids")
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    if main == "pixel_values":
        size = getattr(config, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
        channels = getattr(config, "num_channels", 3)
        return [InputSpec("pixel_values", (1, channels, height, width))]
    if main == "input_ids":
        positions = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        length = min(DEFAULT_TOKENS, positions) if positions else DEFAULT_TOKENS
        vocab = getattr(config, "vocab_size", None)
        inputs = [InputSpec("input_ids", (1, length), "int64", high=vocab)]
        if "attention_mask" in params:
            inputs.append(InputSpec("attention_mask", (1, length), "int64", ones=True, follows=0))
        return inputs
    raise GraphoptError(
        f"cannot guess the inputs of '{spec}' (its main input is '{main}'); graphopt makes "
        "inputs for text (input_ids) and image (pixel_values) models"
    )
