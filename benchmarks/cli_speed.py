"""Whole-process time: ``graphopt optimize`` against a plain Torch-Pruning script, in one run.

Both prune torchvision's resnet50 (``weights=None``) by half of its channels (L1 magnitude,
the classifier kept) and write the model to a ``.pt`` file; each is timed as a whole process
(wall clock from spawn to exit), the two interleaved ``--runs`` times so that the load of
a shared machine falls on both alike. Printed: every time, the medians and their ratio.

    pip install torch-pruning==1.6.1        # or: pip install -e '.[bench]'
    python benchmarks/cli_speed.py --runs 5

``--breakdown N`` then runs graphopt's CLI ``N`` more times in a child process that
attributes its wall time to phases (imports, plugin discovery, model build, tracing, shape
analysis, IR copies, ledger runs, the pass, writing, the artifact check, CLI output,
interpreter start and exit) and prints the median of each. The child calls the function
the ``graphopt`` console script calls; it only wraps functions to time them, each
phase exclusive of the phases nested in it (a function's own imports count as imports).

``--model torchvision:resnet18`` and ``--ratio`` change the workload (the Torch-Pruning
script builds the same torchvision model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

#: the peer: Torch-Pruning's MetaPruner, as its README shows it, saving with torch.save
TP_SCRIPT = """
import sys
import torch
import torch_pruning as tp
import torchvision

name, ratio, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
model = getattr(torchvision.models, name)(weights=None).eval()
example = torch.randn(1, 3, 224, 224)
importance = tp.importance.MagnitudeImportance(p=1)
pruner = tp.pruner.MetaPruner(
    model, example, importance=importance, pruning_ratio=ratio, ignored_layers=[model.fc]
)
pruner.step()
torch.save(model, out)
"""

#: the child of --breakdown: graphopt's CLI with its phases timed (see the module docstring)
CHILD = r"""
import json, os, sys, time
stamps = {"start": time.time(), "cpu_start": time.process_time()}
import functools, importlib._bootstrap as bootstrap

totals, cpu = {}, {}
clock = lambda: (time.perf_counter(), time.process_time())
stack = [["startup", clock()]]  # the phase running now is stack[-1]

def add(name, since, now):
    totals[name] = totals.get(name, 0.0) + now[0] - since[0]
    cpu[name] = cpu.get(name, 0.0) + now[1] - since[1]

def enter(name):
    now = clock()
    add(stack[-1][0], stack[-1][1], now)
    stack.append([name, now])

def leave():
    now = clock()
    name, since = stack.pop()
    add(name, since, now)
    stack[-1][1] = now

def timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        enter(name)
        try:
            return fn(*args, **kwargs)
        finally:
            leave()
    return wrapper

# every import, wherever it happens, is its own phase (the import system looks this up anew)
_find_and_load = bootstrap._find_and_load
def find_and_load(name, import_):
    if stack[-1][0] == "imports":
        return _find_and_load(name, import_)
    enter("imports")
    try:
        return _find_and_load(name, import_)
    finally:
        leave()
bootstrap._find_and_load = find_and_load

stack[0] = ["CLI and the rest", clock()]
import graphopt.cli, graphopt.capture, graphopt.ir, graphopt.loading, graphopt.lowering
import graphopt.manager, graphopt.plugins, graphopt.sources
from graphopt.pass_api import Pass

P = graphopt
P.plugins.load_registry = timed("plugin discovery", P.plugins.load_registry)
P.sources.load_zoo = timed("model build", P.sources.load_zoo)
P.capture.capture = timed("tracing", P.capture.capture)
P.ir.propagate_shapes = timed("shape analysis", P.ir.propagate_shapes)
P.ir.GraphIR.copy = timed("IR copies", P.ir.GraphIR.copy)
P.manager.run_model = timed("ledger model runs", P.manager.run_model)
if hasattr(P.ir, "run_model"):  # the outputs analysis runs the model for the ledger
    P.ir.run_model = timed("ledger model runs", P.ir.run_model)
P.lowering.run_model = timed("artifact check: model runs", P.lowering.run_model)
P.lowering.verify = timed("artifact check: reload", P.lowering.verify)
P.lowering.lower = timed("writing", P.lowering.lower)

_init_subclass = Pass.__dict__.get("__init_subclass__")
def wrap_passes(registry):
    for cls in registry.passes.values():
        if "run" in cls.__dict__ and not getattr(cls.run, "_timed", False):
            cls.run = timed("the pass itself", cls.run)
            cls.run._timed = True
    return registry
_get_registry = P.plugins.get_registry
P.plugins.get_registry = lambda *a, **k: wrap_passes(_get_registry(*a, **k))
P.cli.get_registry = P.plugins.get_registry

def report():
    add(*stack[0], clock())
    stamps["end"], stamps["cpu_end"] = time.time(), time.process_time()
    with open(os.environ["CLI_SPEED_OUT"], "w") as f:
        json.dump({"totals": totals, "cpu": cpu, "stamps": stamps}, f)

