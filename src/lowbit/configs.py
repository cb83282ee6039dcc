"""Quantization configs: frozen dataclasses, dispatched by type to handlers in :mod:`lowbit.api`.

Each config validates its own fields on construction and yields a plain-data :class:`~lowbit.specs.QuantSpec`
(:meth:`QuantConfig.spec`), which every flow turns into its own objects: quantized tensors (``quantize_``),
observers (the static flow), and in time fake quantizers and graph annotations. ``kernel`` is not part of the
spec: it is the kernel preference on the machine that runs the model.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from .algorithm_options import OPTIONS, algorithm_name
from .primitives.qtypes import QTYPES, float8_qtype
from .specs import ActivationSpec, QuantSpec, weight_spec
from .tensors.schemes import scheme_for

INT4_GROUP_SIZES = (32, 64, 128, 256)
INTX_BITS = (2, 3, 4, 5, 6, 7)
FLOAT8_GRANULARITIES = ("per_row", "per_tensor")
INTEGER_WEIGHT_ALGORITHMS = ("rtn", "hqq", "gptq", "awq")  # hqq fits integer grids only
FLOAT8_WEIGHT_ALGORITHMS = ("rtn", "gptq", "awq")
ACTIVATION_ALGORITHMS = ("rtn", "gptq", "smoothquant")  # configs that quantize activations
DEFAULT_SMOOTHING = 0.5  # SmoothQuant's alpha for dynamic activations (the paper's default)


class QuantConfig:
    """Base of all configs. ``supports_embedding`` says whether nn.Embedding weights may be quantized."""

    supports_embedding = False
    supports_conv = False  # Conv1d/2d/3d and ConvTranspose weights, per output channel
    kernel: str

    def spec(self) -> QuantSpec:
        """The plain-data description of this config's quantization."""
        raise NotImplementedError

    @property
    def scheme(self) -> str:
        """The registered scheme of the tensors this config makes (the kernel registry's key)."""
        spec = self.spec()
        return scheme_for(spec.weight.scheme, "none" if spec.activation is None else spec.activation.mode).name

    @property
    def qtype(self) -> str:
        """The weight's qtype name."""
        return self.spec().weight.qtype

    def label(self) -> str:
        """Class name with the fields that differ from their defaults, e.g. ``Int4WeightOnly(group_size=32)``."""
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) != f.default]
        return f"{type(self).__name__}({', '.join(changed)})"

    def check_weight(self, weight: torch.Tensor, name: str) -> None:
        """Raise ValueError if this config cannot quantize ``weight`` (nothing is changed)."""
        group = self.spec().weight.group_size
        if group is not None and weight.shape[-1] % group:
            raise ValueError(
                f"{type(self).__name__}(group_size={group}) needs the input features of {name} to be a multiple "
                f"of {group}; received weight shape {tuple(weight.shape)}"
            )

    def block_size_for(self, shape) -> tuple[int, ...]:
        """The block size this config gives a linear or embedding weight of ``shape`` (per-channel or per-group)."""
        return self.spec().weight.block_size(shape)


def integer_qtype(bits: int, signed: bool) -> str:
    """The registered integer qtype of ``bits`` bits, signed (symmetric) or unsigned (affine)."""
    for qt in QTYPES.values():
        if not qt.is_float and qt.bits == bits and (qt.qmin < 0) == signed:
            return qt.name
    raise ValueError(f"no {'signed' if signed else 'unsigned'} {bits}-bit qtype is registered")


def _check_group_size(config, allowed=None) -> None:
    group = config.group_size
    if group is None:
        return
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:  # True would become group size 1
        raise ValueError(f"{type(config).__name__} group_size must be a positive int or None; received {group!r}")
    if allowed is not None and group not in allowed:
        raise ValueError(f"{type(config).__name__} group_size must be one of {allowed}; received {group}")


def _check_algorithm(config, allowed: tuple[str, ...]) -> None:
    """``algorithm`` is a name in ``allowed`` or the options object of one (:mod:`lowbit.algorithm_options`)."""
    name = algorithm_name(config.algorithm)
    options = OPTIONS.get(name)
    if name not in allowed or not isinstance(config.algorithm, str) and type(config.algorithm) is not options:
        raise ValueError(f"{type(config).__name__} algorithm must be one of {allowed} (by name, or as its options "
                         f"object such as lowbit.GPTQ(act_order=True)); received {config.algorithm!r}")


def _check_smoothing(config, default: float | None) -> None:
    """``smoothing`` is SmoothQuant's alpha in [0, 1]; set to another value than its default, it needs
    ``algorithm="smoothquant"`` (an option that would change nothing is refused)."""
    alpha = config.smoothing
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1):
        raise ValueError(f"{type(config).__name__} smoothing must be a number in [0, 1]; received {alpha!r}")
    if algorithm_name(config.algorithm) != "smoothquant" and alpha != default:
        raise ValueError(f"{type(config).__name__} smoothing is SmoothQuant's strength: it needs algorithm='smoothquant'; "
                         f"received algorithm={config.algorithm!r}, smoothing={alpha!r}")
    if algorithm_name(config.algorithm) == "smoothquant" and alpha is None:
        raise ValueError(f"{type(config).__name__}(algorithm='smoothquant') needs a smoothing strength in [0, 1]; received None")


