"""Observers: watch tensors during calibration, then turn what they saw into scales and zero points.

Every observer ignores NaN and infinity, keeps bounded memory whatever the data, and raises if
asked for parameters before it saw any data. Calling an observer records its input unless
``enabled`` is False (``lowbit.calibrate`` pauses observers that a pass must not count). Parameters come from the same formulas as dynamic
quantization (:func:`lowbit.primitives.choose_qparams`) applied to the observed range.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import NotCalibratedError
from ..primitives.affine import choose_qparams
from ..primitives.qtypes import get_qtype


class Observer(nn.Module):
    """Base observer: records a (min, max) range; ``forward`` returns its input unchanged.

    Args:
        qtype: target qtype name (``"int8"``, ``"uint8"``, ``"float8_e4m3fn"``, ...).
        symmetric: symmetric range around 0 (no zero point) or asymmetric.
    """

    def __init__(self, qtype: str = "int8", symmetric: bool = False):
        super().__init__()
        qt = get_qtype(qtype)
        self.qtype, self.symmetric = qt.name, symmetric or qt.is_float
        self.enabled = True
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    @property
    def observed(self) -> bool:
        return bool(self.min_val <= self.max_val)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            self.observe(x.detach())
        return x

    def observe(self, x: torch.Tensor) -> None:
        """Record ``x`` (what ``forward`` does while ``enabled``)."""
        lo, hi = finite_range(x)
        if lo is not None:
            self.update(lo, hi)

    def update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The range to quantize, (min, max)."""
        return self.min_val, self.max_val

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(scale, zero_point)`` for the observed range; 0-d tensors for per-tensor observers.

        Raises:
            NotCalibratedError: nothing was observed yet.
        """
        if not self.observed:
            raise NotCalibratedError(f"{type(self).__name__} has observed no data: run calibration first (lowbit.calibrate)")
        lo, hi = self.range()
        return range_qparams(lo, hi, self.qtype, self.symmetric)

    def extra_repr(self) -> str:
        return f"qtype={self.qtype}, symmetric={self.symmetric}, min={self.min_val.tolist()}, max={self.max_val.tolist()}"


def range_qparams(lo: torch.Tensor, hi: torch.Tensor, qtype: str, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scale, zero_point)`` quantizing the range [lo, hi] (same shapes) as dynamic quantization would a tensor
    holding exactly those values; non-finite bounds count as 0.

    Example:
        >>> scale, zp = range_qparams(torch.tensor(-1.0), torch.tensor(3.0), "uint8", symmetric=False)
        >>> round(float(scale) * 255, 4), int(zp)
        (4.0, 64)
    """
    span = torch.stack([lo, hi], dim=-1).float()  # (..., 2): choose_qparams over [min, max]
    scale, zero_point = choose_qparams(span, (1,) * (span.dim() - 1) + (2,), qtype, symmetric=symmetric,
                                       ignore_nonfinite=True)
    return scale.squeeze(-1), None if zero_point is None else zero_point.squeeze(-1)


