"""Structural pruning: graphopt's ``prune`` against Torch-Pruning, in one run.

For each torchvision model (``weights=None``, eval mode), both tools prune the same fraction
of channels in every layer (uniform ratio, L1 magnitude, no channel rounding, classifier
output protected). Reported per model: whether each tool produced a working model (it runs
and keeps its output shape), the time to analyse and prune, the MACs and parameters kept
(counted the same way for both, with torch's FLOP counter on real tensors), and the eager
CPU latency of the pruned model as a ratio to the original (median of interleaved runs).

    pip install torch-pruning        # or: pip install -e '.[bench]'
    python benchmarks/prune.py --models resnet18,vit_b_16,swin_t --ratio 0.5

``--coverage --models all`` instead runs ``prune(target=RATIO)`` on every torchvision
classifier through ``graphopt.optimize`` and reports how close each gets to the MACs target.

``--fingerprint FILE`` instead records, per model, what ``prune(ratio=RATIO)`` and
``prune(target=RATIO,heads=true)`` produce (params, MACs, the report, the stats, every
parameter's shape, a hash of the weights and of the generated code, the output), and with
``--against OLD`` compares them with an earlier record, say one made before a refactor:

    git stash; python benchmarks/prune.py --fingerprint before.json; git stash pop
    python benchmarks/prune.py --fingerprint after.json --against before.json

graphopt's time is the trace plus the pass itself (the pass manager's ledger, probe runs and
checks are not included; ``--full`` adds a column with the whole ``graphopt.optimize`` call).
Torch-Pruning's time is building its dependency graph plus ``pruner.step()``. Each tool
prunes each model ``--runs`` times (a fresh copy each time) and the best time is kept.
Torch-Pruning is not run on the models in ``TP_SKIP`` (it did not finish, or ran out of
memory, here) unless ``--tp-all``. Timings on a shared machine are noisy: the latency
columns come from runs interleaved in one loop.
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import graphopt

DEFAULT_MODELS = (
    "resnet18,resnet50,resnext50_32x4d,wide_resnet50_2,mobilenet_v2,mobilenet_v3_large,"
    "mnasnet1_0,efficientnet_b0,efficientnet_v2_s,regnet_y_400mf,regnet_x_800mf,"
    "shufflenet_v2_x1_0,squeezenet1_1,densenet121,googlenet,inception_v3,alexnet,vgg16_bn,"
    "convnext_tiny,vit_b_16,swin_t,swin_v2_t,maxvit_t"
)
#: models whose Torch-Pruning run is skipped unless --tp-all, and why (measured here)
TP_SKIP = {
    "swin_t": "did not finish within 20 minutes",
    "swin_v2_t": "did not finish within 20 minutes",
    "maxvit_t": "stopped after 7 minutes at 15.7 GB of memory",
}
#: input side per model (ViTs are built for 64×64 with torchvision's ``image_size``)
SIZES = {"inception_v3": 96, "maxvit_t": 224}
BUILD_KWARGS: dict[str, dict[str, Any]] = {
    "vit_b_16": {"image_size": 64},
    "vit_b_32": {"image_size": 64},
    "vit_l_16": {"image_size": 64},
    "vit_l_32": {"image_size": 64},
    "inception_v3": {"aux_logits": False, "init_weights": False},
    "googlenet": {"aux_logits": False, "init_weights": False},
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, **BUILD_KWARGS.get(name, {})).eval()


def macs_and_params(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2, sum(p.numel() for p in model.parameters())


def classifier(model: nn.Module) -> nn.Module:
    """The last Linear or conv: the layer whose outputs are the class scores."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    return layers[-1]


def prune_graphopt(model: nn.Module, x: torch.Tensor, ratio: float) -> tuple[nn.Module, float]:
    start = time.perf_counter()
    ir = graphopt.trace(model, (x,))
    traced = time.perf_counter() - start
    result = graphopt.PassManager(f"prune(ratio={ratio},round_to=1)", reproducer=False).run(ir)
    return result.ir.gm, traced + result.ledger[-1].seconds


def prune_torch_pruning(model: nn.Module, x: torch.Tensor, ratio: float) -> tuple[nn.Module, float]:
    import torch_pruning as tp

    start = time.perf_counter()
    heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=[classifier(model)],
        num_heads=heads,
    )
    pruner.step()
    return model, time.perf_counter() - start


