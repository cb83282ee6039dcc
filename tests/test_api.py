"""quantize_: every config, filter_fn, and bad input rejected before anything changes."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import ALL_CONFIGS, MLP, WEIGHT_ONLY_CONFIGS, config_id, relative_error

import lowbit


def _snapshot(model):
    return {k: (type(v), v.detach().clone()) for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot):
    now = model.state_dict()
    assert set(now) == set(snapshot)
    for key, (cls, value) in snapshot.items():
        assert type(now[key]) is cls, key
        torch.testing.assert_close(now[key], value, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
def test_every_config_quantizes_and_stays_close(config, device):
    model = MLP().to(device)
    x = torch.randn(8, 64, device=device)
    expected = model(x)
    lowbit.quantize_(model, config)
    assert isinstance(model.fc1, nn.Linear) and isinstance(model.fc1.weight, lowbit.QuantizedTensor)
    assert not model.fc1.weight.requires_grad
    assert relative_error(model(x), expected) < (0.15 if isinstance(config, lowbit.Int4WeightOnly) else 0.05)


def test_configs_are_frozen_and_importable():
    config = lowbit.Int8WeightOnly()
    with pytest.raises(Exception):
        config.group_size = 4
    assert {c.__name__ for c in (lowbit.Int8WeightOnly, lowbit.Int4WeightOnly, lowbit.Int8DynamicActivation,
                                 lowbit.Float8WeightOnly, lowbit.Float8DynamicActivation)} <= set(lowbit.__all__)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: lowbit.Int4WeightOnly(group_size=48), "group_size must be one of"),
        (lambda: lowbit.Int8WeightOnly(group_size=0), "positive int"),
        (lambda: lowbit.Float8WeightOnly(float8_dtype=torch.int8), "float8 dtype"),
        (lambda: lowbit.Float8DynamicActivation(granularity="per_block"), "granularity must be one of"),
    ],
)
def test_bad_config_values_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_group_size_not_dividing_leaves_model_unchanged():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 48), nn.Linear(48, 8))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"\[2\]\.weight|2\.weight") as error:
        lowbit.quantize_(model, lowbit.Int8WeightOnly(group_size=32))
    assert "multiple of 32" in str(error.value) and "(8, 48)" in str(error.value)
    _assert_unchanged(model, before)


def test_nonfinite_weight_is_named_and_model_unchanged():
    model = MLP()
    with torch.no_grad():
        model.fc2.weight[3, 7] = float("nan")
    before = _snapshot(model)
    with pytest.raises(ValueError, match="fc2.weight holds 1 non-finite"):
        lowbit.quantize_(model, lowbit.Int8WeightOnly())
    _assert_unchanged(model, before)


def test_unsupported_layer_selected_by_filter():
    model = nn.Sequential(nn.Linear(64, 16), nn.Conv2d(3, 4, 3), nn.LayerNorm(4))
    before = _snapshot(model)
    with pytest.raises(ValueError, match="does not quantize convolutions.*'1' of type Conv2d"):
        lowbit.quantize_(model, lowbit.Int4WeightOnly(group_size=32), filter_fn=lambda m, n: isinstance(m, (nn.Linear, nn.Conv2d)))
    with pytest.raises(ValueError, match=r"2.weight: expected a 2-D float32/bfloat16/float16 weight; received torch.float32 of shape \(4,\)"):
        lowbit.quantize_(model, lowbit.Int8WeightOnly(), filter_fn=lambda m, n: isinstance(m, (nn.Linear, nn.LayerNorm)))
    _assert_unchanged(model, before)


def test_embedding_only_with_weight_only_configs():
    model = nn.Sequential(nn.Embedding(100, 64), nn.Linear(64, 8))
    pick_all = lambda m, n: isinstance(m, (nn.Linear, nn.Embedding))  # noqa: E731
    with pytest.raises(ValueError, match="quantizes linear weights only; filter_fn selected the nn.Embedding '0'"):
        lowbit.quantize_(copy.deepcopy(model), lowbit.Int8DynamicActivation(), filter_fn=pick_all)
    for config in WEIGHT_ONLY_CONFIGS:
        quantized = lowbit.quantize_(copy.deepcopy(model), config, filter_fn=pick_all)
        idx = torch.randint(0, 100, (2, 5))
        assert isinstance(quantized[0].weight, lowbit.QuantizedTensor)
        assert relative_error(quantized(idx), model(idx)) < 0.15


def test_module_without_weight_is_rejected():
    with pytest.raises(ValueError, match="'1' of type ReLU, which has no weight tensor"):
        lowbit.quantize_(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), lowbit.Int8WeightOnly(), filter_fn=lambda m, n: True if n else False)


def test_unsupported_dtype_and_already_quantized():
    model = nn.Sequential(nn.Linear(16, 16).double())
    with pytest.raises(ValueError, match="float32/bfloat16/float16 weight; received torch.float64"):
        lowbit.quantize_(model, lowbit.Int8WeightOnly())
    model = lowbit.quantize_(nn.Sequential(nn.Linear(16, 16)), lowbit.Int8WeightOnly())
    with pytest.raises(ValueError, match="already quantized"):
        lowbit.quantize_(model, lowbit.Int8WeightOnly())


def test_config_must_be_an_instance_of_a_registered_config():
    with pytest.raises(TypeError, match="received type"):
        lowbit.quantize_(MLP(), lowbit.Int8WeightOnly)
    with pytest.raises(TypeError, match="received dict"):
        lowbit.quantize_(MLP(), {"bits": 8})


def test_unknown_kernel_name_raises_before_changes():
    model = MLP()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="unknown kernel 'turbo'.*'reference'"):
        lowbit.quantize_(model, lowbit.Int8WeightOnly(kernel="turbo"))
    _assert_unchanged(model, before)


def test_reference_kernel_by_name():
    model = MLP()
    x = torch.randn(2, 64)
    auto = lowbit.quantize_(copy.deepcopy(model), lowbit.Int8WeightOnly())(x)
    ref = lowbit.quantize_(copy.deepcopy(model), lowbit.Int8WeightOnly(kernel="reference"))(x)
    assert relative_error(auto, ref) < 1e-4  # same math; the fast kernel rounds differently


def test_filter_fn_and_empty_selection():
    model = MLP()
    lowbit.quantize_(model, lowbit.Int8WeightOnly(), filter_fn=lambda m, fqn: fqn == "fc2")
    assert not isinstance(model.fc1.weight, lowbit.QuantizedTensor)
    assert isinstance(model.fc2.weight, lowbit.Int8Tensor)
    with pytest.warns(UserWarning, match="selected no module"):
        lowbit.quantize_(MLP(), lowbit.Int8WeightOnly(), filter_fn=lambda m, fqn: False)


def test_tied_weights_stay_tied():
    emb = nn.Embedding(50, 32)
    head = nn.Linear(32, 50, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    lowbit.quantize_(model, lowbit.Int8WeightOnly(), filter_fn=lambda m, n: isinstance(m, (nn.Linear, nn.Embedding)))
    assert model.emb.weight is model.head.weight
    assert isinstance(model.head.weight, lowbit.Int8Tensor)


class RawLinear(nn.Module):
    """Not an nn.Linear: calls F.linear on its own Parameter."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)

    def forward(self, x):
        return F.linear(x, self.weight)


class FunctionalModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 32)
        self.head = RawLinear(32, 16)

    def forward(self, x):
        return self.head(torch.relu(self.proj(x)))


def test_functional_linear_is_quantized_through_the_weight():
    model = FunctionalModel()
    x = torch.randn(4, 64)
    reference = model(x)
    lowbit.quantize_(model, lowbit.Int8DynamicActivation(), filter_fn=lambda m, fqn: isinstance(m, (nn.Linear, RawLinear)))
    assert isinstance(model.head.weight, lowbit.DynamicActivationTensor)
    out = model(x)
    assert relative_error(out, reference) < 0.05
    hidden = torch.relu(model.proj(x))
    assert not torch.equal(out, F.linear(hidden, model.head.weight.dequantize()))  # activations were quantized too


def test_named_kernel_that_cannot_take_the_layout_raises_before_changes():
    model = MLP()
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="'int_mm16'.*handles \\['per_row'\\] weights, not per_group"):
        lowbit.quantize_(model, lowbit.Int8WeightOnly(group_size=32, kernel="int_mm16"))
    _assert_unchanged(model, before)
