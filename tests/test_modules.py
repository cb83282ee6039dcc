"""Module swap (QuantizedLinear) beside the subclass path: same kernels, same outputs."""

import copy

import pytest
import torch
import torch.nn as nn
from conftest import ALL_CONFIGS, MLP, config_id
from test_api import FunctionalModel

import lowbit


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
def test_swap_and_subclass_give_identical_outputs(config, device):
    model = MLP().to(device)
    swapped = lowbit.quantize_(copy.deepcopy(model), config, module_swap=True)
    subclassed = lowbit.quantize_(copy.deepcopy(model), config)
    assert isinstance(swapped.fc1, lowbit.QuantizedLinear) and type(subclassed.fc1) is nn.Linear
    x = torch.randn(6, 64, device=device)
    assert torch.equal(swapped(x), subclassed(x))


def test_swap_misses_functional_linear_that_the_subclass_path_sees():
    model = FunctionalModel()
    x = torch.randn(4, 64)
    swapped = lowbit.quantize_(copy.deepcopy(model), lowbit.Int8WeightOnly(), module_swap=True)
    assert isinstance(swapped.proj, lowbit.QuantizedLinear)
    assert type(swapped.head.weight) is nn.Parameter  # F.linear(x, self.weight) stays float under module swap
    with pytest.raises(ValueError, match="module_swap replaces nn.Linear only; filter_fn selected 'head'"):
        lowbit.quantize_(copy.deepcopy(model), lowbit.Int8WeightOnly(), filter_fn=lambda m, n: n == "head", module_swap=True)
    subclassed = lowbit.quantize_(copy.deepcopy(model), lowbit.Int8WeightOnly(), filter_fn=lambda m, n: n in ("proj", "head"))
    assert isinstance(subclassed.head.weight, lowbit.Int8Tensor)
    assert torch.equal(subclassed.proj(x), swapped.proj(x))
    assert not torch.equal(subclassed(x), swapped(x))


def test_swapped_module_repr_and_state():
    layer = lowbit.QuantizedLinear.from_float(nn.Linear(64, 32), lowbit.Int4WeightOnly(group_size=32))
    assert "scheme=int4" in repr(layer) and "block_size=(1, 32)" in repr(layer)
    assert {"qdata", "scale", "zero_point", "bias"} <= set(layer.state_dict())
    assert layer.qdata.dtype == torch.uint8 and layer.qdata.shape == (32, 32)