import atexit
from importlib.metadata import entry_points
atexit.register(report)
sys.argv = ["graphopt", *sys.argv[1:]]
(script,) = entry_points(group="console_scripts", name="graphopt")
sys.exit(script.load()())  # what the console script calls
"""

PHASES = (
    "interpreter start",
    "imports",
    "plugin discovery",
    "model build",
    "tracing",
    "shape analysis",
    "IR copies",
    "ledger model runs",
    "the pass itself",
    "writing",
    "artifact check: reload",
    "artifact check: model runs",
    "CLI and the rest",
    "interpreter exit",
)


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """Run ``cmd`` to its end; return its wall time, the time it was spawned and the CPU
    time (user + system) it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    spawned = time.time()
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{cmd[:3]} failed:\n{done.stderr.decode()[-2000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return seconds, spawned, cpu


def graphopt_cmd(args: argparse.Namespace, out: str) -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "graphopt")
    return [exe, "optimize", args.model, "--passes", f"prune(ratio={args.ratio})", "-o", out]


def compare(args: argparse.Namespace, folder: str) -> None:
    name = args.model.split(":", 1)[1]
    script = os.path.join(folder, "tp_script.py")
    with open(script, "w") as f:
        f.write(TP_SCRIPT)
    tp_cmd = [sys.executable, script, name, str(args.ratio), os.path.join(folder, "tp.pt")]
    go_cmd = graphopt_cmd(args, os.path.join(folder, "graphopt.pt"))
    times: dict[str, list[float]] = {"torch-pruning": [], "graphopt": []}
    cpu: dict[str, list[float]] = {"torch-pruning": [], "graphopt": []}
    for i in range(args.runs):
        order = [("torch-pruning", tp_cmd), ("graphopt", go_cmd)]
        if i % 2:  # alternate which goes first
            order.reverse()
        for label, cmd in order:
            wall, _, used = run(cmd)
            times[label].append(wall)
            cpu[label].append(used)
            print(f"run {i + 1}: {label:14s} {wall:6.2f} s  (CPU {used:6.2f} s)", flush=True)
    tp, go = (statistics.median(times[k]) for k in ("torch-pruning", "graphopt"))
    tp_cpu, go_cpu = (statistics.median(cpu[k]) for k in ("torch-pruning", "graphopt"))
    print(f"median wall torch-pruning: {tp:.2f} s  graphopt: {go:.2f} s  ratio: {go / tp:.3f}")
    print(f"median CPU  torch-pruning: {tp_cpu:.2f} s  graphopt: {go_cpu:.2f} s  "
          f"ratio: {go_cpu / tp_cpu:.3f}")  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def breakdown(args: argparse.Namespace, folder: str) -> None:
    child = os.path.join(folder, "child.py")
    with open(child, "w") as f:
        f.write(CHILD)
    report = os.path.join(folder, "phases.json")
    rows: dict[str, list[float]] = {p: [] for p in PHASES}
    cpu_rows: dict[str, list[float]] = {p: [] for p in PHASES}
    walls, cpus = [], []
    for _ in range(args.breakdown):
        cmd = [sys.executable, child, *graphopt_cmd(args, os.path.join(folder, "b.pt"))[1:]]
        wall, spawned, used = run(cmd, {**os.environ, "CLI_SPEED_OUT": report})
        walls.append(wall)
        cpus.append(used)
        with open(report) as f:
            data = json.load(f)
        totals, cpu = data["totals"], data["cpu"]
        totals["interpreter start"] = data["stamps"]["start"] - spawned
        totals["interpreter exit"] = spawned + wall - data["stamps"]["end"]
        cpu["interpreter start"] = data["stamps"]["cpu_start"]
        cpu["interpreter exit"] = used - data["stamps"]["cpu_end"]
        for phase in PHASES:
            rows[phase].append(totals.pop(phase, 0.0))
            cpu_rows[phase].append(cpu.pop(phase, 0.0))
        if totals:
            sys.exit(f"unexpected phases {sorted(totals)}")
    print(f"\ngraphopt's phases, median of {args.breakdown} runs (seconds):")
    print(f"  {'phase':28s} {'wall':>6s} {'CPU':>6s}")
    for phase in PHASES:
        wall, used = statistics.median(rows[phase]), statistics.median(cpu_rows[phase])
        print(f"  {phase:28s} {wall:6.2f} {used:6.2f}")
    print(f"  {'whole process':28s} {statistics.median(walls):6.2f} {statistics.median(cpus):6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs of each")
    parser.add_argument("--breakdown", type=int, default=0, help="timed runs of graphopt")
    parser.add_argument("--model", default="torchvision:resnet50")
    parser.add_argument("--ratio", type=float, default=0.5)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    with tempfile.TemporaryDirectory() as folder:
        if args.runs:
            compare(args, folder)
        if args.breakdown:
            breakdown(args, folder)


if __name__ == "__main__":
    main()
