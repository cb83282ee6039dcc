"""Bad input to QAT gets a clear error and leaves the model as it was."""

import copy

import pytest
import torch
import torch.nn as nn
from helpers import mlp

import lowbit
from lowbit.qat import QATConfig
from lowbit.targets import QAT_ATTR


def _state(model):
    return copy.deepcopy(model.state_dict()), [type(m) for m in model.modules()]


def _unchanged(model, before):
    state, types = before
    after = model.state_dict()
    same = lambda a, b: torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b  # noqa: E731
    return types == [type(m) for m in model.modules()] and state.keys() == after.keys() and all(
        same(state[k], after[k]) for k in state)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"base_config": "int8"}, TypeError, "lowbit config"),
    ({"base_config": lowbit.Int8WeightOnly(), "step": "train"}, ValueError, "step must be one of"),
    ({"base_config": lowbit.Int8WeightOnly(), "range_learning": 1}, ValueError, "True or False"),
])
def test_config_validates_its_fields(kwargs, error, match):
    with pytest.raises(error, match=match):
        QATConfig(**kwargs)


def test_prepare_refuses_a_layer_the_base_config_cannot_take_and_changes_nothing():
    model = nn.Sequential(nn.Linear(64, 32), nn.Conv2d(3, 8, 3))
    before = _state(model)
    with pytest.raises(ValueError, match="does not quantize convolutions"):
        lowbit.quantize_(model, QATConfig(lowbit.Int8DynamicActivation()),
                         filter_fn=lambda m, fqn: isinstance(m, (nn.Linear, nn.Conv2d)))
    assert _unchanged(model, before) and not hasattr(model[0], QAT_ATTR)


def test_prepare_twice_or_after_static_prepare_is_refused():
    model = lowbit.quantize_(mlp(), QATConfig(lowbit.Int8WeightOnly()))
    with pytest.raises(ValueError, match="prepared for QAT"):
        lowbit.quantize_(model, QATConfig(lowbit.Int8WeightOnly()))
    with pytest.raises(ValueError, match="prepared for QAT"):
        lowbit.quantize_(model, lowbit.Int8WeightOnly())
    with pytest.raises(ValueError, match="prepared for QAT"):
        lowbit.prepare(model, lowbit.StaticInt8())
    static = lowbit.prepare(mlp(), lowbit.StaticInt8())
    with pytest.raises(ValueError, match="prepared for static quantization"):
        lowbit.quantize_(static, QATConfig(lowbit.StaticInt8()))


def test_module_swap_is_refused_at_prepare():
    with pytest.raises(ValueError, match="module_swap applies to the convert step"):
        lowbit.quantize_(mlp(), QATConfig(lowbit.Int8WeightOnly()), module_swap=True)


def test_convert_needs_a_prepared_model():
    with pytest.raises(ValueError, match="no layer is prepared for QAT"):
        lowbit.quantize_(mlp(), QATConfig(lowbit.Int8WeightOnly(), step="convert"))


def test_convert_with_another_scheme_is_refused_and_changes_nothing():
    model = lowbit.quantize_(mlp(), QATConfig(lowbit.Int4WeightOnly(group_size=32)))
    before = _state(model)
    with pytest.raises(ValueError, match=r"prepared for Int4WeightOnly\(group_size=32\).*received Int4WeightOnly\(\)"):
        lowbit.quantize_(model, QATConfig(lowbit.Int4WeightOnly(), step="convert"))
    assert _unchanged(model, before)
    lowbit.quantize_(model, QATConfig(lowbit.Int4WeightOnly(group_size=32, kernel="reference"), step="convert"))


def test_static_convert_before_any_training_pass_is_refused_and_changes_nothing():
    model = lowbit.quantize_(mlp(), QATConfig(lowbit.StaticInt8()))
    model.eval()(torch.randn(4, 64))  # eval passes do not observe
    before = _state(model)
    with pytest.raises(lowbit.NotCalibratedError, match=r"no activation range was observed for \['0', '2'\]"):
        lowbit.quantize_(model, QATConfig(lowbit.StaticInt8(), step="convert"))
    assert _unchanged(model, before)
    with pytest.raises(lowbit.NotCalibratedError, match="training-mode forward passes"):
        lowbit.qat.freeze_ranges(lowbit.quantize_(mlp(), QATConfig(lowbit.StaticInt8(), range_learning=True)))


def test_non_finite_weights_are_refused_at_convert_naming_the_weight():
    model = lowbit.quantize_(mlp(), QATConfig(lowbit.Int8WeightOnly()))
    with torch.no_grad():
        model[2].parametrizations.weight.original[0, 0] = float("nan")
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"2\.weight holds 1 non-finite"):
        lowbit.quantize_(model, QATConfig(lowbit.Int8WeightOnly(), step="convert"))
    assert hasattr(model[0], QAT_ATTR) and hasattr(before[0], QAT_ATTR)
