"""Quantization configs: frozen dataclasses, dispatched by type to handlers in :mod:`lowbit.api`.

Each config validates its own fields on construction and knows how to quantize one weight.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .primitives.blocks import per_axis_block, per_group_block, per_token_block
from .primitives.qtypes import float8_qtype
from .tensors import ActivationQuant, DynamicActivationTensor, Float8Tensor, Int4Tensor, Int8Tensor
from .tensors.blockwise import with_packing

INT4_GROUP_SIZES = (32, 64, 128, 256)
FLOAT8_GRANULARITIES = ("per_row", "per_tensor")


class QuantConfig:
    """Base of all configs. ``supports_embedding`` says whether nn.Embedding weights may be quantized."""

    supports_embedding = False
    supports_conv = False  # Conv1d/2d/3d and ConvTranspose weights, per output channel
    scheme: str
    kernel: str
    qtype: str  # the weight's qtype name

    def label(self) -> str:
        """Class name with the fields that differ from their defaults, e.g. ``Int4WeightOnly(group_size=32)``."""
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) != f.default]
        return f"{type(self).__name__}({', '.join(changed)})"

    def group_size_for(self, in_features: int) -> int | None:
        """The block length along the reduction dim (None: the whole row)."""
        return getattr(self, "group_size", None)

    def check_weight(self, weight: torch.Tensor, name: str) -> None:
        """Raise ValueError if this config cannot quantize ``weight`` (nothing is changed)."""
        group = self.group_size_for(weight.shape[-1])
        if group is not None and weight.shape[-1] % group:
            raise ValueError(
                f"{type(self).__name__}(group_size={group}) needs the input features of {name} to be a multiple "
                f"of {group}; received weight shape {tuple(weight.shape)}"
            )

    def block_size_for(self, shape) -> tuple[int, ...]:
        """The block size this config gives a weight of ``shape`` (per-channel or per-group)."""
        group = getattr(self, "group_size", None)
        return per_group_block(shape, group) if group else per_axis_block(shape, 0)

    def quantize_weight(self, weight: torch.Tensor, name: str, block_size=None, groups=None) -> torch.Tensor:
        """Quantize one weight; a convolution's weight comes with its ``block_size`` (overriding
        :meth:`block_size_for`) and ``groups``."""
        raise NotImplementedError


def _check_group_size(config, allowed=None) -> None:
    group = config.group_size
    if group is None:
        return
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:  # True would become group size 1
        raise ValueError(f"{type(config).__name__} group_size must be a positive int or None; received {group!r}")
    if allowed is not None and group not in allowed:
        raise ValueError(f"{type(config).__name__} group_size must be one of {allowed}; received {group}")


def _check_types(config, bools: tuple[str, ...] = (), strs: tuple[str, ...] = ("kernel",)) -> None:
    """Fields that must be a bool or a str (an int where a bool belongs is refused, as a bool where an int does)."""
    for names, kind, what in ((bools, bool, "True or False"), (strs, str, "a str")):
        for name in names:
            value = getattr(config, name)
            if not isinstance(value, kind):
                raise ValueError(f"{type(config).__name__} {name} must be {what}; received {value!r} ({type(value).__name__})")


@dataclass(frozen=True)
class Int8WeightOnly(QuantConfig):
    """int8 weights (per-channel, or per-group with ``group_size``), float activations.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 32))
        >>> quantize_(model, Int8WeightOnly())  # doctest: +SKIP
    """

    group_size: int | None = None
    kernel: str = "auto"
    scheme = "int8"
    qtype = "int8"
    supports_embedding = True
    supports_conv = True

    def __post_init__(self):
        _check_types(self)
        _check_group_size(self)

    def quantize_weight(self, weight, name, block_size=None, groups=None):
        block = block_size or self.block_size_for(weight.shape)
        return with_packing(Int8Tensor.from_float(weight, block, kernel=self.kernel, name=name, groups=groups))


@dataclass(frozen=True)
class Int4WeightOnly(QuantConfig):
    """4-bit weights per group of ``group_size`` input features; asymmetric (uint4 + zero point) by default."""

    group_size: int = 128
    symmetric: bool = False
    kernel: str = "auto"
    scheme = "int4"

    @property
    def qtype(self) -> str:
        return "int4" if self.symmetric else "uint4"
    supports_embedding = True

    def __post_init__(self):
        _check_types(self, bools=("symmetric",))
        _check_group_size(self, INT4_GROUP_SIZES)

    def quantize_weight(self, weight, name, block_size=None, groups=None):
        block = block_size or self.block_size_for(weight.shape)
        return with_packing(Int4Tensor.from_float(weight, block, symmetric=self.symmetric, kernel=self.kernel, name=name))


@dataclass(frozen=True)
class Int8DynamicActivation(QuantConfig):
    """int8 activations quantized per token at run time, int8 per-channel weights.

    ``act_symmetric=False`` (default) gives activations an integer zero point, which keeps the
    full 8-bit range for one-sided inputs such as GELU outputs.
    """

    act_symmetric: bool = False
    group_size: int | None = None
    kernel: str = "auto"
    scheme = "int8_dynamic"
    qtype = "int8"

    def __post_init__(self):
        _check_types(self, bools=("act_symmetric",))
        _check_group_size(self)

    def quantize_weight(self, weight, name, block_size=None, groups=None):
        inner = Int8Tensor.from_float(weight, self.block_size_for(weight.shape), kernel=self.kernel, name=name)
        return DynamicActivationTensor.wrap(inner, ActivationQuant("int8", "per_token", self.act_symmetric))


@dataclass(frozen=True)
class Float8WeightOnly(QuantConfig):
    """float8 weights with one scale per output row, float activations."""

    float8_dtype: torch.dtype = torch.float8_e4m3fn
    kernel: str = "auto"
    scheme = "float8"
    supports_conv = True

    @property
    def qtype(self) -> str:
        return float8_qtype(self.float8_dtype).name
    supports_embedding = True

    def __post_init__(self):
        _check_types(self)
        float8_qtype(self.float8_dtype)

    def quantize_weight(self, weight, name, block_size=None, groups=None):
        block = block_size or self.block_size_for(weight.shape)
        return with_packing(Float8Tensor.from_float(weight, block, float8_dtype=self.float8_dtype, kernel=self.kernel, name=name, groups=groups))


@dataclass(frozen=True)
class Float8DynamicActivation(QuantConfig):
    """float8 activations (scaled per token or per tensor at run time) and float8 weights (per row or per tensor)."""

    granularity: str = "per_row"
    float8_dtype: torch.dtype = torch.float8_e4m3fn
    kernel: str = "auto"
    scheme = "float8_dynamic"

    @property
    def qtype(self) -> str:
        return float8_qtype(self.float8_dtype).name

    def __post_init__(self):
        _check_types(self, strs=("kernel", "granularity"))
        if self.granularity not in FLOAT8_GRANULARITIES:
            raise ValueError(f"granularity must be one of {FLOAT8_GRANULARITIES}; received {self.granularity!r}")
        float8_qtype(self.float8_dtype)

    def block_size_for(self, shape):
        return per_token_block(shape) if self.granularity == "per_row" else tuple(shape)

    def quantize_weight(self, weight, name, block_size=None, groups=None):
        per_row = self.granularity == "per_row"
        block = self.block_size_for(weight.shape)
        inner = Float8Tensor.from_float(weight, block, float8_dtype=self.float8_dtype, kernel=self.kernel, name=name, groups=groups)
        act = ActivationQuant(float8_qtype(self.float8_dtype).name, "per_token" if per_row else "per_tensor", True)
        return DynamicActivationTensor.wrap(inner, act)


CONFIGS = (Int8WeightOnly, Int4WeightOnly, Int8DynamicActivation, Float8WeightOnly, Float8DynamicActivation)


@dataclass(frozen=True)
class StaticInt8(QuantConfig):
    """Static int8: per-tensor activation scale (and zero point) from calibration, per-channel
    symmetric int8 weights (the x86 default). Use with ``prepare`` / ``calibrate`` / ``convert``.

    Args:
        act_symmetric: symmetric activations (no zero point) instead of affine.
        observer: ``"minmax"``, ``"moving_average"``, ``"histogram"`` or ``"percentile"``: picks the
            activation range (of the smoothed activation ``x / s`` when ``smoothing`` is set).
        smoothing: SmoothQuant strength alpha in [0, 1], or None. Each input channel c is divided by
            ``s_c = max|x_c|^alpha / max|W[:, c]|^(1 - alpha)`` before quantization and the weight's
            column c multiplied by it, moving activation outliers into the per-channel weight scales
            (``lowbit.calibrate`` fixes s in a first pass over the data; the observer watches ``x / s``
            in a second). The default ``"minmax"`` keeps the smoothed range whole: on all-MiniLM-L6-v2 it
            gives cos min 0.9945 against 0.9906 for ``"histogram"``, whose clipping costs more once
            smoothing has flattened the outliers (BENCHMARKS.md).
    """

    act_symmetric: bool = False
    observer: str = "minmax"
    smoothing: float | None = 0.8
    kernel: str = "auto"
    scheme = "int8_static"
    qtype = "int8"
    act_qtype = "int8"
    supports_conv = True

    def __post_init__(self):
        _check_types(self, bools=("act_symmetric",), strs=("kernel", "observer"))
        _check_observer(self.observer)
        alpha = self.smoothing
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1):
            raise ValueError(f"smoothing must be None or a number in [0, 1]; received {alpha!r}")

    def quantize_weight(self, weight, name, block_size=None, groups=None):
        return Int8Tensor.from_float(weight, block_size or self.block_size_for(weight.shape), kernel=self.kernel, name=name, groups=groups)


@dataclass(frozen=True)
class StaticFloat8(QuantConfig):
    """Static float8: per-tensor e4m3fn activation scale from calibration, per-row float8 weights."""

    float8_dtype: torch.dtype = torch.float8_e4m3fn
    observer: str = "minmax"
    kernel: str = "auto"
    scheme = "float8_static"
    smoothing = None
    supports_conv = True
    act_symmetric = True

    def __post_init__(self):
        _check_types(self, strs=("kernel", "observer"))
        float8_qtype(self.float8_dtype)
        _check_observer(self.observer)

    @property
    def qtype(self) -> str:
        return float8_qtype(self.float8_dtype).name

    act_qtype = qtype

    def quantize_weight(self, weight, name, block_size=None, groups=None):
        block = block_size or self.block_size_for(weight.shape)
        return Float8Tensor.from_float(weight, block, float8_dtype=self.float8_dtype, kernel=self.kernel, name=name, groups=groups)


OBSERVER_NAMES = ("minmax", "moving_average", "histogram", "percentile")
STATIC_CONFIGS = (StaticInt8, StaticFloat8)


def _check_observer(name: str) -> None:
    if name not in OBSERVER_NAMES:
        raise ValueError(f"observer must be one of {OBSERVER_NAMES}; received {name!r}")


NAMED_CONFIGS: dict[str, type[QuantConfig]] = {
    "int8-weight-only": Int8WeightOnly,
    "int4-weight-only": Int4WeightOnly,
    "int8-dynamic": Int8DynamicActivation,
    "float8-weight-only": Float8WeightOnly,
    "float8-dynamic": Float8DynamicActivation,
    "static-int8": StaticInt8,
    "static-float8": StaticFloat8,
}


def config_from_name(name: str, group_size: int | None = None) -> QuantConfig:
    """The config called ``name`` in :data:`NAMED_CONFIGS`, with its defaults and an optional ``group_size``.

    Example:
        >>> config_from_name("int4-weight-only", group_size=32)
        Int4WeightOnly(group_size=32, symmetric=False, kernel='auto')
    """
    config_type = NAMED_CONFIGS.get(name)
    if config_type is None:
        raise ValueError(f"unknown config name {name!r}; expected one of {', '.join(NAMED_CONFIGS)}")
    if group_size is None:
        return config_type()
    if "group_size" not in {f.name for f in fields(config_type)}:
        takes = ", ".join(n for n, t in NAMED_CONFIGS.items() if "group_size" in {f.name for f in fields(t)})
        raise ValueError(f"{name} has no group size (configs with one: {takes}); received group_size={group_size}")
    return config_type(group_size=group_size)
