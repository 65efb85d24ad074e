"""The timm zoo through graphopt and Torch-Pruning, side by side, on a seeded random sample.

The population is every timm model whose default input (``pretrained_cfg.input_size``, read
without downloading anything) is at most ``--max-side`` pixels; ``--sample`` of them are
drawn with ``--seed``. For each model, in its own subprocess with a ``--timeout`` (a crash
or a hang is a result, not the end of the run):

* graphopt, as a user would: ``graphopt.load("timm:NAME")``, then ``prune(ratio=0.5)``,
  ``fold`` and ``quant`` one after the other through ``graphopt.optimize``. Recorded: the
  capture path (fx or export), the pruned MACs as a fraction of the original, whether fold
  and quant went through, the time, and the first sentence of any failure. For ``quant``
  (plain, so its default accuracy target acts), also: the output SQNR of the int8 model
  against the folded float one on 4 held-out random inputs, the SQNR its search reached
  on its calibration inputs (random too), how many ops it kept float and whether it
  warned about accuracy;
* Torch-Pruning, the usual way: ``MetaPruner`` (its ``DependencyGraph``) with L2 group
  magnitude importance, ``pruning_ratio=0.5`` of every layer's channels, the classifier
  ignored and timm attention's ``num_heads`` given (and ``head_dim`` updated after the
  step, as its timm example does). Recorded: whether the pruned model runs with the same
  output shape, its MACs fraction, the time, and the first line of any failure.

MACs of both pruned models are counted the same way (torch's FLOP counter, real tensors).
A model goes *through* when all three passes succeed and the pruned MACs are at most
``--macs-bound`` (0.7) of the original.

``--size S`` (default 64) runs each model at S×S pixels: built with ``img_size=S`` when its
constructor takes one (ViTs, Swin), else as is; a model that cannot run at S falls back to
its default size. Results are appended to a JSONL file (``--results``), one line per model,
and models already in it are skipped, so a run can be split and resumed:

    python benchmarks/zoo.py --limit 20                 # the first 20 of the sample
    python benchmarks/zoo.py --offset 20 --limit 20     # the next 20
    python benchmarks/zoo.py --report                   # the table and totals so far
    python benchmarks/zoo.py --part hf                  # Hugging Face families (zoo_hf.py)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import pathlib
import random
import subprocess
import sys
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "zoo-results.jsonl"


def population(max_side: int) -> list[str]:
    """Every timm model whose default input is at most ``max_side`` pixels, in timm's order."""
    import timm
    from timm.models import get_pretrained_cfg

    found = []
    for name in timm.list_models():
        cfg = get_pretrained_cfg(name)
        if cfg is not None and cfg.input_size and max(cfg.input_size[1:]) <= max_side:
            found.append(name)
    return found


def sample(seed: int, size: int, max_side: int) -> list[str]:
    """``size`` models of the population drawn with ``seed`` (in the drawn order)."""
    names = population(max_side)
    return random.Random(seed).sample(names, min(size, len(names)))


