"""Conv-BatchNorm for QAT: BatchNorm statistics keep training while the conv sees its BN-folded weight
fake-quantized, as the converted (folded, quantized) conv will.

In training mode the conv runs with ``W * f`` (``f = gamma / sqrt(running_var + eps)``, fake-quantized once
QAT prepared it), its output is divided by ``f`` and BatchNorm normalizes it with the batch's statistics,
updating its running ones (the torch.ao ``ConvBn2d`` scheme). After :meth:`ConvBn.freeze_bn_stats`, or in
eval mode, the layer is exactly the folded conv: ``conv(x, fq(W * f), (b - mean) * f + beta)``, which
:meth:`ConvBn.folded` returns as a plain convolution for the convert step.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..bn_folding import bn_factor, folded_bias, scale_output_channels


class ConvBn:
    """Mixin of :class:`ConvBn1d`, :class:`ConvBn2d` and :class:`ConvBn3d`: a convolution holding the BatchNorm
    that follows it (``bn``) and, once QAT prepared it, its weight fake quantizer (``weight_fake_quant``)."""

    conv_type: type

    @classmethod
    def from_pair(cls, conv: nn.Module, bn: nn.Module) -> "ConvBn":
        """The fused layer, sharing ``conv``'s parameters and holding ``bn`` itself."""
        fused = cls(**_conv_args(conv))
        fused.weight, fused.bias = conv.weight, conv.bias
        fused.bn, fused.weight_fake_quant, fused.bn_frozen = bn, None, False
        fused.train(conv.training)
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training_stats = self.training and not self.bn_frozen
        factor = _saved_factor(self.bn) if training_stats and torch.compiler.is_compiling() else bn_factor(self.bn)
        weight = scale_output_channels(self.weight, factor)
        if self.weight_fake_quant is not None:
            weight = self.weight_fake_quant(weight)
        if not training_stats:
            return self._conv_forward(x, weight, folded_bias(self.bias, self.bn, factor))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = self._conv_forward(x, weight, None) / factor.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return self.bn(y)

    def freeze_bn_stats(self) -> None:
        """Stop updating BatchNorm's running statistics and use them in training too."""
        self.bn_frozen = True

    @torch.no_grad()
    def folded(self) -> nn.Module:
        """A plain convolution with BatchNorm folded in (float weight ``W * f``, bias ``(b - mean) * f + beta``)."""
        factor = bn_factor(self.bn)
        conv = self.conv_type(**{**_conv_args(self), "bias": True})
        conv.weight = nn.Parameter(scale_output_channels(self.weight, factor), self.weight.requires_grad)
        conv.bias = nn.Parameter(folded_bias(self.bias, self.bn, factor).to(self.weight.dtype), self.weight.requires_grad)
        conv.train(self.training)
        return conv


def _must_save(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE


def _save_everything():
    return create_selective_checkpoint_contexts(_must_save)


def _saved_factor(bn: nn.Module) -> torch.Tensor:
    """:func:`bn_factor` for a compiled training step: computed once and saved for the backward. The step reads
    ``running_var`` and BatchNorm then updates it in place; PyTorch 2.13's partitioner may recompute a read of a
    mutated buffer in the backward, after the update, giving wrong gradients (pytorch/pytorch PR 197039)."""
    return checkpoint(bn_factor, bn, use_reentrant=False, context_fn=_save_everything)


def _conv_args(conv: nn.Module) -> dict:
    """The constructor arguments of ``conv``'s shape and behaviour (its parameters are moved separately)."""
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta")


class ConvBn1d(ConvBn, nn.Conv1d):
    conv_type = nn.Conv1d


class ConvBn2d(ConvBn, nn.Conv2d):
    conv_type = nn.Conv2d


class ConvBn3d(ConvBn, nn.Conv3d):
    conv_type = nn.Conv3d


CONV_BN = {nn.Conv1d: ConvBn1d, nn.Conv2d: ConvBn2d, nn.Conv3d: ConvBn3d}