def latency(models: list[nn.Module], x: torch.Tensor, repeat: int) -> list[float]:
    """Median eager latency of each model, measured interleaved."""
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for m in models:
            m(x)  # warm-up
        for _ in range(repeat):
            for i, m in enumerate(models):
                start = time.perf_counter()
                m(x)
                times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def cells(
    m: nn.Module | None,
    seconds: float,
    base: tuple[torch.Tensor, int, int, float],
    lat_of: dict[int, float],
) -> tuple[str, str, str, str]:
    """Time, MACs %, params % and latency ratio of one pruned model (dashes if it failed)."""
    if m is None:
        return "-", "-", "-", "-"
    x, macs0, params0, lat0 = base
    macs, params = macs_and_params(m, x)
    return (
        f"{seconds:.2f}",
        f"{100 * macs / macs0:.1f}",
        f"{100 * params / params0:.1f}",
        f"{lat_of[id(m)] / lat0:.2f}",
    )


def attempt(
    fn: Callable[..., tuple[nn.Module, float]],
    name: str,
    x: torch.Tensor,
    ratio: float,
    runs: int = 1,
) -> tuple[nn.Module | None, float, str]:
    """Prune a fresh copy of ``name`` ``runs`` times; the pruned model of the last run and
    the best time (the least disturbed by other work on the machine, and by first calls)."""
    model = build(name)
    expected = model(x).shape
    try:
        best = float("inf")
        for _ in range(runs):
            pruned, seconds = fn(build(name), x, ratio)
            best = min(best, seconds)
        seconds = best
        with torch.no_grad():
            shape = pruned(x).shape
        if shape != expected:
            return None, seconds, f"output shape {tuple(shape)} != {tuple(expected)}"
        return pruned, seconds, ""
    except Exception as exc:  # a tool failing on a model is a result, not a crash
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, 0.0, f"{type(exc).__name__}: {line[:120]}"


def coverage(names: list[str], target: float, size: int) -> None:
    """One line per model: does ``prune(target=…)`` give a working model, and how close to
    the MACs target (as the pass manager's ledger counts them)."""
    print(f"{'model':20s} {'input':>5s} {'result':>6s} {'MACs %':>6s} {'params %':>8s} {'s':>6s}")
    within = 0
    for name in names:
        side = SIZES.get(name, size)
        x = torch.randn(1, 3, side, side)
        start = time.perf_counter()
        try:
            model = build(name)
            result = graphopt.optimize(model, f"prune(target={target})", example_inputs=(x,))
            with torch.no_grad():
                assert result.ir.gm(x).shape == model(x).shape, "output shape changed"
            first, last = result.ledger[0], result.ledger[-1]
            macs, params = 100 * last.macs / first.macs, 100 * last.params / first.params
            within += abs(macs - 100 * target) <= 5
            row = f"{'ok':>6s} {macs:6.1f} {params:8.1f}"
        except Exception as exc:  # reported, not raised: the table is the result
            row = f"{'FAIL':>6s} {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
        print(f"{name:20s} {side:5d} {row} {time.perf_counter() - start:6.1f}", flush=True)
    print(f"\n{within}/{len(names)} models within 5 points of {100 * target:.0f}% MACs")


def fingerprint(names: list[str], ratio: float, size: int) -> dict[str, dict[str, Any]]:
    """What prune produces on each model, in enough detail that any change shows."""
    import hashlib

    found = {}
    for name in names:
        torch.manual_seed(0)
        side = SIZES.get(name, size)
        x = torch.randn(1, 3, side, side)
        model = build(name)
        for pipeline in (f"prune(ratio={ratio})", f"prune(target={ratio},heads=true)"):
            result = graphopt.PassManager(pipeline, reproducer=False).run(
                graphopt.trace(model, (x,))
            )
            weights = hashlib.sha256()
            shapes = []
            for key, value in sorted(result.ir.gm.state_dict().items()):
                shapes.append([key, list(value.shape)])
                weights.update(key.encode() + value.detach().contiguous().numpy().tobytes())
            with torch.no_grad():
                out = float(result.ir.gm(x).double().sum())
            last = result.ledger[-1]
            found[f"{name} {pipeline}"] = {
                "params": last.params, "macs": last.macs, "notes": last.notes,
                "stats": last.stats, "shapes": shapes, "weights": weights.hexdigest(),
                "code": hashlib.sha256(result.ir.gm.code.encode()).hexdigest(), "output": out,
            }  # fmt: skip
        print(f"{name:20s} recorded", flush=True)
    return found


