"""Specs -> quantized tensors: what ``quantize_`` and ``lowbit.convert`` build from a config's spec."""

from __future__ import annotations

from typing import Sequence

import torch

from ..specs import ActivationSpec, QuantSpec, WeightSpec
from .activation import WRAPPERS, DynamicActivationTensor, StaticActivationTensor
from .base import QuantizedTensor
from .blockwise import BlockQuantizedTensor, with_packing
from .schemes import get_scheme, scheme_for
from .smoothed import SmoothedTensor, check_smooth


def quantize_block(w: torch.Tensor, spec: WeightSpec, block_size: Sequence[int] | None = None, *, kernel: str = "auto",
                   name: str = "weight", groups: int | None = None, qparams=None) -> BlockQuantizedTensor:
    """``w`` quantized as the weight spec says, in its canonical layout (not packed for a kernel). A convolution's
    weight comes with its ``block_size`` (one block per output channel) and ``groups``; ``qparams`` (scale, zero
    point) given by a flow that chose them (QAT's learned ones) replace the spec's min/max choice."""
    tensor = get_scheme(spec.scheme).tensor
    block = tuple(block_size) if block_size is not None else spec.block_size(w.shape)
    return tensor.from_spec(w, spec, block, kernel=kernel, name=name, groups=groups, qparams=qparams)


def quantize_weight(w: torch.Tensor, spec: QuantSpec, block_size: Sequence[int] | None = None, *, kernel: str = "auto",
                    name: str = "weight", groups: int | None = None, qparams=None,
                    smooth: torch.Tensor | None = None) -> QuantizedTensor:
    """The post-training flow: ``w`` as the tensor a weight-only or dynamic spec gives, packed for its kernel.
    With ``smooth`` (K,) positive divisors (AWQ / SmoothQuant), ``w`` is the column-multiplied weight ``W * s`` and
    the result is a :class:`SmoothedTensor` computing ``F.linear(x / s, Q(w))``.

    Example:
        >>> from lowbit.specs import weight_spec
        >>> type(quantize_weight(torch.randn(8, 32), QuantSpec(weight_spec("int8", "int8")))).__name__
        'Int8Tensor'
    """
    mode = "none" if spec.activation is None else spec.activation.mode
    if mode == "static":
        raise ValueError("static activation scales come from calibration: use lowbit.prepare / calibrate / convert")
    scheme = scheme_for(spec.weight.scheme, mode)
    if smooth is not None:
        if w.dim() != 2 or groups is not None:
            raise ValueError(f"smoothing divisors apply to a 2-D linear weight; received shape {tuple(w.shape)}"
                             + (f" with groups={groups}" if groups is not None else ""))
        smooth = check_smooth(smooth, w.shape[1])  # validated before any quantization work
        return SmoothedTensor.wrap(quantize_weight(w, spec, block_size, kernel=kernel, name=name, qparams=qparams), smooth)
    block = quantize_block(w, spec.weight, block_size, kernel=kernel, name=name, groups=groups, qparams=qparams)
    if spec.activation is None:
        return with_packing(block, scheme.name)
    return DynamicActivationTensor.wrap(block, spec.activation.quant)


def with_static_activation(block: BlockQuantizedTensor, activation: ActivationSpec, scale: torch.Tensor,
                           zero_point: torch.Tensor | None, smooth: torch.Tensor | None = None) -> StaticActivationTensor:
    """The static flow's tensor: a quantized weight with the calibrated activation scale, zero point and optional
    SmoothQuant divisors, packed for its kernel."""
    return WRAPPERS[activation.mode].wrap_static(block, activation.quant, scale, zero_point, smooth)
