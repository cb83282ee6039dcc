"""Quantizing with a weight algorithm the way a user does, for the accuracy benchmarks of the algorithms.

Data-free algorithms (rtn, hqq) run in ``quantize_``; data-driven ones (gptq, awq, smoothquant) through
``prepare`` → ``calibrate`` → ``convert`` (``config.spec().weight.data_driven`` says which).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable

import torch
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


def retrieval_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Fraction of sentences whose nearest other sentence is the same under both (N, H) normalised embeddings."""
    def nearest(e):
        return (e @ e.t()).fill_diagonal_(-float("inf")).argmax(-1)

    return (nearest(reference) == nearest(candidate)).float().mean().item()


def names(value: str, known) -> list[str]:
    """A command-line list ``a,b,c`` of names, each one of ``known``."""
    chosen = value.split(",")
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; expected some of {', '.join(known)}")
    return chosen
