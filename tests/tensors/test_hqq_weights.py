"""quantize_ with algorithm="hqq": the scheme's ordinary tensors, HQQ's qparams, a smaller layer output error."""

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.primitives.hqq import hqq_qparams

CONFIGS = [lowbit.Int4WeightOnly(group_size=32), lowbit.IntxWeightOnly(bits=3, group_size=32), lowbit.Int8WeightOnly()]


def _heavy_tailed_linear() -> nn.Linear:
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(256, 64)
    chi2 = torch.randn(2, 64, 256, generator=g).square().sum(0)
    with torch.no_grad():
        layer.weight.copy_(0.02 * torch.randn(64, 256, generator=g) / (chi2 / 2).sqrt())
    return layer


@pytest.mark.parametrize("rtn", CONFIGS, ids=lambda c: c.label())
def test_quantize_hqq_gives_the_schemes_tensor_with_hqq_qparams_and_lower_output_error(rtn):
    hqq = dataclasses.replace(rtn, algorithm="hqq")
    layer = _heavy_tailed_linear()
    float_weight = layer.weight.detach().clone()
    by_rtn, by_hqq = (lowbit.quantize_(nn.Sequential(copy.deepcopy(layer)), c)[0] for c in (rtn, hqq))
    assert type(by_hqq.weight) is type(by_rtn.weight)
    spec = hqq.spec().weight
    scale, zero = hqq_qparams(float_weight, spec.block_size(float_weight.shape), spec.qtype, symmetric=spec.symmetric)
    got = by_hqq.weight.canonical()
    assert torch.equal(got.scale, scale) and (zero is None or torch.equal(got.zero_point, zero))
    assert not torch.equal(got.scale, by_rtn.weight.canonical().scale)
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = layer(x)
        assert (by_hqq(x) - want).norm() < (by_rtn(x) - want).norm()


def test_quantize_hqq_of_a_non_finite_weight_raises_naming_it_and_leaves_the_model():
    model = nn.Sequential(_heavy_tailed_linear())
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="0.weight holds 1 non-finite"):
        lowbit.quantize_(model, lowbit.Int4WeightOnly(group_size=32, algorithm="hqq"))
    assert type(model[0].weight) is nn.Parameter
