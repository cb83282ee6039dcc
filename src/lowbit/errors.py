"""Errors that several flows raise."""


class NotCalibratedError(RuntimeError):
    """Quantization parameters were asked for before calibration data reached the layer (an observer, or a
    data-driven weight algorithm, saw no data)."""