def first_sentence(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


# -- one model, in a worker process ------------------------------------------------------------


def macs_of(model: Any, x: Any) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    # Parameters stop requiring grad while counting: a view of a parameter made under no_grad
    # (SigLIP's attention-pool latent, ``latent.expand(B, -1, -1)``) requires grad without a
    # grad_fn, and the counter's module tracker fails on it ("Expected gradient function to
    # be set") before a single op is counted.
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for p in params:
            p.requires_grad_(True)
    return int(counter.get_total_flops() // 2)


def build(name: str, size: int | None) -> tuple[Any, Any, str, int]:
    """The model in eval mode, an input, its spec options and the side it runs at: ``size``
    if the model runs there (built with ``img_size`` when it takes one), else its default."""
    import timm
    import torch

    def attempt(options: dict[str, Any], side: int) -> tuple[Any, Any]:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **options).eval()
        x = torch.randn(1, 3, side, side)
        with torch.no_grad():
            model(x)
        return model, x

    default = timm.models.get_pretrained_cfg(name).input_size[1]
    if size is not None and size != default:
        for options in ({"img_size": size}, {}):
            with contextlib.suppress(Exception):
                model, x = attempt(options, size)
                query = "&".join(f"{k}={v}" for k, v in options.items())
                return model, x, query, size
    model, x = attempt({}, default)
    return model, x, "", default


def run_graphopt(name: str, query: str, x: Any, ratio: float) -> dict[str, Any]:
    import torch

    import graphopt

    spec = f"timm:{name}" + (f"?{query}" if query else "")
    row: dict[str, Any] = {"capture": None, "macs": None, "prune": False, "fold": False,
                           "quant": False, "error": ""}  # fmt: skip
    start = time.perf_counter()
    try:
        ir = graphopt.load(spec, input_shapes=[tuple(x.shape)])
        row["capture"] = ir.capture
        before = macs_of(ir.gm, x)
        for step in (f"prune(ratio={ratio})", "fold", "quant"):
            key = step.partition("(")[0]
            folded = ir.gm
            result = graphopt.optimize(ir, step)
            ir = result.ir
            row[key] = True
            if key == "prune":
                row["macs"] = macs_of(ir.gm, x) / before
        with torch.no_grad():
            ir.gm(x)
        row.update(quant_accuracy(folded, ir.gm, x, result.ledger[-1]))
    except Exception as exc:  # a failure is a result
        row["error"] = first_sentence(exc)
    row["seconds"] = time.perf_counter() - start
    return row


def quant_accuracy(folded: Any, quantized: Any, x: Any, entry: Any) -> dict[str, Any]:
    """The int8 model's output SQNR against the float one it came from, on 4 random inputs
    shaped like ``x`` that calibration never saw, and what quant's ledger row says."""
    import torch
    from graphopt.passes.quant.search import output_noise, to_db

    gen = torch.Generator().manual_seed(99)
    signal = noise = 0.0
    with torch.no_grad():
        for _ in range(4):
            held = torch.randn(x.shape, generator=gen)
            s, n = output_noise(folded(held), quantized(held))
            signal, noise = signal + s, noise + n
    return {
        "sqnr": to_db(signal, noise),
        "search_sqnr": entry.stats.get("output SQNR dB"),
        "floats": int(entry.stats.get("ops kept float (target)", 0)),
        # the accuracy warnings (not the one about calibrating on random inputs)
        "warned": any(
            note.startswith("WARNING") and ("SQNR" in note or "target" in note)
            for note in entry.notes
        ),
    }


def run_torch_pruning(model: Any, x: Any, ratio: float) -> dict[str, Any]:
    import torch
    import torch_pruning as tp
    from torch import nn

    row: dict[str, Any] = {"ok": False, "macs": None, "error": ""}
    start = time.perf_counter()
    try:
        before = macs_of(model, x)
        with torch.no_grad():
            expected = model(x).shape
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        ignored = [head] if isinstance(head, nn.Module) and list(head.parameters()) else []
        num_heads = {
            m.qkv: m.num_heads
            for m in model.modules()
            if isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "num_heads")
        }
        pruner = tp.pruner.MetaPruner(
            model,
            x,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=ignored,
            num_heads=num_heads,
        )
        pruner.step()
        for m in model.modules():  # timm attention reads head_dim in forward
            qkv = getattr(m, "qkv", None)
            if isinstance(qkv, nn.Linear) and hasattr(m, "num_heads") and hasattr(m, "head_dim"):
                m.head_dim = qkv.out_features // (3 * m.num_heads)
        with torch.no_grad():
            shape = model(x).shape
        if shape != expected:
            raise RuntimeError(f"output shape {tuple(shape)} != {tuple(expected)}")
        row["macs"] = macs_of(model, x) / before
        row["ok"] = True
    except Exception as exc:  # a failure is a result
        row["error"] = first_sentence(exc)
    row["seconds"] = time.perf_counter() - start
    return row


