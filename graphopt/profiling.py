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

import contextlib
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.utils import _pytree as pytree

from .errors import GraphoptError, first_line
from .manager import Deviation, LedgerEntry, run_model
from .outputs import primary_output

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


@dataclass
class Latency:
    """Milliseconds per call: median and quartiles over ``runs`` timed calls."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    runs: int
    warmup: int
    threads: int


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


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with torch using ``threads`` intra-op threads (None: leave as is)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class ModelReport:
    """What ``graphopt report`` shows for one model."""

    source: str
    params: int | None
    macs: int | None
    size_bytes: int
    size_kind: str  # "file" or "weights in memory"
    latency: Latency | None
    ort_latency: Latency | None
    metadata: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    weights_bytes: int | None = None  # parameters and buffers (ONNX: initializers)

    def _repr_html_(self) -> str:
        from .report import report_html

        return report_html([self])

    def to_json(self) -> dict[str, Any]:
        """Plain data for ``--json``: the figures, notes, and the stored ledger if any."""
        data = asdict(self)
        meta = data.pop("metadata") or {}
        data["artifact"] = (
            {k: meta.get(k) for k in ("pipeline", "source", "graphopt", "torch", "ledger")}
            if meta
            else None
        )
        return data


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
    from .ir import GraphIR

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
    from .lowering import METADATA_NAME

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
    from .lowering import _load_folder, read_metadata
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
                module = cast(torch.nn.Module, _load_folder(path))
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
    from .lowering import _write_onnx

    tmp = None
    try:
        path = loaded.onnx_path
        if path is None:
            if loaded.ir is None:
                notes.append("onnxruntime latency is measured for traced models and .onnx files")
                return None
            tmp = tempfile.mkdtemp(prefix="graphopt-report-")
            path = os.path.join(tmp, "model.onnx")
            _write_onnx(loaded.ir.gm, loaded.inputs, path, {})
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


def _state_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once."""
    seen: dict[int, int] = {}
    for t in module.state_dict(keep_vars=True).values():
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


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
    weights = _state_bytes(loaded.module) if loaded.module is not None else None
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


def _tensors(out: Any) -> list[torch.Tensor]:
    return [t.detach().float() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def agreement(a: Loaded, b: Loaded, batches: Iterable[Any] | None = None) -> Deviation:
    """How far B's outputs are from A's: max abs error, relative error ‖B−A‖/‖A‖ and, for
    classifier logits, top-1 agreement, over ``batches`` (default: A's probe inputs)."""
    max_abs = num = den = 0.0
    agree = total = 0
    count = 0
    for batch in batches if batches is not None else [a.inputs]:
        inputs = tuple(batch) if isinstance(batch, tuple | list) else (batch,)
        ref_out, got_out = _run(a, inputs), _run(b, inputs)
        ref, got = _tensors(ref_out), _tensors(got_out)
        if len(ref) != len(got) or any(x.shape != y.shape for x, y in zip(ref, got, strict=True)):
            raise GraphoptError(
                f"'{b.source}' returns outputs shaped {[tuple(t.shape) for t in got]} where "
                f"'{a.source}' returns {[tuple(t.shape) for t in ref]}; compare models with the "
                "same outputs"
            )
        count += 1
        for x, y in zip(got, ref, strict=True):
            if x.numel():
                max_abs = max(max_abs, float((x - y).abs().max()))
            num += float((x - y).pow(2).sum())
            den += float(y.pow(2).sum())
        pref, pgot = primary_output(ref_out), primary_output(got_out)
        if pref is not None and pgot is not None and pref.dim() == 2 and pref.shape[1] > 1:
            agree += int((pgot.argmax(1) == pref.argmax(1)).sum())
            total += pref.shape[0]
    if count == 0:
        raise GraphoptError("the data spec gave no batches; give at least one batch")
    rel = math.sqrt(num) / math.sqrt(den) if den > 0 else (0.0 if num == 0 else math.inf)
    return Deviation(max_abs, rel, agree / total if total else None)


def _run(model: Loaded, inputs: tuple[Any, ...]) -> Any:
    try:
        return model(*inputs)
    except Exception as exc:
        shapes = ", ".join("×".join(map(str, getattr(t, "shape", ()))) for t in inputs)
        raise GraphoptError(
            f"'{model.source}' fails on a batch of shape {shapes} ({first_line(exc)}); give "
            "batches the model accepts"
        ) from None


def ledger_from_metadata(metadata: dict[str, Any]) -> list[LedgerEntry]:
    """The compression ledger stored in an artifact's metadata, as :class:`LedgerEntry` rows
    (keys a newer graphopt may have added are ignored)."""
    known = {f.name for f in fields(LedgerEntry)}
    return [
        LedgerEntry(**{k: v for k, v in row.items() if k in known})
        for row in metadata.get("ledger") or []
    ]