def compare(now: dict[str, dict[str, Any]], before: dict[str, dict[str, Any]]) -> int:
    """Print the runs that differ from ``before``; return how many."""
    differ = 0
    for run, fields in now.items():
        old = before.get(run)
        changed = [k for k in fields if old is None or old.get(k) != fields[k]]
        if changed:
            differ += 1
            print(f"{run}: differs in {', '.join(changed)}")
    print(f"{len(now) - differ}/{len(now)} runs identical to the earlier record")
    return differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=10, help="latency runs")
    parser.add_argument(
        "--runs", type=int, default=3, help="times each tool prunes each model (best is kept)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--full", action="store_true", help="also time graphopt.optimize")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks")
    parser.add_argument(
        "--tp-all", action="store_true", help=f"also run Torch-Pruning on {', '.join(TP_SKIP)}"
    )
    parser.add_argument(
        "--coverage",
        action="store_true",
        help="graphopt only: prune(target=RATIO) of the MACs through graphopt.optimize; "
        "'--models all' lists every torchvision classifier",
    )
    parser.add_argument("--fingerprint", metavar="FILE", help="record what prune produces")
    parser.add_argument("--against", metavar="OLD", help="with --fingerprint: compare with OLD")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.models == "all":
        args.models = ",".join(torchvision.models.list_models(module=torchvision.models))
    if args.coverage:
        coverage(args.models.split(","), args.ratio, args.size)
        return
    if args.fingerprint:
        import json
        import pathlib

        record = fingerprint(args.models.split(","), args.ratio, args.size)
        pathlib.Path(args.fingerprint).write_text(json.dumps(record, indent=1))
        if args.against:
            before = json.loads(pathlib.Path(args.against).read_text())
            raise SystemExit(1 if compare(record, before) else 0)
        return
    header = (
        f"{'model':20s} {'graphopt':>8s} {'TP':>8s} {'go s':>6s} {'TP s':>6s} {'speedup':>7s} "
        f"{'go MACs%':>8s} {'TP MACs%':>8s} {'go par%':>7s} {'TP par%':>7s} "
        f"{'go lat':>6s} {'TP lat':>6s}"
    )
    print(f"ratio={args.ratio}  threads={args.threads}  latency = pruned/original, eager CPU")
    print(header)
    go_ok = tp_ok = 0
    speedups = []
    failures = []
    for name in args.models.split(","):
        x = torch.randn(1, 3, SIZES.get(name, args.size), SIZES.get(name, args.size))
        original = build(name)
        macs0, params0 = macs_and_params(original, x)
        go, go_s, go_err = attempt(prune_graphopt, name, x, args.ratio, args.runs)
        if name in TP_SKIP and not args.tp_all:
            tp_model, tp_s, tp_err = None, 0.0, f"not run: {TP_SKIP[name]} (--tp-all runs it)"
        else:
            tp_model, tp_s, tp_err = attempt(prune_torch_pruning, name, x, args.ratio, args.runs)
        if args.verbose and (go_err or tp_err):
            traceback.print_exc()
        go_ok += go is not None
        tp_ok += tp_model is not None
        live = [m for m in (original, go, tp_model) if m is not None]
        lat = latency(live, x, args.repeat)
        lat_of = dict(zip(map(id, live), lat, strict=True))

        base = (x, macs0, params0, lat_of[id(original)])
        g = cells(go, go_s, base, lat_of)
        t = cells(tp_model, tp_s, base, lat_of)
        speed = "-"
        if go is not None and tp_model is not None:
            speedups.append(tp_s / go_s)
            speed = f"{tp_s / go_s:.1f}x"
        print(
            f"{name:20s} {'yes' if go is not None else 'no':>8s} "
            f"{'yes' if tp_model is not None else 'no':>8s} {g[0]:>6s} {t[0]:>6s} {speed:>7s} "
            f"{g[1]:>8s} {t[1]:>8s} {g[2]:>7s} {t[2]:>7s} {g[3]:>6s} {t[3]:>6s}",
            flush=True,
        )
        failures += [f"  graphopt on {name}: {go_err}"] if go_err else []
        failures += [f"  Torch-Pruning on {name}: {tp_err}"] if tp_err else []
        if args.full:
            start = time.perf_counter()
            graphopt.optimize(build(name), f"prune(ratio={args.ratio},round_to=1)",
                              example_inputs=(x,))  # fmt: skip
            print(f"{'':20s} graphopt.optimize (trace, pass, ledger, checks): "
                  f"{time.perf_counter() - start:.2f}s")  # fmt: skip
        del original, go, tp_model
    n = len(args.models.split(","))
    print(f"\npruned: graphopt {go_ok}/{n}, Torch-Pruning {tp_ok}/{n}")
    if speedups:
        print(
            f"time to analyse and prune, Torch-Pruning / graphopt: median "
            f"{statistics.median(speedups):.1f}x (min {min(speedups):.1f}x, "
            f"max {max(speedups):.1f}x) over {len(speedups)} models both pruned"
        )
    if failures:
        print("failures:")
        print("\n".join(failures))


if __name__ == "__main__":
    main()
