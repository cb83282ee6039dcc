"""A quantized weight whose input is divided per channel first (AWQ / SmoothQuant on weight-only or dynamic schemes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import QuantizedTensor, return_view
from .blockwise import CONV_FUNCTIONS

aten = torch.ops.aten


def check_smooth(smooth: torch.Tensor, in_features: int) -> torch.Tensor:
    """``smooth`` as the float32 (K,) divisors a layer with ``in_features`` inputs takes, or a clear error."""
    if not isinstance(smooth, torch.Tensor) or isinstance(smooth, QuantizedTensor):
        raise TypeError(f"smooth must be a plain tensor of shape ({in_features},); received {type(smooth).__name__}")
    if tuple(smooth.shape) != (in_features,):
        raise ValueError(f"smooth must have shape ({in_features},), one divisor per input channel; "
                         f"received {tuple(smooth.shape)}")
    smooth = smooth.detach().to(torch.float32)
    if not bool(torch.isfinite(smooth).all()) or not bool((smooth > 0).all()):
        bad = smooth[~(torch.isfinite(smooth) & (smooth > 0))]
        raise ValueError(f"smooth must be finite and positive; received {bad[:4].tolist()}")
    return smooth


class SmoothedTensor(QuantizedTensor):
    """Wraps a quantized weight Q (of ``W * s``, columns multiplied) with divisors ``act_smooth`` s (K,) float32:
    ``F.linear(x, t) == F.linear(x / s, Q)``, x divided in its own dtype, then Q's own kernel.

    Example:
        >>> from lowbit.tensors.int8 import Int8Tensor
        >>> w = Int8Tensor.from_float(torch.randn(8, 16), block_size=(1, 16))
        >>> t = SmoothedTensor.wrap(w, torch.full((16,), 2.0))
        >>> tuple(F.linear(torch.randn(2, 16), t).shape)
        (2, 8)
    """

    tensor_names = ("weight", "act_smooth")
    meta_names = ("transposed",)  # True for a weight stored (in, out), as transformers' Conv1D holds it

    @classmethod
    def wrap(cls, weight: QuantizedTensor, smooth: torch.Tensor) -> "SmoothedTensor":
        smooth = check_smooth(smooth, weight.shape[-1]).to(weight.device)
        return cls(weight=weight, act_smooth=smooth, transposed=False, shape=weight.shape, dtype=weight.dtype)

    @property
    def scheme(self) -> str:
        return self.weight.scheme

    @property
    def kernel(self) -> str:
        return self.weight.kernel

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the layer applies to the un-smoothed input: Q / s."""
        smooth = self.act_smooth[:, None] if self.transposed else self.act_smooth
        return (self.weight.dequantize(torch.float32) / smooth).to(dtype or self.dtype)

    def storage_bytes(self) -> int:
        return self.weight.storage_bytes() + self.act_smooth.numel() * self.act_smooth.element_size()

    def with_weight(self, weight: torch.Tensor, smooth: torch.Tensor | None = None, transposed: bool | None = None):
        smooth = self.act_smooth if smooth is None else smooth
        transposed = self.transposed if transposed is None else transposed
        return self.rebuild(weight=weight, act_smooth=smooth, transposed=transposed, shape=weight.shape, dtype=weight.dtype)


def smoothed_input(x: torch.Tensor, weight: SmoothedTensor) -> torch.Tensor:
    return x / weight.act_smooth.to(x.dtype)


@SmoothedTensor.implements([aten.detach.default, aten.alias.default])
def _view_like(func, args, kwargs):
    self = args[0]
    return return_view(func, args, kwargs, self.with_weight(func(self.weight), func(self.act_smooth)))


@SmoothedTensor.implements([aten.t.default, aten.transpose.int])
def _transpose(func, args, kwargs):
    self = args[0]
    if self.dim() != 2:
        raise NotImplementedError(f"a smoothed weight transposes as a 2-D linear weight; received shape {tuple(self.shape)}")
    dims = {d % 2 for d in args[1:3]}
    flips = func is aten.t.default or dims == {0, 1}
    return return_view(func, args, kwargs, self.with_weight(func(self.weight, *args[1:], **kwargs), transposed=self.transposed ^ flips))


@SmoothedTensor.implements(aten.clone.default)
def _clone(func, args, kwargs):
    self = args[0]
    return self.with_weight(func(self.weight, *args[1:], **kwargs), func(self.act_smooth, *args[1:], **kwargs))


@SmoothedTensor.implements(aten._to_copy.default)
def _to_copy(func, args, kwargs):
    self = args[0]
    weight = func(self.weight, *args[1:], **kwargs)
    return self.with_weight(weight, self.act_smooth.to(weight.device))  # divisors stay float32


@SmoothedTensor.implements(aten.copy_.default)
def _copy_(func, args, kwargs):
    dst, src = args[0], args[1]
    if not isinstance(src, SmoothedTensor):
        raise ValueError(f"cannot copy into a smoothed weight: received a {type(src).__name__}, expected a SmoothedTensor")
    dst.weight.copy_(src.weight)
    dst.act_smooth.copy_(src.act_smooth)
    return dst


@SmoothedTensor.implements_function(F.linear)
def _linear(input, weight, bias=None):
    if not isinstance(weight, SmoothedTensor) or isinstance(input, QuantizedTensor) or weight.transposed:
        raise NotImplementedError(f"F.linear supports a plain input and a smoothed (out, in) weight; received "
                                  f"{type(input).__name__} and a weight of shape {tuple(weight.shape)}")
    return F.linear(smoothed_input(input, weight), weight.weight, bias)


@SmoothedTensor.implements_function(torch.addmm)
def _addmm(bias, input, weight, **kwargs):
    """transformers' Conv1D: ``x @ W + bias`` with W stored (in, out), so the divisors run along W's dim 0."""
    if not isinstance(weight, SmoothedTensor) or isinstance(input, QuantizedTensor) or kwargs or not weight.transposed:
        raise NotImplementedError("torch.addmm supports bias + plain input @ smoothed weight, without beta/alpha")
    return torch.addmm(bias, smoothed_input(input, weight), weight.weight)


def _refused(name):
    def impl(*args, **kwargs):
        raise NotImplementedError(f"a smoothed (AWQ/SmoothQuant) weight serves linear layers only; {name} is not "
                                  f"supported: quantize this layer without smoothing")
    return impl


for _func in (F.embedding, torch.bmm, torch.matmul) + CONV_FUNCTIONS:
    SmoothedTensor.implements_function(_func)(_refused(getattr(_func, "__name__", str(_func))))
