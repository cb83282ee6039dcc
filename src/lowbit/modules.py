"""Module swap beside the tensor subclasses: ``nn.Linear`` -> :class:`QuantizedLinear`.

QuantizedLinear stores the same inner tensors as plain buffers and calls the same kernel as the
subclass path, so both give identical outputs. Unlike the subclass path it only sees calls that
go through the module: a model calling ``F.linear(x, self.weight)`` itself is not quantized.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .kernels.boundary import call_kernel
from .kernels.registry import packer, select_kernel, unpacked
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

    def __getstate__(self):
        """Pickles and deep copies carry the canonical weight in place of a kernel's opaque layout (oneDNN's
        packed weight has no storage to copy); :meth:`__setstate__` packs it again."""
        state = dict(self.__dict__)
        buffers = state["_buffers"]
        opaque = [n for n, t in buffers.items() if t is not None and t.layout == torch._mkldnn]
        if opaque:
            canonical = unpacked(dict(buffers), self.meta)
            state["_buffers"] = {n: t for n, t in canonical.items() if n not in opaque}
            state["_repack"] = True
        return state

    def __setstate__(self, state):
        repack = state.pop("_repack", False)
        super().__setstate__(state)
        if repack:
            for name, t in packer(self.meta).pack(dict(self._buffers), self.meta).items():
                if t is None:
                    del self._buffers[name]
                else:
                    self._buffers[name] = t

    def extra_repr(self) -> str:
        block = self.meta.get("block_size")
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, block_size={block}"
