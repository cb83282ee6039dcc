"""Quantizing with a weight algorithm the way a user does, for the accuracy benchmarks of the algorithms.

Data-free algorithms (rtn, hqq) run in ``quantize_``; data-driven ones (gptq, awq, smoothquant) through
``prepare`` → ``calibrate`` → ``convert`` (``config.spec().weight.data_driven`` says which).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch.nn as nn


def quantize_timed(model: nn.Module, config, batches: Iterable) -> float:
    """Quantize ``model`` in place with ``config``; return the wall seconds it took (calibration included)."""
    import lowbit

    start = time.perf_counter()
    if config.spec().weight.data_driven:
        lowbit.prepare(model, config)
        lowbit.calibrate(model, batches, progress=False)
        lowbit.convert(model)
    else:
        lowbit.quantize_(model, config)
    return time.perf_counter() - start


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    return "\n".join(["| " + " | ".join(header) + " |", "|---" * len(header) + "|",
                      *("| " + " | ".join(row) + " |" for row in rows)])


def not_available(error: Exception) -> str:
    """A table cell for an algorithm that raised: ``not available: <error>`` on one line."""
    return "not available: " + " ".join(f"{type(error).__name__}: {error}".split()).replace("|", "/")
