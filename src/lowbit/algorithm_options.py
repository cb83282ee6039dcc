"""Options of the weight algorithms, for a config's ``algorithm`` field when the defaults do not suit.

A config takes an algorithm by name (``Int4WeightOnly(algorithm="gptq")``) or as one of these frozen dataclasses
(``Int4WeightOnly(algorithm=GPTQ(act_order=True))``); its spec records the name only, since the options shape
how values are chosen, not how they are stored.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPTQ:
    """GPTQ's options. The defaults quantize columns in act order with clipped ranges: on all-MiniLM-L6-v2 at 3 bits
    (group 32) they keep cos min 0.936 against 0.891 for the reference algorithm's defaults (BENCHMARKS.md).

    Attributes:
        damping: fraction of the input Hessian's mean diagonal added to its diagonal (raised tenfold while the
            Cholesky factorisation fails).
        act_order: quantize input columns in order of decreasing Hessian diagonal (group qparams are then
            chosen up front, so groups stay contiguous for the scheme's kernels).
        block_columns: columns updated lazily together (rounded to a multiple of the group size).
        clip_steps: shrink each block's range before choosing its qparams, by the factor among ``clip_steps`` + 1
            in [0.8, 1] that minimizes the block's ``|w - Q(w)|^2.4`` (0: the whole min/max range).
    """

    damping: float = 0.01
    act_order: bool = True
    block_columns: int = 128
    clip_steps: int = 10
    name = "gptq"

    def __post_init__(self):
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not 0 < self.damping <= 1:
            raise ValueError(f"GPTQ damping must be a number in (0, 1]; received {self.damping!r}")
        if not isinstance(self.act_order, bool):
            raise ValueError(f"GPTQ act_order must be True or False; received {self.act_order!r}")
        if isinstance(self.block_columns, bool) or not isinstance(self.block_columns, int) or self.block_columns < 1:
            raise ValueError(f"GPTQ block_columns must be a positive int; received {self.block_columns!r}")
        if isinstance(self.clip_steps, bool) or not isinstance(self.clip_steps, int) or self.clip_steps < 0:
            raise ValueError(f"GPTQ clip_steps must be an int >= 0; received {self.clip_steps!r}")


@dataclass(frozen=True)
class AWQ:
    """AWQ's options.

    Attributes:
        grid: ratios searched: ``s = mean|x|^r`` for ``r`` in ``0, 1/grid, ..., (grid - 1)/grid`` (r = 0 is
            round to nearest, so AWQ never does worse than it on the calibration tokens).
        samples: calibration tokens kept per layer (a uniform sample) to measure each ratio's output error.
        clip_steps: then shrink each group's range by the factor among ``clip_steps`` + 1 in [0.5, 1] that
            minimizes the group's output error on those tokens (AWQ's clipping search; 0: min/max ranges).
    """

    grid: int = 20
    samples: int = 4096
    clip_steps: int = 20
    name = "awq"

    def __post_init__(self):
        for field, value, least in (("grid", self.grid, 1), ("samples", self.samples, 1), ("clip_steps", self.clip_steps, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"AWQ {field} must be an int >= {least}; received {value!r}")


OPTIONS = {options.name: options for options in (GPTQ, AWQ)}


def algorithm_name(algorithm) -> str:
    """The name of a config's ``algorithm`` (a str or an options object)."""
    return algorithm if isinstance(algorithm, str) else getattr(algorithm, "name", algorithm)


def algorithm_options(algorithm):
    """The options object of a config's ``algorithm``: given, or the defaults of a named one (None if it has none)."""
    if not isinstance(algorithm, str):
        return algorithm
    return OPTIONS[algorithm]() if algorithm in OPTIONS else None