def finite_range(x: torch.Tensor, dim=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(min, max) over the finite values of ``x`` (along all dims but ``dim``); (None, None) if none."""
    finite = torch.isfinite(x)
    if not bool(finite.any()):
        return None, None
    low = torch.where(finite, x, torch.full_like(x, float("inf"))).float()
    high = torch.where(finite, x, torch.full_like(x, float("-inf"))).float()
    if dim is None:
        return low.amin(), high.amax()
    dims = [d for d in range(x.dim()) if d != dim % x.dim()]
    return low.amin(dim=dims), high.amax(dim=dims)


class MinMaxObserver(Observer):
    """Running minimum and maximum over everything observed.

    Example:
        >>> obs = MinMaxObserver("int8", symmetric=True)
        >>> _ = obs(torch.tensor([-1.0, 0.5]))
        >>> round(float(obs.calculate_qparams()[0]) * 127, 4)
        1.0
    """


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of each batch's min and max (``averaging_constant`` per batch)."""

    def __init__(self, qtype: str = "int8", symmetric: bool = False, averaging_constant: float = 0.01):
        super().__init__(qtype, symmetric)
        if not 0 < averaging_constant <= 1:
            raise ValueError(f"averaging_constant must be in (0, 1]; received {averaging_constant}")
        self.averaging_constant = averaging_constant

    def update(self, lo, hi):
        if not self.observed:
            self.min_val, self.max_val = lo.clone(), hi.clone()
            return
        c = self.averaging_constant
        self.min_val = self.min_val + c * (lo - self.min_val)
        self.max_val = self.max_val + c * (hi - self.max_val)


class PerChannelMinMaxObserver(Observer):
    """Running min and max per index along ``axis`` (0 for Linear/Conv weights, 1 for ConvTranspose)."""

    def __init__(self, qtype: str = "int8", symmetric: bool = True, axis: int = 0):
        super().__init__(qtype, symmetric)
        self.axis = axis
        self.min_val = torch.empty(0)
        self.max_val = torch.empty(0)

    @property
    def observed(self) -> bool:
        return self.min_val.numel() > 0

    def observe(self, x):
        lo, hi = finite_range(x, dim=self.axis)
        if lo is None:
            return
        if not self.observed:
            self.min_val, self.max_val = lo, hi
        elif lo.shape != self.min_val.shape:
            raise ValueError(f"{type(self).__name__} saw {self.min_val.numel()} channels along axis {self.axis}; "
                             f"received a tensor of shape {tuple(x.shape)}")
        else:
            self.update(lo, hi)


class HistogramObserver(Observer):
    """A fixed-size histogram of everything observed; the range minimising the expected L2
    quantization error (rounding inside, clipping outside) is chosen at the end.

    Memory is ``bins`` floats whatever the data's range: when new data falls outside the current
    range, the histogram is re-binned onto a wider range with the same number of bins.
    """

    def __init__(self, qtype: str = "int8", symmetric: bool = False, bins: int = 2048):
        super().__init__(qtype, symmetric)
        if bins < 16:
            raise ValueError(f"bins must be at least 16; received {bins}")
        self.bins = bins
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64))

    def observe(self, x):
        values = x.float().flatten()
        values = values[torch.isfinite(values)]
        if values.numel() == 0:
            return
        lo, hi = torch.minimum(values.min(), torch.tensor(0.0)), torch.maximum(values.max(), torch.tensor(0.0))
        if self.observed and (lo < self.min_val or hi > self.max_val):
            self._rebin(torch.minimum(lo, self.min_val), torch.maximum(hi, self.max_val))
        elif not self.observed:
            self.min_val, self.max_val = lo, torch.maximum(hi, lo + torch.finfo(torch.float32).eps)
        self.histogram += torch.histc(values, self.bins, float(self.min_val), float(self.max_val)).double()

    def _rebin(self, lo, hi):
        """Move the counts onto ``bins`` bins over [lo, hi] (each old bin into the new bin of its centre)."""
        old_width = (self.max_val - self.min_val) / self.bins
        centres = self.min_val + old_width * (torch.arange(self.bins) + 0.5)
        index = ((centres - lo) / ((hi - lo) / self.bins)).long().clamp(0, self.bins - 1)
        self.histogram = torch.zeros_like(self.histogram).index_add_(0, index, self.histogram)
        self.min_val, self.max_val = lo, hi

    def range(self):
        """Search clipping ranges [edge_i, edge_j] for the smallest expected squared error: a coarse
        grid over how many bins to drop at each end, then a finer grid around the best pair."""
        best = self._search(torch.linspace(0, self.bins // 2, 48).long(), self.bins - torch.linspace(0, self.bins // 2, 48).long())
        step = max(self.bins // 2 // 47, 1)
        lo_i, hi_i = best
        fine_lows = torch.arange(max(lo_i - step, 0), lo_i + step + 1, max(step // 8, 1))
        fine_highs = torch.arange(max(hi_i - step, fine_lows.max() + 2), min(hi_i + step, self.bins) + 1, max(step // 8, 1))
        lo_i, hi_i = self._search(fine_lows, fine_highs)
        width = (self.max_val - self.min_val) / self.bins
        return torch.clamp(self.min_val + lo_i * width, max=0.0), torch.clamp(self.min_val + hi_i * width, min=0.0)

    def _search(self, lows: torch.Tensor, highs: torch.Tensor) -> tuple[int, int]:
        """(first kept bin, one past the last kept bin) with the least expected error among the candidates."""
        width = float(self.max_val - self.min_val) / self.bins
        centres = float(self.min_val) + width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)
        qt = get_qtype(self.qtype)
        levels = 256 if qt.is_float else qt.qmax - qt.qmin  # float8: ~256 codes, unevenly spaced
        best, best_pair = None, (0, self.bins)
        for lo_i in lows.tolist():
            his = highs[highs > lo_i + 1]
            if his.numel() == 0:
                continue
            lo = min(float(self.min_val) + lo_i * width, 0.0)
            hi = torch.clamp(float(self.min_val) + his.double() * width, min=0.0)  # (H,)
            step = (hi - lo) / levels
            inside = ((centres[None] >= lo) & (centres[None] <= hi[:, None])).double()
            clip = (torch.clamp(lo - centres[None], min=0) + torch.clamp(centres[None] - hi[:, None], min=0)) ** 2
            error = (self.histogram[None] * (inside * step[:, None] ** 2 / 12 + clip)).sum(-1)  # (H,)
            k = int(error.argmin())
            if best is None or error[k] < best:
                best, best_pair = float(error[k]), (lo_i, int(his[k]))
        return best_pair


class PercentileObserver(Observer):
    """Clips the range at the ``percentile`` of the observed values (and its mirror for the minimum),
    estimated from a bounded uniform sample of at most ``max_samples`` values."""

    def __init__(self, qtype: str = "int8", symmetric: bool = False, percentile: float = 99.99, max_samples: int = 100_000):
        super().__init__(qtype, symmetric)
        if not 50 < percentile <= 100:
            raise ValueError(f"percentile must be in (50, 100]; received {percentile}")
        self.percentile, self.max_samples = percentile, max_samples
        self.register_buffer("samples", torch.empty(0))
        self.seen = 0

    def observe(self, x):
        flat = x.float().flatten()
        flat = flat[torch.isfinite(flat)]
        if flat.numel() == 0:
            return
        super().observe(flat)
        self.seen += flat.numel()
        pool = torch.cat([self.samples, flat])
        if pool.numel() > self.max_samples:  # keep a uniform sample of everything seen so far
            keep = torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(self.seen))[: self.max_samples]
            pool = pool[keep]
        self.samples = pool

    def range(self):
        q = torch.tensor([1 - self.percentile / 100, self.percentile / 100])
        lo, hi = torch.quantile(self.samples, q)
        return torch.minimum(lo, torch.tensor(0.0)), torch.maximum(hi, torch.tensor(0.0))


OBSERVERS = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "histogram": HistogramObserver,
    "percentile": PercentileObserver,
}
