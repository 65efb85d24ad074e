"""Scale/zero-point formulas and the calibration observers of the ``quant`` pass.

Activations are quantized per tensor to ``uint8`` codes ``q ∈ [qmin, qmax]``; weights per
output channel (or per tensor) to symmetric ``int8`` codes in ``[-127, 127]``:

* asymmetric: ``lo = min(x_min, 0)``, ``hi = max(x_max, 0)``,
  ``scale = (hi − lo) / (qmax − qmin)``, ``zero_point = clamp(qmin − round(lo / scale))``;
* symmetric: ``a = max(|x_min|, |x_max|)``, ``scale = 2a / (qmax − qmin)``,
  ``zero_point = (qmin + qmax + 1) // 2``;
* weights: ``scale_c = max|W_c| / 127``, ``q = clamp(round(W / scale_c), −127, 127)``.

``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and ``x̂ = (q − zero_point) · scale``.

Each observer sees every calibration batch of one tensor and returns the range ``(lo, hi)``
to quantize: ``minmax`` the extremes, ``moving_average`` an exponential average of the
per-batch extremes, ``percentile`` the given percentiles of a histogram of all values,
``mse`` the clipping range that minimises the expected squared quantization error over that
histogram. The histogram observers need two passes over the data (extremes, then counts).

>>> import torch
>>> obs = MinMaxObserver()
>>> obs.observe(torch.tensor([-1.0, 3.0]))
>>> activation_qparams(*obs.range(), symmetric=False, qmin=0, qmax=255)
(0.01568627543747425, 64)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "OBSERVERS",
    "HistogramObserver",
    "MinMaxObserver",
    "MovingAverageObserver",
    "Observer",
    "activation_qparams",
    "fake_quantize",
    "weight_qparams",
]

EPS = float(torch.finfo(torch.float32).eps)


def activation_qparams(
    lo: float, hi: float, *, symmetric: bool, qmin: int, qmax: int
) -> tuple[float, int]:
    """Scale and zero point of a per-tensor activation with observed range ``[lo, hi]``."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        bound = max(-lo, hi)
        scale = max(2 * bound / (qmax - qmin), EPS)
        return float(torch.tensor(scale, dtype=torch.float32)), (qmin + qmax + 1) // 2
    scale = max((hi - lo) / (qmax - qmin), EPS)
    scale = float(torch.tensor(scale, dtype=torch.float32))  # what the kernels will store
    zero_point = int(min(max(qmin - round(lo / scale), qmin), qmax))
    return scale, zero_point


def weight_qparams(
    weight: torch.Tensor, *, per_channel: bool, qmax: int = 127, pair_max: int | None = None
) -> torch.Tensor:
    """Symmetric int8 scales of a weight: one per output channel (dim 0), or one in all
    (codes in ``[−qmax, qmax]``: 127, or 63 for 7-bit weights).

    ``pair_max`` also bounds ``|code[k]| + |code[k+1]|`` for each even ``k`` along the input
    dim to ``pair_max + 1`` (rounding adds at most ½ to each code). uint8 × int8 kernels of
    CPUs without VNNI (``vpmaddubsw``) add exactly those pairs of products in int16, so with
    ``pair_max=127`` no uint8 activation can overflow them (255 · 128 ≤ 32767). The scale
    then lies between the 8-bit one (``max|w| / 127``) and the 7-bit one (``max|w| / 63.5``),
    near the first unless a channel's largest weights sit side by side."""
    w = weight.detach().float().flatten(1).abs()
    amax = w.amax(1) if per_channel else w.amax().reshape(1)
    scale = amax / qmax
    if pair_max is not None:
        pairs = F.pad(w, (0, w.shape[1] % 2)).unflatten(1, (-1, 2)).sum(2).amax(1)
        pairs = pairs if per_channel else pairs.amax().reshape(1)
        scale = torch.maximum(scale, pairs / pair_max)
    return scale.clamp(min=EPS)


def quantize_weight(weight: torch.Tensor, scales: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """int8 codes in ``[−qmax, qmax]`` of ``weight`` for per-channel (or one-element) ``scales``."""
    shape = (-1,) + (1,) * (weight.dim() - 1)
    s = scales.reshape(shape) if scales.numel() > 1 else scales
    return torch.clamp(torch.round(weight.detach().float() / s), -qmax, qmax).to(torch.int8)


def fake_quantize(
    x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int
) -> torch.Tensor:
    """``x`` quantized and dequantized (the value an int8 kernel sees), in float."""
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


class Observer:
    """Watches one tensor over the calibration batches and proposes a range to quantize."""

    #: whether the observer needs a second pass over the data (after :meth:`freeze`)
    two_pass = False

    def __init__(self) -> None:
        self.lo = math.inf
        self.hi = -math.inf

    def observe(self, x: torch.Tensor) -> None:
        """Record one batch of values (first pass)."""
        if x.numel() == 0:
            return
        x = x.detach()
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))

    def freeze(self) -> None:
        """End of the first pass."""

    def observe_again(self, x: torch.Tensor) -> None:
        """Record one batch of values (second pass, histogram observers only)."""

    def seen(self) -> bool:
        """Whether any finite value was observed."""
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    def range(self) -> tuple[float, float]:
        """The range ``(lo, hi)`` to quantize."""
        return self.lo, self.hi


