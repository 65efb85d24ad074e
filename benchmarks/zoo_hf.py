"""Hugging Face transformers through ``prune(ratio=0.5),quant``: graphopt against Torch-Pruning.

For each of the eight families (BERT, RoBERTa, DistilBERT, GPT-2, Llama, Qwen2, ViT,
ConvNeXt; small configurations, random weights, nothing downloaded) it measures, in one run:

* **graphopt**: the model captured from ``hf:TYPE?…`` (by fx or export), then
  ``prune(ratio=0.5),quant`` lowered to ``.pt``, ``.onnx`` and ``.pt2`` (each verified by
  lowering itself); the ``.onnx`` is also run by onnxruntime here with the model's own inputs
  (token ids and attention mask for text models) and compared with the pruned in-memory model.
  MACs and params ratios are those of the prune step against the captured model.
* **Torch-Pruning**: the same model pruned 50% the way its Hugging Face examples do it
  (``MetaPruner``, L2 magnitude, the attention projections declared with their head counts,
  the task head ignored, the output read through ``output_transform``), then the attention
  modules' head counts updated from the pruner; whether the pruned model runs, its MACs ratio
  (counted by graphopt's own counter on both sides), or why it failed.

    python benchmarks/zoo_hf.py
    python benchmarks/zoo_hf.py --families bert llama --formats pt onnx

``main(argv)`` is what ``benchmarks/zoo.py --part hf`` calls.
"""

from __future__ import annotations

import argparse
import logging
import signal
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import graphopt
from graphopt.loading import example_inputs, load_model

_CORE = "num_hidden_layers=2&hidden_size=128&intermediate_size=256&num_attention_heads=4"
#: each family's small configuration (options of its hf:TYPE spec)
FAMILIES = {
    "bert": f"vocab_size=1000&{_CORE}",
    "roberta": f"vocab_size=1000&{_CORE}",
    "distilbert": "vocab_size=1000&n_layers=2&dim=128&n_heads=4&hidden_dim=256",
    "gpt2": "vocab_size=1000&n_layer=2&n_embd=128&n_head=4",
    "llama": f"vocab_size=1000&{_CORE}&num_key_value_heads=2",
    "qwen2": f"vocab_size=1000&{_CORE}&num_key_value_heads=2",
    "vit": f"{_CORE}&image_size=32&patch_size=8",
    "convnext": "hidden_sizes=[32,64,128,256]&depths=[1,1,2,1]&image_size=64",
}
PIPELINE = "prune(ratio=0.5),quant"
TOKENS = (1, 32)
FORMATS = ("pt", "onnx", "pt2")


@dataclass
class Row:
    family: str
    capture: str = "-"
    macs: float | None = None
    params: float | None = None
    formats: dict[str, str] = field(default_factory=dict)
    ort_rel_err: float | None = None
    seconds: float = 0.0
    failure: str = ""
    tp_macs: float | None = None
    tp_failure: str = ""
    tp_seconds: float = 0.0


def spec_of(family: str) -> str:
    return f"hf:{family}?{FAMILIES[family]}"


def _inputs(spec: str) -> tuple[nn.Module, list[str], tuple[Any, ...]]:
    loaded = load_model(spec)
    assert loaded.module is not None and loaded.input_names is not None
    text = loaded.input_names[0] == "input_ids"
    inputs = example_inputs(loaded, [TOKENS] if text else [])
    return loaded.module.eval(), list(loaded.input_names), tuple(inputs)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:120]


def run_graphopt(family: str, formats: tuple[str, ...], folder: Path) -> Row:
    row = Row(family)
    start = time.perf_counter()
    try:
        model, names, inputs = _inputs(spec_of(family))
        ir = graphopt.GraphIR.trace(model, inputs, input_names=names, source=spec_of(family))
        row.capture = ir.capture
        for fmt in formats:
            out = folder / f"{family}.{fmt}"
            try:
                result = graphopt.optimize(ir, PIPELINE, output=out)
            except Exception as exc:
                row.formats[fmt] = _short(exc)
                continue
            row.formats[fmt] = "ok"
            first, pruned = result.ledger[0], result.ledger[1]
            row.macs = pruned.macs / max(first.macs, 1)
            row.params = pruned.params / max(first.params, 1)
            if fmt == "onnx":
                row.ort_rel_err = _onnxruntime_error(out, result.ir.gm, inputs)
    except Exception as exc:
        row.failure = _short(exc)
    row.seconds = time.perf_counter() - start
    return row