def one(name: str, size: int | None, ratio: float, tool: str) -> dict[str, Any]:
    """What ``tool`` (graphopt, tp or both) measures on one model, in the worker process."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    model, x, query, side = build(name, size)
    record: dict[str, Any] = {"model": name, "side": side,
                              "params": sum(p.numel() for p in model.parameters())}  # fmt: skip
    if tool in ("graphopt", "both"):
        record["graphopt"] = run_graphopt(name, query, x, ratio)
    if tool in ("tp", "both"):
        record["tp"] = run_torch_pruning(copy.deepcopy(model), x, ratio)
    return record


# -- the run -----------------------------------------------------------------------------------


def in_worker(name: str, tool: str, timeout: float, args: argparse.Namespace) -> dict[str, Any]:
    """One tool on one model in a subprocess; a crash or a timeout is recorded as its
    error."""
    command = [sys.executable, __file__, "--one", name, "--tool", tool]
    command += ["--ratio", str(args.ratio), "--size", str(args.size)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines:
            return json.loads(lines[-1])
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        failed = f"worker exited with status {done.returncode}: {tail[:300]}"
    except subprocess.TimeoutExpired:
        failed = f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - start
    return {"model": name, tool: {"error": failed, "seconds": seconds}}


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """graphopt, then Torch-Pruning, each in its own worker with its own time limit."""
    record = in_worker(name, "graphopt", args.timeout, args)
    if args.tp:
        tp = in_worker(name, "tp", args.tp_timeout, args)
        record["tp"] = tp["tp"]
        record.setdefault("side", tp.get("side"))
        record.setdefault("params", tp.get("params"))
    return record


def through(record: dict[str, Any], bound: float) -> bool:
    g = record["graphopt"]
    return bool(g.get("quant")) and g.get("macs") is not None and g["macs"] <= bound


def tp_through(record: dict[str, Any], bound: float) -> bool:
    t = record.get("tp") or {}
    return bool(t.get("ok")) and t.get("macs") is not None and t["macs"] <= bound


def read_results(path: pathlib.Path) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                found[record["model"]] = record
    return found


def table(records: list[dict[str, Any]], bound: float) -> Any:
    from rich.table import Table

    out = Table(title=f"timm zoo: prune,fold,quant; through = all three and MACs ≤ {bound}")
    for column in ("model", "px", "capture", "MACs", "fold", "quant", "int8 dB", "float",
                   "s", "through", "TP", "TP MACs", "TP s", "reason"):  # fmt: skip
        out.add_column(column, overflow="fold")

    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.2f}"

    for r in records:
        g, t = r["graphopt"], r.get("tp") or {}
        reasons = [f"graphopt: {g['error']}"] if g.get("error") else []
        if r["graphopt"].get("macs") is not None and g["macs"] > bound:
            reasons.append(f"graphopt: pruned MACs {g['macs']:.2f} > {bound}")
        reasons += [f"TP: {t['error']}"] if t.get("error") else []
        out.add_row(
            r["model"], str(r.get("side", "")), str(g.get("capture") or "-"), fmt(g.get("macs")),
            "ok" if g.get("fold") else "-", "ok" if g.get("quant") else "-",
            fmt(g.get("sqnr")) + (" (warned)" if g.get("warned") else ""),
            str(g.get("floats", "-")), f"{g.get('seconds', 0):.0f}",
            "yes" if through(r, bound) else "NO",
            "ok" if t.get("ok") else ("-" if not t else "fail"), fmt(t.get("macs")),
            f"{t['seconds']:.0f}" if "seconds" in t else "-", "; ".join(reasons),
        )  # fmt: skip
    return out


def _sqnr_detail(rows: list[dict[str, Any]]) -> str:
    # no output noise at all (inf): e.g. an all-zero output from a zero-initialised head
    measured = sorted(x["sqnr"] for x in rows if x.get("sqnr") not in (None, math.inf))
    if not measured:
        return ""
    median = measured[len(measured) // 2]
    kept = sum(bool(x.get("floats")) for x in rows)
    zeros = sum(x.get("sqnr") == math.inf for x in rows)
    return (f"{len(measured)} measured: median {median:.1f} dB, lowest {measured[0]:.1f}; "
            f"{kept} kept ops float; {zeros} without output noise (inf)")  # fmt: skip


def totals(records: list[dict[str, Any]], bound: float) -> Any:
    from rich.table import Table

    n = len(records)
    g = [r["graphopt"] for r in records]
    rows = [
        ("models", n, None),
        ("captured (fx / export)",
         sum(x.get("capture") is not None for x in g),
         f"{sum(x.get('capture') == 'fx' for x in g)} / "
         f"{sum(x.get('capture') == 'export' for x in g)}"),
        ("pruned (ratio=0.5)", sum(bool(x.get("prune")) for x in g), None),
        (f"pruned MACs ≤ {bound}", sum((x.get("macs") or 9) <= bound for x in g), None),
        ("fold ok", sum(bool(x.get("fold")) for x in g), None),
        ("quant ok", sum(bool(x.get("quant")) for x in g), None),
        ("quant: held-out SQNR ≥ 20 dB, or a warning", sum(
            x.get("sqnr") is not None and (x["sqnr"] >= 20 or bool(x.get("warned")))
            for x in g), _sqnr_detail(g)),
        (f"graphopt through all three, MACs ≤ {bound}", sum(through(r, bound) for r in records),
         None),
        ("Torch-Pruning: pruned model runs", sum(bool((r.get("tp") or {}).get("ok"))
                                                 for r in records), None),
        (f"Torch-Pruning: runs, MACs ≤ {bound}", sum(tp_through(r, bound) for r in records), None),
    ]  # fmt: skip
    out = Table(title="totals")
    out.add_column("")
    out.add_column("count", justify="right")
    out.add_column("%", justify="right")
    out.add_column("detail")
    for label, count, detail in rows:
        out.add_row(label, str(count), f"{100 * count / max(n, 1):.1f}", detail or "")
    return out


def run_hf(argv: list[str]) -> None:
    path = HERE / "zoo_hf.py"
    if not path.exists():
        raise SystemExit(f"{path} does not exist; the Hugging Face part is not available")
    spec = importlib.util.spec_from_file_location("zoo_hf", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("timm", "hf"), default="timm")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--sample", type=int, default=100, help="models drawn (default 100)")
    parser.add_argument("--max-side", type=int, default=256)
    parser.add_argument("--offset", type=int, default=0, help="skip this many of the sample")
    parser.add_argument("--limit", type=int, default=None, help="run at most this many")
    parser.add_argument("--models", default=None, help="comma-separated names instead")
    parser.add_argument("--size", type=int, default=64, help="input side (0: default)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--macs-bound", type=float, default=0.7)
    parser.add_argument("--timeout", type=float, default=600, help="graphopt seconds per model")
    parser.add_argument("--tp-timeout", type=float, default=300, help="Torch-Pruning seconds")
    parser.add_argument("--results", type=pathlib.Path, default=DEFAULT_RESULTS)
    parser.add_argument("--redo", action="store_true", help="rerun models already recorded")
    parser.add_argument("--no-tp", dest="tp", action="store_false", help="skip Torch-Pruning")
    parser.add_argument("--report", action="store_true", help="only print what is recorded")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--tool", default="both", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.part == "hf":
        run_hf(rest)
        return
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    if args.one:
        print(json.dumps(one(args.one, args.size or None, args.ratio, args.tool)))
        return

    from rich.console import Console

    console = Console(width=max(Console().width, 180))
    names = args.models.split(",") if args.models else sample(args.seed, args.sample, args.max_side)
    chosen = names[args.offset :][: args.limit]
    done = read_results(args.results)
    if not args.report:
        for i, name in enumerate(chosen, 1):
            if name in done and not args.redo:
                continue
            record = measure(name, args)
            done[name] = record
            with args.results.open("a") as f:
                f.write(json.dumps(record) + "\n")
            g = record["graphopt"]
            console.print(
                f"[{i}/{len(chosen)}] {name}: "
                + ("through" if through(record, args.macs_bound) else "NOT through")
                + f" (MACs {g.get('macs')}, {g.get('error') or 'ok'}; "
                f"TP {(record.get('tp') or {}).get('ok')})",
                highlight=False,
            )
    records = [done[n] for n in names if n in done]
    console.print(table(records, args.macs_bound))
    console.print(totals(records, args.macs_bound))
    console.print(f"sample: seed {args.seed}, {len(names)} of the {args.max_side} px population; "
                  f"input side {args.size or 'default'}; results in {args.results}")  # fmt: skip


if __name__ == "__main__":
    main()
