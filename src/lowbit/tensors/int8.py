"""Int8 weights: symmetric, per-channel (default) or per-group, no zero point."""

from __future__ import annotations

from typing import Sequence

import torch

from ..specs import weight_spec
from .blockwise import BlockQuantizedTensor
from .schemes import register_scheme


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
        return cls.from_spec(w, weight_spec("int8", "int8"), block_size, kernel=kernel, name=name, groups=groups)


register_scheme(Int8Tensor, ("int8",), dynamic="int8_dynamic", static="int8_static", conv=True)
