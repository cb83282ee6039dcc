"""Quantized tensor subclasses."""

from ..specs import ActivationQuant
from .activation import DynamicActivationTensor, StaticActivationTensor
from .base import QuantizedTensor
from .blockwise import BlockQuantizedTensor
from .float8 import Float8Tensor
from .int4 import Int4Tensor
from .int8 import Int8Tensor
from .intx import IntxTensor
from .smoothed import SmoothedTensor

__all__ = [
    "ActivationQuant",
    "BlockQuantizedTensor",
    "DynamicActivationTensor",
    "Float8Tensor",
    "Int4Tensor",
    "Int8Tensor",
    "IntxTensor",
    "QuantizedTensor",
    "SmoothedTensor",
    "StaticActivationTensor",
]
