"""BatchNorm folding arithmetic shared by :func:`lowbit.fuse` and QAT's Conv-BN modules, so both fold alike."""

from __future__ import annotations

import torch
import torch.nn as nn


def bn_factor(norm: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """gamma / sqrt(running_var + eps) per channel (C,)."""
    gamma = norm.weight if norm.affine else torch.ones_like(norm.running_mean)
    return gamma / torch.sqrt(norm.running_var + norm.eps)


def folded_bias(bias: torch.Tensor | None, norm: nn.modules.batchnorm._BatchNorm, factor: torch.Tensor) -> torch.Tensor:
    """b' = (b - mean) * factor + beta (a missing bias counts as 0)."""
    beta = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
    bias = bias if bias is not None else torch.zeros_like(norm.running_mean)
    return (bias - norm.running_mean) * factor + beta


def scale_output_channels(weight: torch.Tensor, factor: torch.Tensor, transposed_groups: int | None = None) -> torch.Tensor:
    """W * factor per output channel: axis 0 of a Conv/Linear weight (C_out, ...); axis 1 within each of the
    ``transposed_groups`` groups of a ConvTranspose weight (C_in, C_out / groups, *k)."""
    if transposed_groups is None:
        return weight * factor.view(-1, *([1] * (weight.dim() - 1)))
    groups = transposed_groups
    view = weight.view(groups, weight.shape[0] // groups, weight.shape[1], *weight.shape[2:])
    return (view * factor.view(groups, 1, -1, *([1] * (weight.dim() - 2)))).view(weight.shape)
