"""Interleaved timing, shared by ``lowbit demo`` and ``lowbit bench``.

The callables under comparison (a baseline and its candidates) take turns: each round calls every
one of them a few times, in an order that rotates from round to round, so a burst of load from other
processes slows all of them alike instead of whichever happened to run then. The spread of the round
times says how busy the machine was.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

GRAD_MODES = {"inference": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}
BUSY_SPREAD = 0.10  # a relative spread above this means other processes were competing for the cores


@dataclass(frozen=True)
class Timing:
    """One callable's time: ``ms`` is the median of its per-round times (each the median of that
    round's calls); ``spread`` is their interquartile range relative to ``ms``."""

    ms: float
    spread: float
    rounds: tuple[float, ...]


@dataclass(frozen=True)
class Timed:
    """A callable to time and the grad mode it runs in: ``"inference"`` (``torch.inference_mode``),
    ``"no_grad"`` or ``"grad"`` (plain ``model(x)``, as users call models)."""

    fn: Callable[[], object]
    mode: str = "inference"

    def __post_init__(self):
        if self.mode not in GRAD_MODES:
            raise ValueError(f"mode must be one of {sorted(GRAD_MODES)}; received {self.mode!r}")


def interleaved_ms(calls: dict[str, Timed | Callable[[], object]], rounds: int = 7, target_s: float = 0.05,
                   max_reps: int = 50, warmup: int = 2, progress: Callable[[Iterable], Iterable] = iter) -> dict[str, Timing]:
    """Time every callable of ``calls`` in interleaved rounds and return a :class:`Timing` per name.

    Args:
        calls: name -> :class:`Timed` (a bare callable runs under ``inference_mode``).
        rounds: rounds; round ``r`` starts with the ``r``-th callable (mod the number of callables).
        target_s: each callable's share of a round: its repetitions per round are set from its
            fastest warm-up call to take about this long (at least one call, at most ``max_reps``).
        warmup: untimed calls per callable before the first round.
        progress: wraps the range of rounds (e.g. a progress bar).

    Example:
        >>> timings = interleaved_ms({"sum": lambda: sum(range(1000)), "max": lambda: max(range(1000))}, rounds=3)
        >>> sorted(timings), timings["sum"].ms > 0
        (['max', 'sum'], True)
    """
    if rounds < 1 or warmup < 1:
        raise ValueError(f"rounds and warmup must be >= 1; received rounds={rounds}, warmup={warmup}")
    timed = {name: call if isinstance(call, Timed) else Timed(call) for name, call in calls.items()}
    reps = {}
    for name, call in timed.items():
        seconds = min(_run(call, warmup)) / 1e3
        reps[name] = max(1, min(max_reps, round(target_s / max(seconds, 1e-9))))
    names = list(timed)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in progress(range(rounds)):
        for name in names[r % len(names):] + names[: r % len(names)]:
            samples[name].append(statistics.median(_run(timed[name], reps[name])))
    return {name: _summary(values) for name, values in samples.items()}


def busiest(timings: dict[str, Timing]) -> tuple[str, float]:
    """The name with the largest spread, and that spread."""
    name = max(timings, key=lambda n: timings[n].spread)
    return name, timings[name].spread


def _run(call: Timed, count: int) -> list[float]:
    """Wall times in ms of ``count`` calls, inside the call's grad mode."""
    times = []
    with GRAD_MODES[call.mode]():
        for _ in range(count):
            t0 = time.perf_counter()
            call.fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _summary(values: list[float]) -> Timing:
    ms = statistics.median(values)
    if len(values) >= 4:
        q1, _, q3 = statistics.quantiles(values, n=4)
    else:
        q1, q3 = min(values), max(values)
    return Timing(ms=ms, spread=(q3 - q1) / ms if ms > 0 else 0.0, rounds=tuple(values))
