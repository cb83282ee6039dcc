"""Observers and the static (calibrated) quantization flow."""

from .observers import (
    OBSERVERS,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    NotCalibratedError,
    Observer,
    PercentileObserver,
    PerChannelMinMaxObserver,
)
from .static import calibrate, convert, prepare

__all__ = [
    "OBSERVERS",
    "HistogramObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "NotCalibratedError",
    "Observer",
    "PerChannelMinMaxObserver",
    "PercentileObserver",
    "calibrate",
    "convert",
    "prepare",
]
