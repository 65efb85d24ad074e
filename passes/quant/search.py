"""The accuracy target: which ops to keep in float so that the int8 model stays accurate.

The search runs on a *simulation* of the int8 model: the float graph, with each chosen site's
inputs, weights and output rounded to the int8 grid it will have (the values the int8
kernels compute, up to the rounding of their accumulators), so any set of sites can be tried
without rebuilding the model. It proceeds in three steps:

1. The all-int8 model is measured; if it meets the target, nothing stays float.
2. Each site's *impact* is measured: the output noise when that site alone runs in int8
   (one pass over the graph per site, each starting where the site is, from the float
   values computed up to there; on two samples, a ranking needs less precision than a
   verdict). Sites are ranked by impact per unit of *cost*, what keeping the site float
   costs (its multiply-accumulates plus its output's elements, see
   :func:`~.target.site_costs`): the order in which a knapsack's greedy fills the float
   budget, so a large layer such as a language model's head stays float only when several
   cheaper ops cannot take its place.
3. The shortest prefix of that ranking kept in float that meets the target is found by
   doubling its length ``k`` and then bisecting (about ``2·log2(k)`` evaluations); each of
   those sites is then tried in int8 again, costliest first, and stays int8 if the target
   still holds, so that no site stays float needlessly.

Output noise adds up, roughly, over sites (each rounds independently), which is why the
ranking by impact is a good order; the bisection checks the real combined effect.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from .convert import QParams
from .observers import activation_qparams, fake_quantize, quantize_weight, weight_qparams
from .plan import Plan, Site, tensor_inputs

__all__ = [
    "Evaluation",
    "Rounding",
    "Simulator",
    "choose_floats",
    "float_order",
    "impacts",
    "output_noise",
]


@dataclass(frozen=True)
class Rounding:
    """How a mode rounds: activations entering a site, weights, and outputs.

    ``inputs``: ``static`` (calibrated per-tensor qparams), ``dynamic`` (per-tensor range of
    each tensor, as fbgemm's dynamic kernels), ``per_row`` (symmetric per row, the aten
    dynamic form), ``bf16`` (weight-only kernels take bfloat16) . ``bits`` and
    ``group_size``: int8 per output channel, or int4 per group of inputs; ``pair_max``: the
    bound on adjacent int8 codes' summed magnitude (see :func:`~.observers.weight_qparams`),
    or None."""

    inputs: str = "static"
    qrange: tuple[int, int] = (0, 127)
    per_channel: bool = True
    bits: int = 8
    group_size: int = 0
    pair_max: int | None = None


def dequantized_weight(w: torch.Tensor, rounding: Rounding) -> torch.Tensor:
    """The weight as the int8 (or int4) kernels will see it."""
    w = w.detach().float()
    n, k = w.shape[0], w.shape[-1]
    if rounding.bits == 4 and n % 16 == 0 and k % rounding.group_size == 0:
        from .linear import int4_codes  # (layers the int4 kernel cannot take get int8)

        codes, scale, zero = int4_codes(w, rounding.group_size)
        groups = codes.float().reshape(n, k // rounding.group_size, rounding.group_size)
        return ((groups - 8) * scale.float()[..., None] + zero.float()[..., None]).reshape(n, k)
    scales = weight_qparams(w, per_channel=rounding.per_channel, pair_max=rounding.pair_max)
    codes = quantize_weight(w, scales)
    shape = (-1,) + (1,) * (w.dim() - 1)
    return codes.float() * (scales.reshape(shape) if scales.numel() > 1 else scales)


class Simulator(fx.Interpreter):
    """Runs the float graph with the ``enabled`` sites rounded as their int8 kernels round."""

    def __init__(
        self,
        gm: fx.GraphModule,
        plan: Plan,
        qparams: dict[fx.Node, QParams],
        rounding: Rounding,
        weights: dict[fx.Node, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.plan, self.qparams, self.rounding = plan, qparams, rounding
        self.enabled: frozenset[fx.Node] = frozenset()
        static = rounding.inputs == "static"
        self.observe_of = {s.observe: s.node for s in plan.sites.values()} if static else {}
        self.weights = weights if weights is not None else {}
        for node, site in plan.sites.items():
            if site.kind == "layer" and node not in self.weights:
                layer = self.fetch_attr(str(node.target))
                self.weights[node] = dequantized_weight(layer.weight, rounding)

    def _fq(self, node: fx.Node, value: torch.Tensor) -> torch.Tensor:
        """``value`` (of ``node``) rounded as it enters an int8 kernel."""
        mode, (qmin, qmax) = self.rounding.inputs, self.rounding.qrange
        if mode == "static":
            qp = self.qparams[node]
            return fake_quantize(value, qp.scale, qp.zero_point, qmin, qmax)
        if mode == "dynamic":
            scale, zp = activation_qparams(
                float(value.min()), float(value.max()), symmetric=False, qmin=qmin, qmax=qmax
            )
            return fake_quantize(value, scale, zp, qmin, qmax)
        if mode == "per_row":
            row = value.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(value.dtype).tiny)
            return torch.round(value / (row / 127)) * (row / 127)
        return value.bfloat16().float()

    def run_node(self, n: fx.Node) -> Any:
        site = self.plan.sites.get(n)
        if site is not None and n in self.enabled:
            result = self._run_site(n, site)
        else:
            result = super().run_node(n)
        owner = self.observe_of.get(n)
        if owner is not None and owner in self.enabled and isinstance(result, torch.Tensor):
            result = self._fq(n, result)
        return result

    def _run_site(self, n: fx.Node, site: Site) -> Any:
        quantized = {a: self._fq(a, self.env[a]) for a in tensor_inputs(n, site.kind)}
        if site.kind == "layer":
            layer: Any = self.fetch_attr(str(n.target))
            x = quantized[n.args[0]]  # type: ignore[index]
            if isinstance(layer, nn.Linear):
                y = F.linear(x, self.weights[n], layer.bias)
                return y.bfloat16().float() if self.rounding.inputs == "bf16" else y
            return layer._conv_forward(x, self.weights[n], layer.bias)
        args = fx.node.map_arg(n.args, lambda a: quantized.get(a, self.env[a]))
        kwargs = fx.node.map_arg(n.kwargs, lambda a: quantized.get(a, self.env[a]))
        return getattr(self, n.op)(n.target, args, kwargs)

    def run_with(self, enabled: Iterable[fx.Node], inputs: tuple[Any, ...]) -> Any:
        """The model's output with ``enabled`` sites in int8 (eval, no grad)."""
        self.enabled = frozenset(enabled)
        with torch.no_grad():
            return self.run(*inputs)


