"""The scheme registry: a new weight scheme is a tensor class, one register_scheme call and one config."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowbit
from lowbit.api import WeightHandler, register_handler
from lowbit.configs import QuantConfig
from lowbit.specs import QuantSpec, weight_spec
from lowbit.tensors.blockwise import BlockQuantizedTensor
from lowbit.tensors.schemes import SCHEMES, get_scheme, register_scheme, scheme_for


class Int6RowTensor(BlockQuantizedTensor):  # the tensor file: a class ...
    scheme = "test_int6_rows"


register_scheme(Int6RowTensor, ("int6",))  # ... and its registration


@dataclass(frozen=True)
class Int6Rows(QuantConfig):  # the config
    kernel: str = "auto"
    supports_embedding = True

    def spec(self):
        return QuantSpec(weight_spec("test_int6_rows", "int6"))


register_handler(Int6Rows)(WeightHandler)  # what configs.CONFIGS does for lowbit's own configs


def test_registered_schemes_describe_themselves():
    assert {name: (s.weight, s.activation) for name, s in SCHEMES.items() if name.startswith("int8")} == {
        "int8": ("int8", "none"), "int8_dynamic": ("int8", "dynamic"), "int8_static": ("int8", "static")}
    assert scheme_for("float8", "static").name == "float8_static" and get_scheme("intx").bits == (2, 3, 4, 5, 6, 7)
    assert get_scheme("int8_static").ops == ("linear", "conv") and get_scheme("int4").ops == ("linear", "bmm", "embedding")
    assert get_scheme("int4").stored_fields == ("qdata", "scale", "zero_point")
    with pytest.raises(ValueError, match="'int4' weights have no 'dynamic' activation scheme; registered: \\['none'\\]"):
        scheme_for("int4", "dynamic")
    with pytest.raises(ValueError, match="scheme 'test_int6_rows' is already registered"):
        register_scheme(Int6RowTensor, ("int6",))


def test_a_new_scheme_quantizes_runs_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 32), nn.Linear(32, 16))
    lowbit.quantize_(model, Int6Rows(), filter_fn=lambda m, n: n in ("0", "1"))
    linear, embedding = model[1].weight, model[0].weight
    assert type(linear) is Int6RowTensor and linear.qtype == "int6" and tuple(linear.qdata.shape) == (16, 24)  # 6 bits
    ids = torch.tensor([[1, 9, 4]])
    expected = F.linear(F.embedding(ids, embedding.dequantize()), linear.dequantize(), model[1].bias)
    assert torch.equal(model(ids), expected)  # reference kernels, registered with the scheme
    path = lowbit.save(model, tmp_path / "int6.safetensors")
    with torch.device("meta"):
        empty = nn.Sequential(nn.Embedding(10, 32), nn.Linear(32, 16))
    loaded = lowbit.load(empty, path)
    assert type(loaded[1].weight) is Int6RowTensor and torch.equal(loaded(ids), expected)
    assert loaded[1].lowbit_spec == Int6Rows().spec()
