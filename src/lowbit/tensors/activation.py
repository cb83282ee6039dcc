"""A weight wrapper that quantizes the activation dynamically (per call) before the matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..specs import ActivationQuant
from .base import QuantizedTensor, return_view
from .blockwise import CONV_FUNCTIONS, BlockQuantizedTensor, addmm_function, conv_impl, run_kernel, transposed, with_packing
from .schemes import scheme_for

aten = torch.ops.aten


class DynamicActivationTensor(QuantizedTensor):
    """Wraps a quantized weight; ``F.linear`` quantizes its input as ``activation`` says first.

    Example:
        >>> from lowbit.tensors.int8 import Int8Tensor
        >>> w = Int8Tensor.from_float(torch.randn(8, 16), block_size=(1, 16))
        >>> y = F.linear(torch.randn(2, 16), DynamicActivationTensor(weight=w, activation=ActivationQuant(),
        ...     shape=w.shape, dtype=w.dtype))
        >>> tuple(y.shape)
        (2, 8)
    """

    tensor_names = ("weight",)
    meta_names = ("activation",)
    mode = "dynamic"  # the activation mode of its schemes (lowbit.tensors.schemes)

    @classmethod
    def wrap(cls, weight: BlockQuantizedTensor, activation: ActivationQuant) -> "DynamicActivationTensor":
        """Wrap ``weight``, packing it for this scheme's linear kernel."""
        weight = with_packing(weight, scheme_for(weight.scheme, cls.mode).name, activation)
        return cls(weight=weight, activation=activation, shape=weight.shape, dtype=weight.dtype)

    @property
    def scheme(self) -> str:
        return scheme_for(self.weight.scheme, self.mode).name

    @property
    def kernel(self) -> str:
        return self.weight.kernel

    def kernel_inputs(self) -> tuple[dict, dict]:
        tensors, meta = self.weight.kernel_inputs()
        return tensors, {**meta, "activation": self.activation}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.weight.dequantize(dtype or self.dtype)

    def storage_bytes(self) -> int:
        return self.weight.storage_bytes()

    def with_weight(self, weight: torch.Tensor) -> "DynamicActivationTensor":
        return self.rebuild(weight=weight, shape=weight.shape, dtype=weight.dtype)


@DynamicActivationTensor.implements(
    [aten.detach.default, aten.alias.default, aten.t.default, aten.transpose.int, aten.view.default,
     aten._unsafe_view.default, aten.reshape.default, aten.slice.Tensor]
)
def _view_like(func, args, kwargs):
    return return_view(func, args, kwargs, args[0].with_weight(func(args[0].weight, *args[1:], **kwargs)))


@DynamicActivationTensor.implements(aten.clone.default)
def _clone(func, args, kwargs):
    return args[0].with_weight(func(args[0].weight, *args[1:], **kwargs))


@DynamicActivationTensor.implements(aten._to_copy.default)
def _to_copy(func, args, kwargs):
    self = args[0]
    device = kwargs.get("device")
    if device is None or torch.device(device) == self.device:
        return self.with_weight(func(self.weight, *args[1:], **kwargs))
    moved = func(self.weight.canonical(), *args[1:], **kwargs)
    return self.with_weight(with_packing(moved, self.scheme, self.activation))  # packed once, for this scheme's kernel there


@DynamicActivationTensor.implements([aten.split.Tensor, aten.split_with_sizes.default])
def _split(func, args, kwargs):
    return [args[0].with_weight(w) for w in func(args[0].weight, *args[1:], **kwargs)]


@DynamicActivationTensor.implements(aten.copy_.default)
def _copy_(func, args, kwargs):
    dst, src = args[0], args[1]
    if not isinstance(src, DynamicActivationTensor) or src.activation != dst.activation:
        received = getattr(src, "activation", f"a {type(src).__name__}")
        raise ValueError(f"cannot copy into a weight with dynamic {dst.activation}: received {received}")
    dst.weight.copy_(src.weight)
    return dst


@DynamicActivationTensor.implements([aten.mm.default, aten.addmm.default])
def _mm(func, args, kwargs):
    bias, (a, b) = (args[0], args[1:3]) if func is aten.addmm.default else (None, args[:2])
    if not isinstance(b, DynamicActivationTensor) or isinstance(a, QuantizedTensor) or kwargs:
        raise NotImplementedError(f"{func} supports plain activations times a dynamically quantized weight")
    return run_kernel("linear", b.with_weight(b.weight.t()), a, bias)


