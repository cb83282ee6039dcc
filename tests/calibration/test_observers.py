"""Observers: ranges, NaN/inf ignored, bounded memory, errors before calibration."""

import pytest
import torch

from lowbit.calibration import (
    OBSERVERS,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    NotCalibratedError,
    PercentileObserver,
    PerChannelMinMaxObserver,
)
from lowbit.primitives import choose_qparams
from lowbit.primitives.qtypes import get_qtype


@pytest.mark.parametrize("name", list(OBSERVERS))
def test_qparams_before_data_raise(name):
    with pytest.raises(NotCalibratedError, match="run calibration first"):
        OBSERVERS[name]().calculate_qparams()


@pytest.mark.parametrize("name", list(OBSERVERS))
def test_nonfinite_values_are_ignored(name):
    observer = OBSERVERS[name]("int8", symmetric=False)
    x = torch.linspace(-2, 3, 1000)
    observer(torch.cat([x, torch.tensor([float("nan"), float("inf"), float("-inf")])]))
    scale, zero = observer.calculate_qparams()
    assert torch.isfinite(scale) and scale > 0 and zero.dtype == torch.int8
    lo, hi = observer.range()
    assert -2.01 <= float(lo) <= 0 and 0 <= float(hi) <= 3.01


@pytest.mark.parametrize("name", list(OBSERVERS))
def test_constant_data_gives_a_valid_scale(name):
    observer = OBSERVERS[name]("int8", symmetric=False)
    observer(torch.zeros(100))
    scale, _ = observer.calculate_qparams()
    assert torch.isfinite(scale) and scale > 0


def test_minmax_matches_choose_qparams_on_the_data():
    x = torch.randn(4, 100) * 3 + 1
    observer = MinMaxObserver("int8", symmetric=False)
    observer(x[:2])
    observer(x[2:])
    scale, zero = observer.calculate_qparams()
    expected_scale, expected_zero = choose_qparams(x.reshape(1, -1), (1, 400), "int8", symmetric=False)
    assert torch.equal(scale, expected_scale.reshape(())) and torch.equal(zero, expected_zero.reshape(()))


def test_moving_average_follows_recent_batches():
    observer = MovingAverageMinMaxObserver(averaging_constant=0.5)
    observer(torch.tensor([-1.0, 1.0]))
    observer(torch.tensor([-3.0, 3.0]))
    assert float(observer.max_val) == pytest.approx(2.0) and float(observer.min_val) == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="averaging_constant"):
        MovingAverageMinMaxObserver(averaging_constant=0)


def test_per_channel_ranges_and_shape_check():
    observer = PerChannelMinMaxObserver(axis=0)
    w = torch.randn(6, 10)
    observer(w)
    scale, zero = observer.calculate_qparams()
    assert zero is None and scale.shape == (6,)
    torch.testing.assert_close(scale, w.abs().amax(1) / 127)
    with pytest.raises(ValueError, match="6 channels along axis 0"):
        observer(torch.randn(5, 10))


def test_histogram_memory_is_bounded_and_range_clips_outliers():
    observer = HistogramObserver(bins=256)
    torch.manual_seed(0)
    for _ in range(4):
        observer(torch.randn(10000))
    observer(torch.tensor([1e9]))  # one huge outlier: the range widens, the bin count does not
    assert observer.histogram.numel() == 256
    lo, hi = observer.range()
    assert float(hi) < 1e9  # clipping the single outlier costs less than coarse rounding of everything
    observer_plain = HistogramObserver(bins=256)
    observer_plain(torch.randn(10000))
    lo, hi = observer_plain.range()
    assert 2.0 < float(hi) <= 4.5 and -4.5 <= float(lo) < -2.0


def _expected_l2_error(histogram, centres, lo, hi, levels):
    """Each bin's count times its squared error: uniform rounding noise step^2 / 12 inside [lo, hi],
    the squared distance to the range outside (clipping)."""
    step = (hi - lo) / levels
    return sum(count * (step ** 2 / 12 if lo <= c <= hi else (lo - c if c < lo else c - hi) ** 2)
               for count, c in zip(histogram, centres))


@pytest.mark.parametrize("qtype, seed", [("int8", 0), ("int8", 1), ("int4", 2)])
def test_histogram_range_has_the_least_l2_error_of_all_candidates(qtype, seed):
    """64 bins: the search covers every pair (first kept bin <= 32 <= one past the last kept bin);
    brute force over the same pairs finds no smaller expected squared error."""
    observer = HistogramObserver(qtype, bins=64)
    observer(torch.randn(20000, generator=torch.Generator().manual_seed(seed)) ** 3)  # heavy tails: clipping pays
    low, width = float(observer.min_val), float(observer.max_val - observer.min_val) / 64
    histogram, centres = observer.histogram.tolist(), [low + width * (i + 0.5) for i in range(64)]
    levels = get_qtype(qtype).qmax - get_qtype(qtype).qmin
    best = min(_expected_l2_error(histogram, centres, min(low + i * width, 0.0), max(low + j * width, 0.0), levels)
               for i in range(33) for j in range(32, 65) if j > i + 1)
    lo, hi = (float(v) for v in observer.range())
    assert _expected_l2_error(histogram, centres, lo, hi, levels) <= best * (1 + 1e-6)
    assert lo > low or hi < float(observer.max_val)  # the best range clips: the clip term is what is tested


def test_percentile_clips_and_keeps_a_bounded_sample():
    observer = PercentileObserver(percentile=99.0, max_samples=1000)
    for _ in range(5):
        observer(torch.arange(1000.0))
    assert observer.samples.numel() == 1000
    lo, hi = observer.range()
    assert float(lo) == 0.0 and 950 < float(hi) < 999
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(percentile=10)
