"""QAT of an algorithm="hqq" config: learned qparams start from HQQ's, chosen ones are HQQ's each call."""

import pytest
import torch
from helpers import mlp

import lowbit
from lowbit.primitives.affine import choose_qparams
from lowbit.primitives.hqq import hqq_qparams
from lowbit.qat import QATConfig
from lowbit.qat.flow import weight_fake_quantizer

CONFIG = lowbit.IntxWeightOnly(bits=3, group_size=32, algorithm="hqq")


def _expected(weight, spec, fit):
    return fit(weight.detach(), spec.block_size(weight.shape), spec.qtype, symmetric=spec.symmetric)


@pytest.mark.parametrize("range_learning", [False, True], ids=["chosen", "lsq"])
def test_weight_fake_quantizer_uses_hqq_qparams(range_learning):
    model = mlp()
    weights = [layer.weight.detach().clone() for layer in (model[0], model[2])]
    lowbit.quantize_(model, QATConfig(CONFIG, range_learning=range_learning))
    spec = CONFIG.spec().weight
    for layer, weight in zip((model[0], model[2]), weights):
        quantizer = weight_fake_quantizer(layer)
        scale, zero = _expected(weight, spec, hqq_qparams)
        got_scale, got_zero = (quantizer.scale, quantizer.zero_point) if range_learning else quantizer.qparams(weight)
        assert torch.equal(got_scale.detach(), scale) and torch.equal(got_zero.detach(), zero.float())
        assert not torch.equal(scale, _expected(weight, spec, choose_qparams)[0])  # not the min/max start
