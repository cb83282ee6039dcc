"""Quantized tensor subclasses."""

from .activation import ActivationQuant, DynamicActivationTensor, StaticActivationTensor
from .base import QuantizedTensor
from .blockwise import BlockQuantizedTensor
from .float8 import Float8Tensor
from .int4 import Int4Tensor
from .int8 import Int8Tensor

__all__ = [
    "ActivationQuant",
    "BlockQuantizedTensor",
    "DynamicActivationTensor",
    "Float8Tensor",
    "Int4Tensor",
    "Int8Tensor",
    "QuantizedTensor",
    "StaticActivationTensor",
]