def _smoothing(config) -> float | None:
    return float(config.smoothing) if algorithm_name(config.algorithm) == "smoothquant" else None


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
    algorithm: str = "rtn"
    supports_embedding = True
    supports_conv = True

    def __post_init__(self):
        _check_types(self)
        _check_group_size(self)
        _check_algorithm(self, INTEGER_WEIGHT_ALGORITHMS)

    def spec(self):
        return QuantSpec(weight_spec("int8", "int8", self.group_size, algorithm=algorithm_name(self.algorithm)))


@dataclass(frozen=True)
class Int4WeightOnly(QuantConfig):
    """4-bit weights per group of ``group_size`` input features; asymmetric (uint4 + zero point) by default."""

    group_size: int = 128
    symmetric: bool = False
    kernel: str = "auto"
    algorithm: str = "rtn"
    supports_embedding = True

    def __post_init__(self):
        _check_types(self, bools=("symmetric",))
        _check_group_size(self, INT4_GROUP_SIZES)
        _check_algorithm(self, INTEGER_WEIGHT_ALGORITHMS)

    def spec(self):
        qtype = "int4" if self.symmetric else "uint4"
        return QuantSpec(weight_spec("int4", qtype, self.group_size, algorithm=algorithm_name(self.algorithm)))


@dataclass(frozen=True)
class IntxWeightOnly(QuantConfig):
    """``bits``-bit weights (2 to 7) per group of ``group_size`` input features, bit-packed; asymmetric
    (unsigned values + a zero point per group) by default, symmetric (signed, no zero point) on request.
    ``group_size=None`` gives one scale per output channel, the granularity convolutions take (a filter_fn
    selecting Conv/ConvTranspose layers quantizes them per output channel, values packed along the last dim).

    Example:
        >>> IntxWeightOnly(bits=3).spec().weight.qtype
        'uint3'
    """

    bits: int
    group_size: int = 32
    symmetric: bool = False
    kernel: str = "auto"
    algorithm: str = "rtn"
    supports_embedding = True
    supports_conv = True

    def __post_init__(self):
        _check_types(self, bools=("symmetric",))
        if isinstance(self.bits, bool) or self.bits not in INTX_BITS:
            raise ValueError(f"IntxWeightOnly bits must be one of {INTX_BITS}; received {self.bits!r}")
        _check_group_size(self, INT4_GROUP_SIZES)
        _check_algorithm(self, INTEGER_WEIGHT_ALGORITHMS)

    def spec(self):
        qtype = integer_qtype(self.bits, signed=self.symmetric)
        return QuantSpec(weight_spec("intx", qtype, self.group_size, algorithm=algorithm_name(self.algorithm)))


@dataclass(frozen=True)
class Int8DynamicActivation(QuantConfig):
    """int8 activations quantized per token at run time, int8 per-channel weights.

    ``act_symmetric=False`` (default) gives activations an integer zero point, which keeps the
    full 8-bit range for one-sided inputs such as GELU outputs.
    """

    act_symmetric: bool = False
    group_size: int | None = None
    kernel: str = "auto"
    algorithm: str = "rtn"
    smoothing: float = DEFAULT_SMOOTHING

    def __post_init__(self):
        _check_types(self, bools=("act_symmetric",))
        _check_group_size(self)
        _check_algorithm(self, ACTIVATION_ALGORITHMS)
        _check_smoothing(self, DEFAULT_SMOOTHING)

    def spec(self):
        activation = ActivationSpec("dynamic", "int8", "per_token", self.act_symmetric, smoothing=_smoothing(self))
        return QuantSpec(weight_spec("int8", "int8", self.group_size, algorithm=algorithm_name(self.algorithm)), activation)


@dataclass(frozen=True)
class Float8WeightOnly(QuantConfig):
    """float8 weights with one scale per output row, float activations."""

    float8_dtype: torch.dtype = torch.float8_e4m3fn
    kernel: str = "auto"
    algorithm: str = "rtn"
    supports_conv = True
    supports_embedding = True

    def __post_init__(self):
        _check_types(self)
        float8_qtype(self.float8_dtype)
        _check_algorithm(self, FLOAT8_WEIGHT_ALGORITHMS)

    def spec(self):
        return QuantSpec(weight_spec("float8", float8_qtype(self.float8_dtype).name, algorithm=algorithm_name(self.algorithm)))


