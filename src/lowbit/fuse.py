"""Fold BatchNorm into the Conv or Linear layer before it (eval models), as static quantization expects.

``fuse(model)`` folds every Conv/ConvTranspose/Linear -> BatchNorm pair that follows each other in an
``nn.Sequential``; ``fuse(model, [["conv1", "bn1"], ...])`` folds named pairs anywhere. The BatchNorm
becomes ``nn.Identity`` and a ReLU after it stays (it is already free at inference), so the module
tree keeps its names.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .bn_folding import bn_factor, folded_bias, scale_output_channels
from .qat.conv_bn import CONV_BN
from .targets import set_submodule
from .tensors.base import QuantizedTensor

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fuse(model: nn.Module, pairs: Sequence[Sequence[str]] | None = None, *, qat: bool = False) -> nn.Module:
    """Fold BatchNorm layers into the preceding Conv/ConvTranspose/Linear, in place.

    Args:
        model: a model in eval mode (training-mode BatchNorm uses batch statistics: nothing to fold); in
            training mode with ``qat``.
        pairs: ``[layer_name, batchnorm_name]`` lists (a third name, e.g. a ReLU, is allowed and kept);
            default: every such pair adjacent in an nn.Sequential.
        qat: for quantization-aware training: each Conv1d/2d/3d and its BatchNorm become one
            :class:`lowbit.qat.ConvBn` layer (at the conv's name) whose BatchNorm keeps training while the
            conv sees its folded weight fake-quantized once QAT prepares it; the QAT convert step folds it.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
        >>> _ = fuse(model)
        >>> type(model[1]).__name__
        'Identity'
    """
    if model.training != qat:
        raise ValueError("fuse folds running BatchNorm statistics: call model.eval() first" if not qat else
                         "fuse(qat=True) keeps BatchNorm training: call model.train() first")
    if pairs is None:
        pairs = [
            [f"{prefix}.{a}" if prefix else a, f"{prefix}.{b}" if prefix else b]
            for prefix, seq in model.named_modules()
            if isinstance(seq, nn.Sequential)
            for (a, first), (b, second) in zip(list(seq.named_children()), list(seq.named_children())[1:])
            if isinstance(first, tuple(CONV_BN) if qat else _CONVS + _TRANSPOSED + (nn.Linear,)) and isinstance(second, _NORMS)
        ]
    plan = [(model.get_submodule(p[0]), model.get_submodule(p[1]), p) for p in pairs]
    seen: dict[int, str] = {}
    for layer, norm, names in plan:  # validate every pair before changing anything
        _check_pair(layer, norm, names)
        if qat and type(layer) not in CONV_BN:
            raise ValueError(f"fuse(qat=True) fuses Conv1d/2d/3d with BatchNorm; received {names[0]!r} ({type(layer).__name__})")
        for module, name in ((layer, names[0]), (norm, names[1])):
            if id(module) in seen:
                raise ValueError(f"fuse folds each layer and BatchNorm once; {name!r} is in two pairs")
            seen[id(module)] = name
    for layer, norm, names in plan:
        if qat:
            set_submodule(model, names[0], CONV_BN[type(layer)].from_pair(layer, norm))
        else:
            _fold(layer, norm)
        set_submodule(model, names[1], nn.Identity())
    return model


def _check_pair(layer, norm, names) -> None:
    if not isinstance(layer, _CONVS + _TRANSPOSED + (nn.Linear,)) or not isinstance(norm, _NORMS):
        raise ValueError(f"fuse folds a BatchNorm into a Conv/ConvTranspose/Linear; received {names[0]!r} "
                         f"({type(layer).__name__}) and {names[1]!r} ({type(norm).__name__})")
    if isinstance(layer.weight, QuantizedTensor):
        raise ValueError(f"fuse scales the float weight of {names[0]!r}, which is already quantized "
                         f"({type(layer.weight).__name__}): fold BatchNorm first, then quantize")
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if norm.num_features != channels or norm.running_mean is None:
        raise ValueError(f"{names[1]!r} needs running statistics over {channels} channels to fold into {names[0]!r}; "
                         f"received num_features={norm.num_features}, track_running_stats={norm.track_running_stats}")


@torch.no_grad()
def _fold(layer, norm) -> None:
    """W' = W * gamma / sigma per output channel; b' = (b - mean) * gamma / sigma + beta."""
    factor = bn_factor(norm)  # (C_out,)
    groups = layer.groups if isinstance(layer, _TRANSPOSED) else None
    layer.weight.copy_(scale_output_channels(layer.weight, factor, groups))
    new_bias = folded_bias(layer.bias, norm, factor)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype))
    else:
        layer.bias.copy_(new_bias)
