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

from .tensors.base import QuantizedTensor

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fuse(model: nn.Module, pairs: Sequence[Sequence[str]] | None = None) -> nn.Module:
    """Fold BatchNorm layers into the preceding Conv/ConvTranspose/Linear, in place.

    Args:
        model: a model in eval mode (training-mode BatchNorm uses batch statistics: nothing to fold).
        pairs: ``[layer_name, batchnorm_name]`` lists (a third name, e.g. a ReLU, is allowed and kept);
            default: every such pair adjacent in an nn.Sequential.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
        >>> _ = fuse(model)
        >>> type(model[1]).__name__
        'Identity'
    """
    if model.training:
        raise ValueError("fuse folds running BatchNorm statistics: call model.eval() first")
    if pairs is None:
        pairs = [
            [f"{prefix}.{a}" if prefix else a, f"{prefix}.{b}" if prefix else b]
            for prefix, seq in model.named_modules()
            if isinstance(seq, nn.Sequential)
            for (a, first), (b, second) in zip(list(seq.named_children()), list(seq.named_children())[1:])
            if isinstance(first, _CONVS + _TRANSPOSED + (nn.Linear,)) and isinstance(second, _NORMS)
        ]
    plan = [(model.get_submodule(p[0]), model.get_submodule(p[1]), p) for p in pairs]
    seen: dict[int, str] = {}
    for layer, norm, names in plan:  # validate every pair before changing anything
        _check_pair(layer, norm, names)
        for module, name in ((layer, names[0]), (norm, names[1])):
            if id(module) in seen:
                raise ValueError(f"fuse folds each layer and BatchNorm once; {name!r} is in two pairs")
            seen[id(module)] = name
    for layer, norm, names in plan:
        _fold(layer, norm)
        parent, _, child = names[1].rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Identity())
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
    gamma = norm.weight if norm.affine else torch.ones_like(norm.running_mean)
    beta = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
    factor = gamma / torch.sqrt(norm.running_var + norm.eps)  # (C_out,)
    weight = layer.weight
    if isinstance(layer, _TRANSPOSED):  # (C_in, C_out / groups, *k): output channels on axis 1, per group
        groups = layer.groups
        view = weight.view(groups, weight.shape[0] // groups, weight.shape[1], *weight.shape[2:])
        view.mul_(factor.view(groups, 1, -1, *([1] * (weight.dim() - 2))))
    else:  # (C_out, ...): output channels on axis 0
        weight.mul_(factor.view(-1, *([1] * (weight.dim() - 1))))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(norm.running_mean)
    new_bias = (bias - norm.running_mean) * factor + beta
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias.to(weight.dtype))
    else:
        layer.bias.copy_(new_bias)
