"""lowbit: quantize PyTorch models to int8, int4 and float8.

Example:
    >>> import torch, lowbit
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    >>> _ = lowbit.quantize_(model, lowbit.Int8WeightOnly())
"""

from . import kernels
from .version import __version__
from .api import default_filter, quantize_, register_handler
from .algorithm_options import AWQ, GPTQ
from .calibration import NotCalibratedError, calibrate, convert, prepare
from .fuse import fuse
from .configs import (
    Float8DynamicActivation,
    Float8WeightOnly,
    Int4WeightOnly,
    Int8DynamicActivation,
    Int8WeightOnly,
    IntxWeightOnly,
    QuantConfig,
    StaticFloat8,
    StaticInt8,
    config_from_name,
)
from .modules import QuantizedLinear
from . import qat
from .qat import QATConfig
from .specs import ActivationSpec, QuantSpec, WeightSpec
from . import serialization
from .serialization import CheckpointError, load, load_pretrained, save
from .tensors import (
    ActivationQuant,
    DynamicActivationTensor,
    Float8Tensor,
    Int4Tensor,
    Int8Tensor,
    IntxTensor,
    QuantizedTensor,
    SmoothedTensor,
    StaticActivationTensor,
)


__all__ = [
    "ActivationQuant",
    "CheckpointError",
    "DynamicActivationTensor",
    "Float8DynamicActivation",
    "Float8Tensor",
    "Float8WeightOnly",
    "Int4Tensor",
    "Int4WeightOnly",
    "Int8DynamicActivation",
    "Int8Tensor",
    "Int8WeightOnly",
    "IntxTensor",
    "IntxWeightOnly",
    "NotCalibratedError",
    "ActivationSpec",
    "AWQ",
    "GPTQ",
    "QATConfig",
    "QuantConfig",
    "QuantSpec",
    "WeightSpec",
    "QuantizedLinear",
    "QuantizedTensor",
    "SmoothedTensor",
    "StaticActivationTensor",
    "StaticFloat8",
    "StaticInt8",
    "calibrate",
    "config_from_name",
    "convert",
    "default_filter",
    "fuse",
    "kernels",
    "load",
    "load_pretrained",
    "prepare",
    "qat",
    "quantize_",
    "register_handler",
    "save",
    "serialization",
]
