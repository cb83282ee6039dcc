"""Quantization-aware training: fake quantization with a straight-through estimator, converted exactly.

Example:
    >>> import torch, lowbit
    >>> from lowbit.qat import QATConfig
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 8))
    >>> _ = lowbit.quantize_(model, QATConfig(lowbit.Int8DynamicActivation()))
    >>> _ = lowbit.quantize_(model, QATConfig(lowbit.Int8DynamicActivation(), step="convert"))
"""

from .config import QATConfig
from .conv_bn import ConvBn, ConvBn1d, ConvBn2d, ConvBn3d
from .fake_quantizers import ActivationFakeQuantizer, WeightFakeQuantizer
from .flow import QATHandler, freeze_bn_stats, freeze_ranges, range_parameters, weight_fake_quantizer

__all__ = [
    "ActivationFakeQuantizer",
    "ConvBn",
    "ConvBn1d",
    "ConvBn2d",
    "ConvBn3d",
    "QATConfig",
    "QATHandler",
    "WeightFakeQuantizer",
    "freeze_bn_stats",
    "freeze_ranges",
    "range_parameters",
    "weight_fake_quantizer",
]
