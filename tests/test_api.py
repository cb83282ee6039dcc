"""quantize_: every config, filter_fn, and bad input rejected before anything changes."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import ALL_CONFIGS, MLP, WEIGHT_ONLY_CONFIGS, config_id, low_bit_error_bound, relative_error

import lowbit


def _snapshot(model):
    return {k: (type(v), v.detach().clone()) for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot):
    now = model.state_dict()
    assert set(now) == set(snapshot)
    for key, (cls, value) in snapshot.items():
        assert type(now[key]) is cls, key
        torch.testing.assert_close(now[key], value, rtol=0, atol=0, equal_nan=True)


INT8_CONFIGS = (lowbit.Int8WeightOnly, lowbit.Int8DynamicActivation)


def _int8_error_bound(config, x, weight):
    """The largest |quantized - float| per output of ``x @ weight.T`` the int8 steps allow:
    sum_k |x_k| * step_nk / 2 (weight step: max|W| / 127 per row or group) and, for quantized activations,
    sum_k |W^_nk| * step_x / 2 (per token: max|x| / 127, or (max(x, 0) - min(x, 0)) / 255 with a zero
    point), with |W^| <= |W| + step / 2; plus float32 rounding of a K-term dot product."""
    group = config.group_size or weight.shape[1]
    w_step = (weight.abs().unflatten(1, (-1, group)).amax(-1, keepdim=True) / 127).expand(-1, -1, group).flatten(1)
    bound = x.abs() @ (w_step / 2).T
    if isinstance(config, lowbit.Int8DynamicActivation):
        if config.spec().activation.symmetric:
            x_step = x.abs().amax(-1, keepdim=True) / 127
        else:
            x_step = (x.amax(-1, keepdim=True).clamp(min=0) - x.amin(-1, keepdim=True).clamp(max=0)) / 255
        bound = bound + x_step / 2 * (weight.abs() + w_step / 2).sum(1)
    return bound + weight.shape[1] * torch.finfo(torch.float32).eps * (x.abs() @ weight.abs().T)


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
def test_every_config_quantizes_and_stays_close(config, device):
    model = MLP().to(device)
    x = torch.randn(8, 64, device=device)
    expected = model(x)
    hidden, floats = torch.relu(model.fc1(x)).detach(), [model.fc1.weight.detach().clone(), model.fc2.weight.detach().clone()]
    lowbit.quantize_(model, config)
    assert isinstance(model.fc1, nn.Linear) and isinstance(model.fc1.weight, lowbit.QuantizedTensor)
    assert not model.fc1.weight.requires_grad
    if isinstance(config, INT8_CONFIGS):  # each layer within the bound its quantization steps give
        with torch.no_grad():
            for layer, inputs, weight in ((model.fc1, x, floats[0]), (model.fc2, hidden, floats[1])):
                error = (layer(inputs) - F.linear(inputs, weight, layer.bias)).abs()
                assert (error <= _int8_error_bound(config, inputs, weight)).all()
    else:
        assert relative_error(model(x), expected) < low_bit_error_bound(config, 0.15, 0.05)


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


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: lowbit.Int8WeightOnly(group_size=True), r"group_size must be a positive int or None; received True"),
        (lambda: lowbit.Int8DynamicActivation(group_size=False), r"group_size must be a positive int or None; received False"),
        (lambda: lowbit.Int4WeightOnly(group_size=True), r"group_size must be a positive int or None; received True"),
        (lambda: lowbit.Int4WeightOnly(group_size=128.0), r"group_size must be a positive int or None; received 128.0"),
        (lambda: lowbit.Int4WeightOnly(symmetric=1), r"symmetric must be True or False; received 1 \(int\)"),
        (lambda: lowbit.Int8DynamicActivation(act_symmetric="no"), r"act_symmetric must be True or False; received 'no'"),
        (lambda: lowbit.StaticInt8(act_symmetric=0), r"act_symmetric must be True or False; received 0 \(int\)"),
        (lambda: lowbit.StaticInt8(smoothing=True), r"smoothing must be None or a number in \[0, 1\]; received True"),
        (lambda: lowbit.StaticInt8(observer=None), r"observer must be a str; received None"),
        (lambda: lowbit.Int8WeightOnly(kernel=None), r"kernel must be a str; received None"),
        (lambda: lowbit.Float8DynamicActivation(granularity=1), r"granularity must be a str; received 1"),
    ],
    ids=["int8-bool-group", "dynamic-bool-group", "int4-bool-group", "int4-float-group", "int4-int-symmetric",
         "dynamic-str-symmetric", "static-int-symmetric", "static-bool-smoothing", "static-none-observer",
         "none-kernel", "float8-int-granularity"],
)
def test_wrong_types_in_config_fields_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_meta_weights_raise_naming_the_tensor_and_model_unchanged():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"0\.weight is on the meta device.*cannot be quantized.*lowbit\.load\(model, file\)"):
        lowbit.quantize_(model, lowbit.Int8WeightOnly())
    with pytest.raises(ValueError, match=r"0\.weight is on the meta device"):
        lowbit.prepare(model, lowbit.StaticInt8())
    assert all(type(p) is nn.Parameter and p.is_meta for p in model.parameters())
    assert not any(hasattr(m, "lowbit_observer") for m in model.modules())


def test_prepared_model_cannot_be_quantized_and_quantized_cannot_be_prepared():
    model = lowbit.prepare(MLP(), lowbit.StaticInt8(), filter_fn=lambda m, fqn: fqn == "fc1")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"prepared for static quantization \(observers on \['fc1'\]\).*lowbit.convert"):
        lowbit.quantize_(model, lowbit.Int8DynamicActivation(), filter_fn=lambda m, fqn: fqn == "fc2")
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"\['fc1'\] are already prepared"):
        lowbit.prepare(model, lowbit.StaticInt8())
    _assert_unchanged(model, before)
    lowbit.calibrate(model, [torch.randn(4, 64)], progress=False)
    lowbit.convert(model)  # the refused calls left a model that converts
    assert isinstance(model.fc1.weight, lowbit.StaticActivationTensor)
    with pytest.raises(ValueError, match=r"fc1.weight is already quantized \(StaticActivationTensor\)"):
        lowbit.prepare(model, lowbit.StaticInt8())
    assert not hasattr(model.fc2, "lowbit_observer")


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
    with pytest.raises(ValueError, match="quantizes linear weights only, not nn.Embedding; filter_fn selected '0' of type Embedding"):
        lowbit.quantize_(copy.deepcopy(model), lowbit.Int8DynamicActivation(), filter_fn=pick_all)
    for config in WEIGHT_ONLY_CONFIGS:
        quantized = lowbit.quantize_(copy.deepcopy(model), config, filter_fn=pick_all)
        idx = torch.randint(0, 100, (2, 5))
        assert isinstance(quantized[0].weight, lowbit.QuantizedTensor)
        assert relative_error(quantized(idx), model(idx)) < low_bit_error_bound(config, 0.15, 0.15)


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


class RawLinearModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 32)
        self.embed = nn.Embedding(10, 64)
        self.head = RawLinear(32, 16)

    def forward(self, x):
        return self.head(self.proj(x))


def test_default_filter_warns_about_2d_weights_it_leaves_float():
    model = RawLinearModel()
    with pytest.warns(UserWarning, match=r"1 other modules with 2-D weights stay float: \['head \(RawLinear\)'\]"):
        lowbit.quantize_(model, lowbit.Int8WeightOnly())
    assert isinstance(model.proj.weight, lowbit.Int8Tensor) and type(model.head.weight) is nn.Parameter
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a filter_fn says what the user wants; embeddings are opt-in
        lowbit.quantize_(RawLinearModel(), lowbit.Int8WeightOnly(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
        lowbit.quantize_(MLP(), lowbit.Int8WeightOnly())
        lowbit.quantize_(nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 8)), lowbit.Int8WeightOnly())
