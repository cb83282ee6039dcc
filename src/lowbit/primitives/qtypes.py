"""The frozen registry of quantized value types, looked up by name."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch


@dataclass(frozen=True)
class QType:
    """A quantized value type.

    Attributes:
        name: registry name, e.g. ``"int4"``.
        storage: dtype of one unpacked value (int4 values live in int8 before packing).
        qmin: smallest representable value.
        qmax: largest representable value.
        bits: bits per value; below 8 two values share a byte once packed.
        is_float: float8 types scale without a zero point and cast with saturation.
    """

    name: str
    storage: torch.dtype
    qmin: float
    qmax: float
    bits: int
    is_float: bool = False

    @property
    def packed(self) -> bool:
        return self.bits < 8


def _float8(name: str, dtype: torch.dtype) -> QType:
    fmax = torch.finfo(dtype).max
    return QType(name, dtype, -fmax, fmax, 8, is_float=True)


QTYPES = MappingProxyType(
    {
        "int8": QType("int8", torch.int8, -128, 127, 8),
        "uint8": QType("uint8", torch.uint8, 0, 255, 8),
        "int4": QType("int4", torch.int8, -8, 7, 4),
        "uint4": QType("uint4", torch.uint8, 0, 15, 4),
        **{f"int{b}": QType(f"int{b}", torch.int8, -(1 << b - 1), (1 << b - 1) - 1, b) for b in (2, 3, 5, 6, 7)},
        **{f"uint{b}": QType(f"uint{b}", torch.uint8, 0, (1 << b) - 1, b) for b in (2, 3, 5, 6, 7)},
        "float8_e4m3fn": _float8("float8_e4m3fn", torch.float8_e4m3fn),
        "float8_e5m2": _float8("float8_e5m2", torch.float8_e5m2),
    }
)


def get_qtype(qtype: str | QType) -> QType:
    """Return the registered QType for a name (a QType passes through).

    Example:
        >>> get_qtype("int4").qmax
        7
    """
    if isinstance(qtype, QType):
        return qtype
    try:
        return QTYPES[qtype]
    except KeyError:
        raise ValueError(f"unknown qtype {qtype!r}; expected one of {sorted(QTYPES)}") from None


def float8_qtype(dtype: torch.dtype) -> QType:
    """Return the QType of a torch float8 dtype, raising for any other dtype."""
    for qt in QTYPES.values():
        if qt.is_float and qt.storage == dtype:
            return qt
    names = [str(q.storage) for q in QTYPES.values() if q.is_float]
    raise ValueError(f"expected a float8 dtype, one of {names}; received {dtype}")
