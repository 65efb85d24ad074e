"""Measuring a model as a user judges it: size, compute, latency, and agreement with another.

Used by ``graphopt report``. Latency is wall-clock time of repeated runs after warm-up, given
as the median with the interquartile range and the thread count, since one number without
its spread says little on a shared CPU.

>>> import torch, graphopt
>>> from graphopt.profiling import from_module, measure
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU())
>>> report = measure(from_module(model, (torch.randn(2, 8),)), runs=3, onnx=False)
>>> report.params, report.macs, report.latency.runs
(36, 64, 3)
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from .errors import GraphoptError, first_line
from .ir import GraphIR
from .lowering import METADATA_NAME, load_folder, read_metadata, write_onnx
from .manager import ledger_from_metadata
from .measuring import agreement, run_model, weights_bytes
from .report import Latency, ModelReport
from .threads import torch_threads

if TYPE_CHECKING:
    from .loading import ModelSpec

__all__ = [
    "Latency",
    "Loaded",
    "ModelReport",
    "agreement",
    "from_module",
    "ledger_from_metadata",
    "load_for_report",
    "measure",
    "time_callable",
    "torch_threads",
]


def time_callable(
    fn: Callable[[], Any], *, warmup: int = 3, runs: int = 20, threads: int | None = None
) -> Latency:
    """Time ``fn()``: ``warmup`` untimed calls, then ``runs`` timed ones.

    ``threads`` is what the reported figure says the callee used (default: torch's
    intra-op thread count).
    """
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    if len(samples) > 1:
        p25, _, p75 = statistics.quantiles(samples, n=4, method="inclusive")
    else:
        p25 = p75 = samples[0]
    used = threads if threads is not None else torch.get_num_threads()
    return Latency(statistics.median(samples), p25, p75, runs, warmup, used)


@dataclass
class Loaded:
    """A model to report on: a torch module (maybe with its GraphIR) or an ONNX file."""

    source: str
    inputs: tuple[Any, ...]
    module: torch.nn.Module | None = None
    ir: Any = None
    onnx_path: str | None = None
    metadata: dict[str, Any] | None = None
    _session: Callable[..., Any] | None = field(default=None, repr=False)

    def __call__(self, *inputs: Any) -> Any:
        """Run the model (eval mode, no grad) on ``inputs``."""
        if self.module is not None:
            return run_model(self.module, inputs)
        if self._session is None:
            assert self.onnx_path is not None
            self._session = ort_session(self.onnx_path)
        return self._session(*inputs)


def from_module(module: torch.nn.Module, inputs: tuple[Any, ...], *, source: str = "") -> Loaded:
    """A module (traced for params and MACs) ready for :func:`measure`."""
    ir = GraphIR.trace(module, inputs, source=source)
    return Loaded(source or type(module).__name__, tuple(inputs), module=ir.gm, ir=ir)


def ort_session(path: str, threads: int | None = None) -> Callable[..., list[torch.Tensor]]:
    """An onnxruntime CPU session for ``path`` using ``threads`` intra-op threads (default:
    torch's count, so eager and onnxruntime figures are taken under the same budget)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*args: Any) -> list[torch.Tensor]:
        feeds = {n: a.numpy() for n, a in zip(names, args, strict=False)}
        return [torch.from_numpy(o) for o in session.run(None, feeds)]

    return run


def _size_on_disk(path: str) -> int:
    if os.path.isdir(path):
        return sum(
            os.path.getsize(os.path.join(root, f))
            for root, _, files in os.walk(path)
            for f in files
        )
    return os.path.getsize(path)


def _is_artifact_folder(spec: str) -> bool:
    return os.path.isdir(spec) and os.path.isfile(os.path.join(spec, METADATA_NAME))


def load_for_report(
    spec: str | ModelSpec,
    *,
    inputs: tuple[Any, ...] | None = None,
    weights: str | None = None,
    trust_pickle: bool = False,
    leaf_modules: Iterable[str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> Loaded:
    """Load MODEL for measuring: anything ``optimize`` takes, plus ``.onnx`` files and the
    folder artifacts graphopt writes. ``inputs`` overrides the model's own example inputs;
    a :class:`ModelSpec` carries the loading options itself."""
    from dataclasses import replace

    from .loading import ModelSpec, make_inputs
    from .plugins import get_registry

    if isinstance(spec, str):
        spec = ModelSpec(
            spec,
            weights=weights,
            trust_pickle=trust_pickle,
            leaf_modules=list(leaf_modules),
            concrete_args=concrete_args,
        )
    path = spec.spec
    exporters = get_registry().exporters
    if path.endswith(".onnx") or _is_artifact_folder(path):
        if not os.path.exists(path):
            raise GraphoptError(f"model file '{path}' does not exist; check the path")
        try:
            metadata = read_metadata(path, exporters)
        except Exception as exc:
            raise GraphoptError(
                f"'{path}' is not a readable model ({first_line(exc)}); check that it is complete"
            ) from None
        if inputs is None and spec.input_shapes:
            inputs = make_inputs([tuple(s) for s in spec.input_shapes], spec.input_dtypes)
        if inputs is None:
            raise GraphoptError(f"give the input of '{path}' with --input-shape, e.g. 1,3,224,224")
        if path.endswith(".onnx"):
            loaded = Loaded(path, inputs, onnx_path=path, metadata=metadata)
        else:
            try:
                module = cast(torch.nn.Module, load_folder(path))
            except Exception as exc:
                raise GraphoptError(
                    f"the graphopt folder '{path}' cannot be loaded ({first_line(exc)}); "
                    "write it again with graphopt optimize"
                ) from None
            loaded = Loaded(path, inputs, module=module, metadata=metadata)
        _check_runs(loaded)
        return loaded
    if inputs is not None:
        spec = replace(
            spec,
            input_shapes=[tuple(t.shape) for t in inputs],
            input_dtypes=[str(t.dtype).replace("torch.", "") for t in inputs],
        )
    ir = spec.load()
    metadata = None
    if path.endswith((".pt2", ".pt", ".pth")) and os.path.isfile(path):
        try:  # reached only once load() accepted the file (and its trust flag)
            metadata = read_metadata(path, exporters)
        except Exception:
            metadata = None
    used = inputs if inputs is not None else ir.example_inputs
    return Loaded(path, tuple(used), module=ir.gm, ir=ir, metadata=metadata)


def _check_runs(loaded: Loaded) -> None:
    try:
        loaded(*loaded.inputs)
    except Exception as exc:
        shapes = ", ".join("×".join(map(str, t.shape)) for t in loaded.inputs)
        raise GraphoptError(
            f"'{loaded.source}' does not run on inputs of shape {shapes} ({first_line(exc)}); "
            "give its input shape with --input-shape"
        ) from None


def _onnx_latency(loaded: Loaded, runs: int, warmup: int, notes: list[str]) -> Latency | None:
    tmp = None
    try:
        path = loaded.onnx_path
        if path is None:
            if loaded.ir is None:
                notes.append("onnxruntime latency is measured for traced models and .onnx files")
                return None
            tmp = tempfile.mkdtemp(prefix="graphopt-report-")
            path = os.path.join(tmp, "model.onnx")
            write_onnx(loaded.ir.gm, loaded.inputs, path, {})
        session = ort_session(path)
        return time_callable(lambda: session(*loaded.inputs), runs=runs, warmup=warmup)
    except Exception as exc:
        notes.append(f"no onnxruntime latency: {first_line(exc)}")
        return None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _onnx_weights(path: str) -> tuple[int, int]:
    """Elements and bytes of an ONNX model's initializers."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(path)
    count = nbytes = 0
    for t in model.graph.initializer:
        n = math.prod(t.dims)
        count += n
        nbytes += n * tensor_dtype_to_np_dtype(t.data_type).itemsize
    return count, nbytes


def measure(loaded: Loaded, *, runs: int = 20, warmup: int = 3, onnx: bool = True) -> ModelReport:
    """Size, params, MACs and latency of a loaded model.

    Eager latency runs the PyTorch module; with ``onnx`` the model is also exported to ONNX
    (in a temporary folder) and timed in onnxruntime. A model that cannot be exported gets a
    note instead of a figure.
    """
    notes: list[str] = []
    params = macs = None
    if loaded.ir is not None:
        params, macs = loaded.ir.total_params(), loaded.ir.total_macs()
    elif loaded.module is not None:
        params = sum(p.numel() for p in loaded.module.parameters())
    weights = weights_bytes(loaded.module) if loaded.module is not None else None
    if os.path.exists(loaded.source):
        size, size_kind = _size_on_disk(loaded.source), "file"
    else:
        size, size_kind = weights or 0, "weights in memory"
    latency = ort = None
    if loaded.onnx_path is not None:
        params, weights = _onnx_weights(loaded.onnx_path)
        ort = time_callable(lambda: loaded(*loaded.inputs), runs=runs, warmup=warmup)
    else:
        latency = time_callable(lambda: loaded(*loaded.inputs), runs=runs, warmup=warmup)
        if onnx:
            ort = _onnx_latency(loaded, runs, warmup, notes)
    if macs is None:
        notes.append("MACs are counted only for models graphopt can trace")
    return ModelReport(
        loaded.source, params, macs, size, size_kind, latency, ort, loaded.metadata, notes, weights
    )
