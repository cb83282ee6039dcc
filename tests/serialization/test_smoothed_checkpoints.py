"""Smoothed (AWQ / SmoothQuant) weights in checkpoints: bit-exact round trips, divisors checked against the spec."""

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

import lowbit
from lowbit.serialization import CheckpointError
from lowbit.specs import spec_to_json
from lowbit.tensors.from_spec import quantize_weight
from lowbit.tensors.smoothed import SmoothedTensor
from test_checkpoint_validation import VALID, FixtureModel, assert_rejected, replace_tensor, rewrite, set_element, set_value

CONFIGS = [
    lowbit.Int8WeightOnly(algorithm="awq"),
    lowbit.Int4WeightOnly(group_size=32, algorithm="awq"),
    lowbit.IntxWeightOnly(bits=3, algorithm="awq"),
    lowbit.Float8WeightOnly(algorithm="awq"),
    lowbit.Int8DynamicActivation(algorithm="smoothquant"),
    lowbit.Float8DynamicActivation(algorithm="smoothquant"),
]


def _smoothed_model(config, conv1d: bool) -> nn.Module:
    model = nn.Sequential(Conv1D(16, 64) if conv1d else nn.Linear(64, 16))
    layer = model[0]
    s = torch.rand(64) * 3 + 0.25
    w = layer.weight.detach().t() if conv1d else layer.weight.detach()
    q = quantize_weight(w * s, config.spec(), smooth=s)
    layer.weight = nn.Parameter(q.t() if conv1d else q, requires_grad=False)
    layer.lowbit_spec = config.spec()
    return model


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{type(c).__name__}{getattr(c, 'bits', '')}")
def test_round_trip_is_bit_exact(config, conv1d, tmp_path):
    model = _smoothed_model(config, conv1d)
    lowbit.save(model, tmp_path / "m.safetensors")
    loaded = lowbit.load(nn.Sequential(Conv1D(16, 64) if conv1d else nn.Linear(64, 16)), tmp_path / "m.safetensors")
    before, after = model[0].weight, loaded[0].weight
    assert isinstance(after, SmoothedTensor) and after.transposed == conv1d and loaded[0].lowbit_spec == config.spec()
    assert torch.equal(after.act_smooth, before.act_smooth) and torch.equal(after.dequantize(), before.dequantize())
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_divisors_without_a_smoothing_algorithm_are_rejected(tmp_path):
    plain = set_value("awq.weight", "spec", value=spec_to_json(lowbit.Int4WeightOnly(group_size=32).spec()))
    assert_rejected(rewrite(VALID, tmp_path / "bad.safetensors", header=plain), "spec gives act_smooth absent")


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_non_positive_divisors_are_rejected(value, tmp_path):
    bad = rewrite(VALID, tmp_path / "bad.safetensors", tensors=set_element("smoothquant.weight::act_smooth", 3, value))
    assert_rejected(bad, "act_smooth.*expected finite positive values")


def test_divisors_of_the_wrong_shape_are_rejected(tmp_path):
    bad = rewrite(VALID, tmp_path / "bad.safetensors", tensors=replace_tensor("awq.weight::act_smooth", lambda t: t[:32]))
    assert_rejected(bad, r"act_smooth.*expected shape \[64\]")


def test_smoothed_weight_wraps_no_static_weight(tmp_path):
    edit = set_value("smoothquant.weight::weight", "class", value="StaticActivationTensor")
    with pytest.raises(CheckpointError, match="field 'class': expected one of"):
        lowbit.load(FixtureModel(), rewrite(VALID, tmp_path / "bad.safetensors", header=edit))
