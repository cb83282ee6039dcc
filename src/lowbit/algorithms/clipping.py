"""Range clipping: per block, the min/max qparams of the block's range shrunk by the factor that minimizes an error."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..primitives.affine import choose_qparams


def shrunk_qparams(w: torch.Tensor, block_size: Sequence[int], qtype, *, symmetric: bool, steps: int, narrowest: float,
                   error: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]):
    """Per block of ``w``, the min/max qparams of its range times the factor among ``1, ..., narrowest`` (``steps`` + 1
    evenly spaced candidates) whose ``error(scale, zero_point)`` (one value per block, the qparams' shape) is least;
    ``steps=0`` gives the min/max qparams.

    Example:
        >>> w = torch.randn(4, 64)
        >>> full, _ = shrunk_qparams(w, (1, 64), "int3", symmetric=True, steps=0, narrowest=0.5, error=None)
        >>> narrow, _ = shrunk_qparams(w, (1, 64), "int3", symmetric=True, steps=4, narrowest=0.5, error=lambda s, z: s)
        >>> torch.allclose(narrow, full * 0.5)  # an error that prefers small scales picks the narrowest range
        True
    """
    best_scale, best_zero = choose_qparams(w, block_size, qtype, symmetric=symmetric)
    if steps == 0:
        return best_scale, best_zero
    best_error = error(best_scale, best_zero)
    for step in range(1, steps + 1):
        scale, zero = choose_qparams(w * (1 - (1 - narrowest) * step / steps), block_size, qtype, symmetric=symmetric)
        candidate = error(scale, zero)
        better = candidate < best_error
        best_scale, best_error = torch.where(better, scale, best_scale), torch.where(better, candidate, best_error)
        if best_zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero
