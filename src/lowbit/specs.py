"""Plain-data quantization specs: what every flow turns into its own objects.

A config (:mod:`lowbit.configs`) yields one :class:`QuantSpec`: how its weights are quantized
(:class:`WeightSpec`) and how activations are, if at all (:class:`ActivationSpec`). ``quantize_`` turns a
weight spec into a quantized tensor, the static flow turns an activation spec into an observer, and a
checkpoint header stores the spec, so a file says exactly how it was quantized. Specs are frozen, hashable
and JSON round-trippable (:func:`spec_to_json` / :func:`spec_from_json`); they hold no kernel choice, which
is made where the model runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from .primitives.blocks import per_axis_block, per_group_block, per_token_block
from .primitives.qtypes import get_qtype

WEIGHT_GRANULARITIES = ("per_channel", "per_group", "per_tensor")
ACTIVATION_GRANULARITIES = ("per_token", "per_tensor")
ACTIVATION_MODES = ("dynamic", "static")
# How a weight's values and qparams are chosen. rtn: round to nearest of each block's min/max range; hqq: qparams fit
# without data (half-quadratic); gptq, awq, smoothquant: chosen from calibration data (lowbit.algorithms).
WEIGHT_ALGORITHMS = ("rtn", "hqq", "gptq", "awq", "smoothquant")
DATA_DRIVEN_ALGORITHMS = ("gptq", "awq", "smoothquant")
SCALE_DTYPES = ("float32",)


@dataclass(frozen=True)
class ActivationQuant:
    """How activations are quantized when a quantized layer runs: what a kernel needs to know.

    Attributes:
        qtype: ``"int8"`` or a float8 qtype name.
        granularity: ``"per_token"`` (one scale per row of the last dim) or ``"per_tensor"``.
        symmetric: symmetric range, or asymmetric with an integer zero point (integer qtypes).
    """

    qtype: str = "int8"
    granularity: str = "per_token"
    symmetric: bool = True

    def __post_init__(self):
        qt = get_qtype(self.qtype)
        if qt.bits != 8:
            raise ValueError(f"activation qtype must be one of the 8-bit qtypes (int8, uint8, float8_*); received {self.qtype!r}")
        if self.granularity not in ACTIVATION_GRANULARITIES:
            raise ValueError(f"activation granularity must be one of {ACTIVATION_GRANULARITIES}; received {self.granularity!r}")
        if qt.is_float and not self.symmetric:
            raise ValueError(f"{self.qtype} activations are symmetric; received symmetric=False")


@dataclass(frozen=True)
class WeightSpec:
    """How a weight is quantized.

    Attributes:
        scheme: the registered weight scheme (``"int8"``, ``"int4"``, ``"intx"``, ``"float8"``).
        qtype: value type (``"int8"``, ``"uint4"``, ``"int3"``, ``"float8_e4m3fn"``, ...).
        granularity: ``"per_channel"`` (one scale per output channel), ``"per_group"`` (``group_size``
            consecutive input features) or ``"per_tensor"``.
        group_size: the group length for ``"per_group"``, else None.
        symmetric: no zero point (signed and float qtypes) or an integer zero point (unsigned qtypes).
        scale_dtype: dtype name of the scales; its smallest normal is the scale floor.
        zero_point_dtype: dtype name of the zero points (the qtype's storage), None when symmetric.
        algorithm: how values, scales and zero points are chosen (:data:`WEIGHT_ALGORITHMS`): ``"rtn"`` rounds
            to nearest of each block's range, ``"hqq"`` fits the qparams without data, ``"gptq"`` / ``"awq"`` /
            ``"smoothquant"`` use calibration data (``smoothquant`` goes with an activation spec's ``smoothing``).

    Example:
        >>> WeightSpec("int4", "uint4", "per_group", 32, symmetric=False).block_size((8, 64))
        (1, 32)
    """

    scheme: str
    qtype: str
    granularity: str
    group_size: int | None = None
    symmetric: bool = True
    scale_dtype: str = "float32"
    zero_point_dtype: str | None = None
    algorithm: str = "rtn"

    def __post_init__(self):
        qt = get_qtype(self.qtype)
        if self.granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(f"weight granularity must be one of {WEIGHT_GRANULARITIES}; received {self.granularity!r}")
        if (self.granularity == "per_group") != (self.group_size is not None):
            raise ValueError(f"group_size goes with per_group granularity only; received {self.granularity!r} and "
                             f"group_size={self.group_size!r}")
        signed = qt.is_float or qt.qmin < 0
        if self.symmetric != signed:
            raise ValueError(f"{qt.name} weights are {'symmetric' if signed else 'affine'}; received symmetric={self.symmetric}")
        expected_zero = None if signed else str(qt.storage).removeprefix("torch.")
        if self.zero_point_dtype != expected_zero:
            raise ValueError(f"{qt.name} weights have zero points of dtype {expected_zero}; received {self.zero_point_dtype!r}")
        if self.scale_dtype not in SCALE_DTYPES or self.algorithm not in WEIGHT_ALGORITHMS:
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES} and algorithm one of {WEIGHT_ALGORITHMS}; received "
                             f"{self.scale_dtype!r}, {self.algorithm!r}")
        if self.algorithm == "hqq" and qt.is_float:
            raise ValueError(f"hqq fits integer grids; received the float qtype {qt.name}")

    @property
    def data_driven(self) -> bool:
        """Whether the algorithm needs calibration data (``prepare`` / ``calibrate`` / ``convert``)."""
        return self.algorithm in DATA_DRIVEN_ALGORITHMS

    @property
    def bits(self) -> int:
        return get_qtype(self.qtype).bits

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.scale_dtype)

    def block_size(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The block of a linear or embedding weight of ``shape`` (out, in): per group along the input
        features, one per output row, or the whole tensor."""
        if self.granularity == "per_group":
            return per_group_block(shape, self.group_size)
        if self.granularity == "per_tensor":
            return tuple(shape)
        return per_axis_block(shape, 0)


def weight_spec(scheme: str, qtype: str, group_size: int | None = None, per_tensor: bool = False,
                algorithm: str = "rtn") -> WeightSpec:
    """A weight spec with symmetry and zero-point dtype following from the qtype.

    Example:
        >>> weight_spec("int8", "int8").granularity
        'per_channel'
    """
    qt = get_qtype(qtype)
    affine = not qt.is_float and qt.qmin == 0
    granularity = "per_tensor" if per_tensor else "per_group" if group_size is not None else "per_channel"
    zero = str(qt.storage).removeprefix("torch.") if affine else None
    return WeightSpec(scheme, qt.name, granularity, group_size, not affine, zero_point_dtype=zero, algorithm=algorithm)


@dataclass(frozen=True)
class ActivationSpec:
    """How a layer's input activations are quantized.

    Attributes:
        mode: ``"dynamic"`` (scales computed per call) or ``"static"`` (scales from calibration).
        qtype: ``"int8"`` or a float8 qtype name.
        granularity: ``"per_token"`` or ``"per_tensor"`` (static activations are per tensor).
        symmetric: no zero point, or an integer zero point (int8).
        observer: static only: the observer that picks the range (``"minmax"``, ``"histogram"``, ...).
        smoothing: the SmoothQuant strength alpha, or None (the weight spec's algorithm is then not ``"smoothquant"``).
    """

    mode: str
    qtype: str
    granularity: str
    symmetric: bool
    observer: str | None = None
    smoothing: float | None = None

    def __post_init__(self):
        if self.mode not in ACTIVATION_MODES:
            raise ValueError(f"activation mode must be one of {ACTIVATION_MODES}; received {self.mode!r}")
        static = self.mode == "static"
        if static and (self.granularity != "per_tensor" or self.observer is None):
            raise ValueError(f"static activations are per tensor with an observer; received {self.granularity!r}, "
                             f"observer={self.observer!r}")
        if not static and self.observer is not None:
            raise ValueError(f"dynamic activations have no observer; received observer={self.observer!r}")
        ActivationQuant(self.qtype, self.granularity, self.symmetric)  # raises for a bad qtype, granularity or symmetry

    @property
    def quant(self) -> ActivationQuant:
        """What the kernels need: qtype, granularity, symmetry."""
        return ActivationQuant(self.qtype, self.granularity, self.symmetric)

    def block_size(self, shape: Sequence[int]) -> tuple[int, ...]:
        return per_token_block(shape) if self.granularity == "per_token" else tuple(shape)


@dataclass(frozen=True)
class QuantSpec:
    """A config's whole description: its weight spec and its activation spec (None: weight-only)."""

    weight: WeightSpec
    activation: ActivationSpec | None = None

    def __post_init__(self):
        smoothing = self.activation is not None and self.activation.smoothing is not None
        if smoothing != (self.weight.algorithm == "smoothquant"):
            raise ValueError(f"SmoothQuant sets the weight algorithm 'smoothquant' and the activation smoothing together; "
                             f"received algorithm {self.weight.algorithm!r} and smoothing "
                             f"{None if self.activation is None else self.activation.smoothing!r}")


_SPEC_TYPES = {"weight": WeightSpec, "activation": ActivationSpec}
_JSON_TYPES = {"str": str, "bool": bool, "int": int, "float": (int, float), "None": type(None)}


def spec_to_json(spec: QuantSpec) -> dict:
    """``spec`` as a JSON-safe dict.

    Example:
        >>> spec_to_json(QuantSpec(weight_spec("int8", "int8")))["weight"]["qtype"]
        'int8'
    """
    return {name: None if part is None else dataclasses.asdict(part) for name, part in
            (("weight", spec.weight), ("activation", spec.activation))}


def spec_from_json(value) -> QuantSpec:
    """The spec a :func:`spec_to_json` dict describes, every field type-checked and the spec validated.

    Raises:
        ValueError: not such a dict, or an invalid spec.
    """
    value = _upgraded(value)
    if not isinstance(value, dict) or set(value) != set(_SPEC_TYPES):
        raise ValueError(f"expected an object with the fields {sorted(_SPEC_TYPES)}; received {value!r}")
    parts = {}
    for name, cls in _SPEC_TYPES.items():
        raw = value[name]
        if raw is None and name == "activation":
            parts[name] = None
            continue
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if not isinstance(raw, dict) or set(raw) != set(fields):
            raise ValueError(f"{name}: expected the fields {sorted(fields)}; received {raw!r}")
        for key, item in raw.items():
            allowed = tuple(_JSON_TYPES[t.strip()] for t in fields[key].type.split("|"))
            if isinstance(item, bool) and bool not in allowed or not isinstance(item, allowed):
                raise ValueError(f"{name}.{key}: expected {fields[key].type}; received {item!r}")
        parts[name] = cls(**raw)
    return QuantSpec(**parts)


def _upgraded(value):
    """A spec written by format 2 (its weight's ``qparams`` was always ``"minmax"``) in today's fields: the
    algorithm was SmoothQuant where activations were smoothed, round to nearest otherwise."""
    weight = value.get("weight") if isinstance(value, dict) else None
    if not isinstance(weight, dict) or weight.get("qparams") != "minmax" or "algorithm" in weight:
        return value
    activation = value.get("activation")
    smoothed = isinstance(activation, dict) and activation.get("smoothing") is not None
    weight = {k: v for k, v in weight.items() if k != "qparams"} | {"algorithm": "smoothquant" if smoothed else "rtn"}
    return {**value, "weight": weight}


def describe_spec(spec: QuantSpec) -> str:
    """A short human-readable summary, e.g. ``"uint4 per_group(32) weights, float activations"``.

    Example:
        >>> describe_spec(QuantSpec(weight_spec("int4", "uint4", 32)))
        'uint4 per_group(32) weights, float activations'
    """
    w = spec.weight
    weight = f"{w.qtype} {w.granularity}{f'({w.group_size})' if w.group_size else ''} weights"
    if w.algorithm not in ("rtn", "smoothquant"):  # smoothing shows with the activations
        weight += f" ({w.algorithm})"
    a = spec.activation
    if a is None:
        return f"{weight}, float activations"
    extra = "".join(f", {k} {v}" for k, v in (("observer", a.observer), ("smoothing", a.smoothing)) if v is not None)
    return f"{weight}, {a.mode} {a.qtype} {a.granularity} {'symmetric' if a.symmetric else 'affine'} activations{extra}"