@DynamicActivationTensor.implements_function(F.linear)
def _linear(input, weight, bias=None):
    if not isinstance(weight, DynamicActivationTensor) or isinstance(input, QuantizedTensor):
        raise NotImplementedError(f"F.linear supports a plain input and a quantized weight; received {type(input).__name__}")
    return run_kernel("linear", weight, input, bias)


DynamicActivationTensor.implements_function(torch.addmm)(  # transformers' Conv1D: x @ W + bias
    addmm_function(lambda weight: weight.with_weight(transposed(weight.weight, 0, 1))))


class StaticActivationTensor(DynamicActivationTensor):
    """Wraps a quantized weight; ``F.linear`` quantizes its input with a calibrated per-tensor scale
    (and zero point) first. Made by :func:`lowbit.convert` after calibration.

    Example:
        >>> from lowbit.tensors.int8 import Int8Tensor
        >>> w = Int8Tensor.from_float(torch.randn(8, 16), block_size=(1, 16))
        >>> act = ActivationQuant("int8", "per_tensor", symmetric=True)
        >>> q = StaticActivationTensor.wrap_static(w, act, torch.tensor(0.05), None)
        >>> tuple(F.linear(torch.randn(2, 16), q).shape)
        (2, 8)
    """

    tensor_names = ("weight", "act_scale")
    optional_tensor_names = ("act_zero_point", "act_smooth")
    mode = "static"

    @classmethod
    def wrap_static(cls, weight, activation: ActivationQuant, act_scale: torch.Tensor, act_zero_point,
                    act_smooth: torch.Tensor | None = None):
        """Wrap ``weight`` with a calibrated activation scale (0-d float32), zero point (0-d or None) and
        optional per-input-channel divisors (K,) applied to the activation before it is quantized
        (SmoothQuant: the weight's columns were multiplied by them)."""
        if activation.granularity != "per_tensor":
            raise ValueError(f"static activations are quantized per tensor; received {activation.granularity!r}")
        weight = with_packing(weight, scheme_for(weight.scheme, cls.mode).name, activation)
        return cls(weight=weight, act_scale=act_scale, act_zero_point=act_zero_point, act_smooth=act_smooth,
                   activation=activation, shape=weight.shape, dtype=weight.dtype)

    def kernel_inputs(self) -> tuple[dict, dict]:
        tensors, meta = super().kernel_inputs()
        tensors = {**tensors, "act_scale": self.act_scale}
        for name in self.optional_tensor_names:
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        return tensors, meta

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the layer applies to the un-smoothed activation (smoothing folded back out)."""
        weight = self.weight.dequantize(torch.float32)
        if self.act_smooth is not None:
            weight = weight / self.act_smooth
        return weight.to(dtype or self.dtype)


@StaticActivationTensor.implements(aten._to_copy.default)
def _static_to_copy(func, args, kwargs):
    moved = _to_copy(func, args, kwargs)
    device = moved.weight.device
    extras = {n: getattr(moved, n) for n in ("act_scale",) + moved.optional_tensor_names}
    return moved.rebuild(**{n: None if t is None else t.to(device) for n, t in extras.items()})


@StaticActivationTensor.implements(aten.copy_.default)
def _static_copy_(func, args, kwargs):
    dst, src = args[0], args[1]
    names = ("act_scale",) + StaticActivationTensor.optional_tensor_names
    if not isinstance(src, StaticActivationTensor) or any((getattr(src, n) is None) != (getattr(dst, n) is None) for n in names):
        raise ValueError(f"cannot copy into a weight with static {dst.activation}: received {type(src).__name__}")
    _copy_(func, args, kwargs)
    for name in names:
        if getattr(dst, name) is not None:
            getattr(dst, name).copy_(getattr(src, name))
    return dst


for _func in CONV_FUNCTIONS:  # static activations: per-tensor scales apply to convolutions as well
    StaticActivationTensor.implements_function(_func)(conv_impl(_func))


WRAPPERS = {cls.mode: cls for cls in (DynamicActivationTensor, StaticActivationTensor)}  # by activation mode
