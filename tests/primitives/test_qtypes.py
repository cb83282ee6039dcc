"""The frozen qtype registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lowbit.primitives import QTYPES, QType, float8_qtype, get_qtype

EXPECTED = {
    "int8": (torch.int8, -128, 127, 8, False),
    "uint8": (torch.uint8, 0, 255, 8, False),
    "int4": (torch.int8, -8, 7, 4, False),
    "uint4": (torch.uint8, 0, 15, 4, False),
    **{f"int{b}": (torch.int8, -(2 ** (b - 1)), 2 ** (b - 1) - 1, b, False) for b in (2, 3, 5, 6, 7)},
    **{f"uint{b}": (torch.uint8, 0, 2**b - 1, b, False) for b in (2, 3, 5, 6, 7)},
    "float8_e4m3fn": (torch.float8_e4m3fn, -448.0, 448.0, 8, True),
    "float8_e5m2": (torch.float8_e5m2, -57344.0, 57344.0, 8, True),
}


def test_registered_names():
    assert set(QTYPES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_qtype_fields(name):
    storage, qmin, qmax, bits, is_float = EXPECTED[name]
    qt = get_qtype(name)
    assert qt.name == name
    assert qt.storage == storage
    assert qt.qmin == qmin and qt.qmax == qmax
    assert qt.bits == bits
    assert qt.is_float is is_float
    assert qt.packed is (bits < 8)
    if is_float:
        assert qt.qmax == torch.finfo(storage).max and qt.qmin == -torch.finfo(storage).max
    else:
        info = torch.iinfo(storage)
        assert info.min <= qt.qmin and qt.qmax <= info.max
        assert qt.qmax - qt.qmin == 2**bits - 1


def test_get_qtype_passes_qtype_through():
    qt = QType("custom", torch.int8, -4, 3, 3)
    assert get_qtype(qt) is qt
    assert get_qtype(QTYPES["int4"]) is QTYPES["int4"]
    assert get_qtype("int4").qmax == 7


@pytest.mark.parametrize("bad", ["int9", "INT8", "float8", ""])
def test_unknown_qtype_lists_names(bad):
    with pytest.raises(ValueError) as info:
        get_qtype(bad)
    msg = str(info.value)
    assert repr(bad) in msg
    for name in EXPECTED:
        assert name in msg


def test_float8_qtype():
    assert float8_qtype(torch.float8_e4m3fn) is QTYPES["float8_e4m3fn"]
    assert float8_qtype(torch.float8_e5m2) is QTYPES["float8_e5m2"]


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.float32, torch.bfloat16])
def test_float8_qtype_rejects_other_dtypes(dtype):
    with pytest.raises(ValueError, match="float8"):
        float8_qtype(dtype)


def test_registry_is_frozen():
    with pytest.raises(TypeError):
        QTYPES["int2"] = QType("int2", torch.int8, -2, 1, 2)  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        QTYPES["int8"].qmax = 100  # type: ignore[misc]
    assert QTYPES["int8"].qmax == 127
