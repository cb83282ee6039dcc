"""Module swap beside the tensor subclasses: ``nn.Linear`` -> :class:`QuantizedLinear`.

QuantizedLinear stores the same inner tensors as plain buffers and calls the same kernel as the
subclass path, so both give identical outputs. Unlike the subclass path it only sees calls that
go through the module: a model calling ``F.linear(x, self.weight)`` itself is not quantized.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .kernels.boundary import call_kernel
from .kernels.registry import select_kernel
from .tensors.from_spec import quantize_weight


class QuantizedLinear(nn.Module):
    """A Linear layer whose weight is held as quantized buffers.

    Example:
        >>> from lowbit import Int8WeightOnly
        >>> layer = QuantizedLinear.from_float(nn.Linear(64, 32), Int8WeightOnly())
        >>> tuple(layer(torch.randn(2, 64)).shape)
        (2, 32)
    """

    def __init__(self, in_features: int, out_features: int, scheme: str, tensors: dict, meta: dict, bias):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.meta = scheme, dict(meta)
        self.tensor_names = tuple(tensors)
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.bias = bias

    @classmethod
    def from_float(cls, linear: nn.Linear, config) -> "QuantizedLinear":
        """Quantize ``linear.weight`` as ``config``'s spec says, as the subclass path does."""
        weight = quantize_weight(linear.weight.detach(), config.spec(), kernel=config.kernel)
        return cls.from_quantized_weight(linear, weight)

    @classmethod
    def from_quantized_weight(cls, linear: nn.Linear, weight) -> "QuantizedLinear":
        """Hold an already quantized weight (a lowbit tensor subclass) as plain buffers."""
        tensors, meta = weight.kernel_inputs()
        return cls(linear.in_features, linear.out_features, weight.scheme, tensors, meta, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = select_kernel("linear", self.scheme, x.device.type, self.meta["kernel"], self.meta)
        tensors = {name: getattr(self, name) for name in self.tensor_names}
        return call_kernel(kernel, x, tensors, self.meta, self.bias)

    def extra_repr(self) -> str:
        block = self.meta.get("block_size")
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, block_size={block}"