class MinMaxObserver(Observer):
    """The extremes over all batches."""


class MovingAverageObserver(Observer):
    """Exponential moving average (constant ``c``) of each batch's extremes."""

    def __init__(self, c: float = 0.01) -> None:
        super().__init__()
        self.c = c
        self.avg_lo: float | None = None
        self.avg_hi = 0.0

    def observe(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        lo, hi = float(x.detach().min()), float(x.detach().max())
        super().observe(x)
        if self.avg_lo is None:
            self.avg_lo, self.avg_hi = lo, hi
        else:
            self.avg_lo += self.c * (lo - self.avg_lo)
            self.avg_hi += self.c * (hi - self.avg_hi)

    def range(self) -> tuple[float, float]:
        assert self.avg_lo is not None
        return self.avg_lo, self.avg_hi


class HistogramObserver(Observer):
    """A histogram of all values over the first pass's range; percentile or MSE clipping."""

    two_pass = True
    BINS = 2048

    def __init__(
        self,
        method: str = "mse",
        percentile: float = 99.99,
        *,
        symmetric: bool = False,
        qmin: int = 0,
        qmax: int = 255,
    ) -> None:
        super().__init__()
        self.method = method
        self.percentile = percentile
        self.symmetric, self.qmin, self.qmax = symmetric, qmin, qmax
        self.counts = torch.zeros(self.BINS, dtype=torch.float64)

    def observe_again(self, x: torch.Tensor) -> None:
        if not self.seen() or x.numel() == 0 or self.hi <= self.lo:
            return
        h = torch.histc(x.detach().float().flatten(), self.BINS, self.lo, self.hi)
        self.counts += h.double()

    def _centers(self) -> torch.Tensor:
        width = (self.hi - self.lo) / self.BINS
        return torch.arange(self.BINS, dtype=torch.float64) * width + self.lo + width / 2

    def range(self) -> tuple[float, float]:
        total = float(self.counts.sum())
        if total == 0 or self.hi <= self.lo:
            return self.lo, self.hi
        if self.method == "percentile":
            cdf = self.counts.cumsum(0) / total
            edges = torch.linspace(self.lo, self.hi, self.BINS + 1, dtype=torch.float64)
            p = self.percentile / 100
            top = int(torch.searchsorted(cdf, torch.tensor(p, dtype=torch.float64)))
            bottom = int(torch.searchsorted(cdf, torch.tensor(1 - p, dtype=torch.float64)))
            lo = float(edges[bottom]) if self.lo < 0 else self.lo
            return lo, float(edges[min(top + 1, self.BINS)])
        return self._best_mse_range()

    def _best_mse_range(self) -> tuple[float, float]:
        """Shrink the observed range by factors from 1 down to 1e-3 (log-spaced) and keep
        the one with the least expected error: ``step²/12`` for each value inside the
        range, the squared distance to the nearest end for each value clipped."""
        centers, counts = self._centers(), self.counts
        best, best_err = (self.lo, self.hi), math.inf
        for frac in torch.logspace(-3, 0, 160, dtype=torch.float64).tolist():
            lo, hi = self.lo * frac, self.hi * frac
            scale, zp = activation_qparams(
                lo, hi, symmetric=self.symmetric, qmin=self.qmin, qmax=self.qmax
            )
            low, high = (self.qmin - zp) * scale, (self.qmax - zp) * scale
            clipped = (centers - centers.clamp(low, high)) ** 2
            inside = (centers >= low) & (centers <= high)
            err = float((counts * torch.where(inside, scale**2 / 12, clipped)).sum())
            if err < best_err:
                best, best_err = (lo, hi), err
        return best


#: observer names accepted by ``quant(observer=…)``
OBSERVERS = ("minmax", "moving_average", "percentile", "mse")


def make_observer(
    name: str, *, percentile: float, symmetric: bool, qmin: int, qmax: int
) -> Observer:
    """A new observer of the named kind."""
    if name == "minmax":
        return MinMaxObserver()
    if name == "moving_average":
        return MovingAverageObserver()
    return HistogramObserver(name, percentile, symmetric=symmetric, qmin=qmin, qmax=qmax)