def _onnxruntime_error(path: Path, gm: nn.Module, inputs: tuple[Any, ...]) -> float:
    """Relative error of onnxruntime running ``path`` on ``inputs`` against ``gm``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}
    got = [torch.from_numpy(o) for o in session.run(None, feeds)]
    with torch.no_grad():
        want = graphopt.run_model(gm, inputs)
    return float(graphopt.deviation(got, want).rel_err)


# -- Torch-Pruning --------------------------------------------------------------------------

#: attribute names of the query/key/value projections in the families' attention modules
_QKV = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"))
_HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
_SIZE_ATTRS = ("attention_head_size", "head_dim", "dim_per_head")


def _attention(model: nn.Module) -> list[tuple[nn.Module, nn.Linear, nn.Linear, nn.Linear]]:
    found = []
    for m in model.modules():
        for names in _QKV:
            parts = [getattr(m, n, None) for n in names]
            if all(isinstance(p, nn.Linear) for p in parts):
                found.append((m, *parts))
    return found


def _head_counts(model: nn.Module) -> dict[nn.Module, int]:
    config: Any = getattr(model, "config", None)
    heads = next((getattr(config, a) for a in _HEAD_ATTRS if hasattr(config, a)), None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    counts: dict[nn.Module, int] = {}
    for _, q, k, v in _attention(model):
        if heads:
            counts[q] = heads
            counts[k] = counts[v] = kv
    return counts


def _task_heads(model: nn.Module) -> list[nn.Module]:
    """The output layers Torch-Pruning's examples leave alone."""
    found = []
    for name in ("classifier", "lm_head", "score", "qa_outputs"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            found.append(head)
    return found


def _update_heads(model: nn.Module, pruner: Any) -> None:
    """Write the pruned head counts and sizes back into the attention modules, as the
    Torch-Pruning examples do after pruning a transformer."""
    for m, q, k, _ in _attention(model):
        heads = pruner.num_heads.get(q)
        kv = pruner.num_heads.get(k)
        if not heads:
            continue
        for attr in _HEAD_ATTRS:
            if hasattr(m, attr):
                setattr(m, attr, heads)
        for attr in _SIZE_ATTRS:
            if hasattr(m, attr):
                setattr(m, attr, q.out_features // heads)
        if hasattr(m, "all_head_size"):
            m.all_head_size = q.out_features
        if kv and hasattr(m, "num_key_value_groups"):
            m.num_key_value_groups = heads // kv


class _TooLong(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _TooLong


def run_torch_pruning(family: str, row: Row, limit: float) -> None:
    """Prune with Torch-Pruning, giving up after ``limit`` seconds (its dependency search
    can run for tens of minutes on a two-layer Llama)."""
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        import torch_pruning as tp

        model, names, inputs = _inputs(spec_of(family))
        kwargs = dict(zip(names, inputs, strict=True))
        before = graphopt.GraphIR.trace(model, inputs, input_names=names).total_macs()
        pruner = tp.pruner.MetaPruner(
            model,
            kwargs,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=0.5,
            ignored_layers=_task_heads(model),
            num_heads=_head_counts(model),
            output_transform=lambda out: graphopt.primary_output(out).sum(),
        )
        pruner.step()
        _update_heads(model, pruner)
        with torch.no_grad():
            model(**kwargs)
        after = graphopt.GraphIR.trace(model, inputs, input_names=names).total_macs()
        row.tp_macs = after / max(before, 1)
    except _TooLong:
        row.tp_failure = f"gave up after {limit:.0f} s (still building its groups)"
    except Exception as exc:
        row.tp_failure = _short(exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    row.tp_seconds = time.perf_counter() - start


# -- table ------------------------------------------------------------------------------------


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(rows: list[Row], formats: tuple[str, ...]) -> Table:
    t = Table(title=f"Hugging Face families: graphopt {PIPELINE} vs Torch-Pruning 50%")
    for col in ("family", "capture", "MACs", "params", *(f".{f}" for f in formats)):
        t.add_column(col, justify="right" if col in ("MACs", "params") else "left")
    t.add_column("ORT rel err", justify="right")
    t.add_column("time", justify="right")
    t.add_column("TP MACs", justify="right")
    t.add_column("TP failure")
    t.add_column("TP time", justify="right")
    for r in rows:
        t.add_row(
            r.family,
            r.capture,
            _ratio(r.macs),
            _ratio(r.params),
            *(r.formats.get(f, r.failure or "-") for f in formats),
            "-" if r.ort_rel_err is None else f"{r.ort_rel_err:.1e}",
            f"{r.seconds:.1f}s",
            _ratio(r.tp_macs),
            r.tp_failure,
            f"{r.tp_seconds:.1f}s",
        )
    return t


def totals(rows: list[Row], formats: tuple[str, ...]) -> list[str]:
    n = len(rows)
    every = sum(all(r.formats.get(f) == "ok" for f in formats) for r in rows)
    reduced = sum(r.macs is not None and r.macs < 0.7 for r in rows)
    tp_ok = sum(r.tp_macs is not None for r in rows)
    tp_reduced = sum(r.tp_macs is not None and r.tp_macs < 0.7 for r in rows)
    lines = [f"graphopt: {every}/{n} families through {PIPELINE} to {', '.join(formats)}"]
    lines.append(f"graphopt: {reduced}/{n} with MACs ≤ 0.7 of the original")
    for f in formats:
        ok = sum(r.formats.get(f) == "ok" for r in rows)
        lines.append(f"graphopt: .{f} written and verified for {ok}/{n}")
    lines.append(f"Torch-Pruning: {tp_ok}/{n} pruned and ran, {tp_reduced}/{n} with MACs ≤ 0.7")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and print its table and totals."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--no-torch-pruning", action="store_true", help="graphopt only")
    parser.add_argument(
        "--tp-limit", type=float, default=300, help="seconds Torch-Pruning gets per model"
    )
    args = parser.parse_args(argv)
    formats = tuple(args.formats)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    console = Console(width=170)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            console.print(f"[dim]{family}…[/dim]")
            row = run_graphopt(family, formats, Path(tmp))
            if not args.no_torch_pruning:
                run_torch_pruning(family, row, args.tp_limit)
            rows.append(row)
            console.print(table([row], formats))
    console.print(table(rows, formats))
    for line in totals(rows, formats):
        console.print(line)


if __name__ == "__main__":
    main()