def tensor_leaves(out: Any) -> list[torch.Tensor]:
    """The tensors of an output, detached, in double precision (SQNR sums stay exact)."""
    return [t.detach().double() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def output_noise(ref: Any, out: Any) -> tuple[float, float]:
    """Signal power ``Σx²`` and noise power ``Σ(x−x̂)²`` over every output tensor."""
    a, b = tensor_leaves(ref), tensor_leaves(out)
    signal = sum(float(x.pow(2).sum()) for x in a)
    noise = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b, strict=True))
    return signal, noise


def to_db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def impacts(
    sim: Simulator, sites: list[fx.Node], batches: list[tuple[Any, ...]], refs: list[Any]
) -> dict[fx.Node, float]:
    """Output noise power of each site alone in int8, summed over ``batches``.

    One float pass walks the graph; at each site a second pass starts from the float values
    live there, with that site enabled, and runs to the output (so each site costs the part
    of the graph after it, not a whole pass)."""
    wanted = set(sites)
    noise = dict.fromkeys(sites, 0.0)
    nodes = list(sim.graph.nodes)
    mutated = _mutated(sim.module)  # type: ignore[arg-type]
    for inputs, ref in zip(batches, refs, strict=True):
        walker = Simulator(sim.module, sim.plan, sim.qparams, sim.rounding, sim.weights)  # type: ignore[arg-type]
        walker.env, walker.args_iter = {}, iter(inputs)
        with torch.no_grad():
            for i, node in enumerate(nodes):
                if node in wanted:
                    start = {n: walker.env.get(n) for n in nodes[:i]}
                    for n in mutated & start.keys():  # an in-place op later must not
                        value = start[n]  # touch the walker's value
                        if isinstance(value, torch.Tensor):
                            start[n] = value.clone()
                    sim.enabled = frozenset([node])
                    out = sim.run(*inputs, initial_env=start)
                    noise[node] += output_noise(ref, out)[1]
                walker.env[node] = walker.run_node(node)
                for dead in walker.user_to_last_uses.get(node, []):
                    del walker.env[dead]
    return noise


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _mutated(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value a later in-place op overwrites (``relu_``, ``+=``, inplace=True)."""
    found = set()
    for node in gm.graph.nodes:
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node):
            continue
        if node.op == "call_module":
            inplace = bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
        elif node.op == "call_method":
            inplace = str(node.target).endswith("_")
        elif node.op == "call_function":
            name = getattr(node.target, "__name__", "")
            inplace = node.target in _INPLACE_OPERATORS or (
                name.endswith("_") and not name.startswith("_")
            )
        else:
            inplace = False
        if inplace or node.kwargs.get("inplace") is True:
            found.add(first)
    return found


@dataclass
class Evaluation:
    """One tried set of float sites, its figures (``sqnr_db``, ``score``) and verdict."""

    floats: tuple[fx.Node, ...]
    figures: dict[str, float]
    met: bool


def float_order(noise: dict[Any, float], cost: dict[Any, float]) -> list[Any]:
    """Sites in the order to keep them float: the most output noise removed per unit of
    cost first (the greedy order for a knapsack; ties keep ``noise``'s order)."""
    return sorted(noise, key=lambda n: -noise[n] / max(cost[n], 1e-30))


def choose_floats(
    ranking: Callable[[], list[fx.Node]],
    evaluate: Callable[[tuple[fx.Node, ...]], Evaluation],
    guess: Callable[[list[fx.Node]], int] | None = None,
    cost: Callable[[fx.Node], float] | None = None,
) -> tuple[Evaluation, list[Evaluation]]:
    """The shortest prefix of ``ranking()`` (best to keep float first) to keep float so that
    the target holds, then each of its sites tried back in int8.

    ``ranking`` is only called when the all-int8 model misses the target. ``guess(order)``,
    if given, is a first estimate of how many to keep float; the search checks it and its
    neighbour below, and gallops up or bisects down from there. The sites are tried back in
    int8 costliest first by ``cost`` (in reverse ranking order without it). Returns the
    chosen evaluation and every evaluation made, the all-int8 one first."""
    tried: list[Evaluation] = []

    def check(floats: tuple[fx.Node, ...]) -> Evaluation:
        tried.append(evaluate(floats))
        return tried[-1]

    best = check(())
    if best.met:
        return best, tried
    order = ranking()
    if not order:
        return best, tried
    n = len(order)
    k = min(max(guess(order) if guess else 1, 1), n)
    lo, hi = 0, 0  # lo: a count known to fall short; hi: one known to meet
    while not hi:
        trial = check(tuple(order[:k]))
        if trial.met:
            best, hi = trial, k
        elif k == n:
            return trial, tried  # even all float misses (a metric that is noise)
        else:
            lo, k = k, min(2 * k, n)
    if hi - 1 > lo:  # the guess met: is one fewer enough? (usually not: then done)
        trial = check(tuple(order[: hi - 1]))
        if trial.met:
            best, hi = trial, hi - 1
        else:
            lo = hi - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        trial = check(tuple(order[:mid]))
        if trial.met:
            best, hi = trial, mid
        else:
            lo = mid
    if hi == n:
        return best, tried  # only every site float meets it: the caller refuses that anyway
    # the ranking is an estimate: give each chosen site but the last (the prefix without it
    # fell short) a chance back in int8
    floats = list(best.floats)
    back = list(reversed(best.floats[:-1]))
    if cost is not None:
        back.sort(key=lambda n: -cost(n))
    for node in back:
        trial = check(tuple(f for f in floats if f is not node))
        if trial.met:
            floats.remove(node)
            best = trial
    return best, tried
