"""Int8 weights: symmetric, per-channel (default) or per-group, no zero point."""

from __future__ import annotations

from typing import Sequence

import torch

from ..primitives.affine import quantize_weight
from .blockwise import BlockQuantizedTensor


class Int8Tensor(BlockQuantizedTensor):
    """int8 ``qdata`` (same shape as the weight) with float32 ``scale`` per block.

    Example:
        >>> w = Int8Tensor.from_float(torch.randn(16, 32), block_size=(1, 32))
        >>> w.qdata.dtype, tuple(w.scale.shape)
        (torch.int8, (16, 1))
    """

    scheme = "int8"

    @classmethod
    def from_float(cls, w: torch.Tensor, block_size: Sequence[int], *, kernel: str = "auto", name: str = "weight",
                   groups: int | None = None):
        """Quantize ``w``; ``groups`` is set for a convolution's weight (its kernels pack by it)."""
        q, scale, _ = quantize_weight(w, block_size, "int8", symmetric=True, name=name)
        return cls(
            qdata=q, scale=scale, qtype="int8", block_size=tuple(block_size), packed_dim=None,
            kernel=kernel, groups=groups, shape=w.shape, dtype=w.dtype,
        )