@dataclass(frozen=True)
class Float8DynamicActivation(QuantConfig):
    """float8 activations (scaled per token or per tensor at run time) and float8 weights (per row or per tensor)."""

    granularity: str = "per_row"
    float8_dtype: torch.dtype = torch.float8_e4m3fn
    kernel: str = "auto"
    algorithm: str = "rtn"
    smoothing: float = DEFAULT_SMOOTHING

    def __post_init__(self):
        _check_types(self, strs=("kernel", "granularity"))
        if self.granularity not in FLOAT8_GRANULARITIES:
            raise ValueError(f"granularity must be one of {FLOAT8_GRANULARITIES}; received {self.granularity!r}")
        float8_qtype(self.float8_dtype)
        _check_algorithm(self, ACTIVATION_ALGORITHMS)
        _check_smoothing(self, DEFAULT_SMOOTHING)

    def spec(self):
        qtype, per_row = float8_qtype(self.float8_dtype).name, self.granularity == "per_row"
        activation = ActivationSpec("dynamic", qtype, "per_token" if per_row else "per_tensor", True, smoothing=_smoothing(self))
        return QuantSpec(weight_spec("float8", qtype, per_tensor=not per_row, algorithm=algorithm_name(self.algorithm)), activation)


CONFIGS = (Int8WeightOnly, Int4WeightOnly, IntxWeightOnly, Int8DynamicActivation, Float8WeightOnly, Float8DynamicActivation)


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
    supports_conv = True

    def __post_init__(self):
        _check_types(self, bools=("act_symmetric",), strs=("kernel", "observer"))
        _check_observer(self.observer)
        _check_static_smoothing(self)

    def spec(self):
        smoothing = None if self.smoothing is None else float(self.smoothing)
        activation = ActivationSpec("static", "int8", "per_tensor", self.act_symmetric, self.observer, smoothing)
        return QuantSpec(weight_spec("int8", "int8", algorithm=_static_algorithm(smoothing)), activation)


@dataclass(frozen=True)
class StaticFloat8(QuantConfig):
    """Static float8: per-tensor e4m3fn activation scale from calibration, per-row float8 weights; ``smoothing``
    (SmoothQuant's alpha, or None) as in :class:`StaticInt8`."""

    float8_dtype: torch.dtype = torch.float8_e4m3fn
    observer: str = "minmax"
    kernel: str = "auto"
    smoothing: float | None = None
    supports_conv = True

    def __post_init__(self):
        _check_types(self, strs=("kernel", "observer"))
        float8_qtype(self.float8_dtype)
        _check_observer(self.observer)
        _check_static_smoothing(self)

    def spec(self):
        qtype, smoothing = float8_qtype(self.float8_dtype).name, None if self.smoothing is None else float(self.smoothing)
        activation = ActivationSpec("static", qtype, "per_tensor", True, self.observer, smoothing)
        return QuantSpec(weight_spec("float8", qtype, algorithm=_static_algorithm(smoothing)), activation)


OBSERVER_NAMES = ("minmax", "moving_average", "histogram", "percentile")
STATIC_CONFIGS = (StaticInt8, StaticFloat8)


def _check_static_smoothing(config) -> None:
    alpha = config.smoothing
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1):
        raise ValueError(f"smoothing must be None or a number in [0, 1]; received {alpha!r}")


def _static_algorithm(smoothing: float | None) -> str:
    """Static configs name SmoothQuant by its strength: the weight spec's algorithm follows from it."""
    return "rtn" if smoothing is None else "smoothquant"


def _check_observer(name: str) -> None:
    if name not in OBSERVER_NAMES:
        raise ValueError(f"observer must be one of {OBSERVER_NAMES}; received {name!r}")


NAMED_CONFIGS: dict[str, QuantConfig] = {  # the command line's names, each for a config with its defaults
    "int8-weight-only": Int8WeightOnly(),
    "int4-weight-only": Int4WeightOnly(),
    **{f"int{bits}-weight-only": IntxWeightOnly(bits=bits) for bits in INTX_BITS if bits != 4},
    "int8-dynamic": Int8DynamicActivation(),
    "float8-weight-only": Float8WeightOnly(),
    "float8-dynamic": Float8DynamicActivation(),
    "static-int8": StaticInt8(),
    "static-float8": StaticFloat8(),
}


def config_from_name(name: str, group_size: int | None = None, algorithm: str | None = None) -> QuantConfig:
    """The config called ``name`` in :data:`NAMED_CONFIGS`, with an optional ``group_size`` and ``algorithm``.

    Example:
        >>> config_from_name("int4-weight-only", group_size=32, algorithm="gptq").label()
        "Int4WeightOnly(group_size=32, algorithm='gptq')"
    """
    config = NAMED_CONFIGS.get(name)
    if config is None:
        raise ValueError(f"unknown config name {name!r}; expected one of {', '.join(NAMED_CONFIGS)}")
    for field, value in (("group_size", group_size), ("algorithm", algorithm)):
        if value is None:
            continue
        if field not in {f.name for f in fields(config)}:
            takes = ", ".join(n for n, c in NAMED_CONFIGS.items() if field in {f.name for f in fields(c)})
            raise ValueError(f"{name} has no {field.replace('_', ' ')} (configs with one: {takes}); received {field}={value}")
        config = replace(config, **{field: value})
    return config
