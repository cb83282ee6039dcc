"""transformers' Conv1D (GPT-2's linear: weight (in, out), ``addmm(bias, x, weight)``) quantizes as nn.Linear does:
the same quantized weight reaches the same kernel, so outputs are identical, and copies, files and the CLI keep it."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from conftest import ALL_CONFIGS, assert_compiles_and_exports, assert_survives_copies, config_id

import lowbit
from lowbit.cli import main
from lowbit.tensors import blockwise

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

STATIC_CONFIGS = [lowbit.StaticInt8(), lowbit.StaticInt8(smoothing=None), lowbit.StaticFloat8()]


def _pair(in_features=64, out_features=96):
    """A Conv1D and an nn.Linear holding the same weights, each in a Sequential."""
    conv = Conv1D(out_features, in_features)
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        conv.bias.normal_()
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    return nn.Sequential(conv), nn.Sequential(linear)


@pytest.fixture
def kernel_calls(monkeypatch):
    """(kernel name, inner tensors) of every kernel call."""
    calls = []
    original = blockwise.call_kernel

    def spy(kernel, x, tensors, meta, bias):
        calls.append((kernel.name, tensors))
        return original(kernel, x, tensors, meta, bias)

    monkeypatch.setattr(blockwise, "call_kernel", spy)
    return calls


def _assert_same_kernel_call(first, second):
    (name, tensors), (other_name, other_tensors) = first, second
    assert name == other_name and set(tensors) == set(other_tensors)
    for key, t in tensors.items():  # packed fields included: nothing is rebuilt or dequantized per call
        other = other_tensors[key]
        if t.layout == torch._mkldnn:  # oneDNN's opaque layout: compared by its values
            assert other.layout == torch._mkldnn and torch.equal(t.to_dense(), other.to_dense()), key
            continue
        assert torch.equal(t, other) and t.is_contiguous() == other.is_contiguous(), key


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
def test_conv1d_matches_linear_quantized_the_same_way(config, kernel_calls):
    conv, linear = _pair()
    lowbit.quantize_(conv, config)
    lowbit.quantize_(linear, config)
    assert type(conv[0].weight) is type(linear[0].weight) and tuple(conv[0].weight.shape) == (64, 96)
    for shape in [(3, 64), (2, 5, 64)]:
        x = torch.randn(shape)
        kernel_calls.clear()
        with torch.no_grad():
            assert torch.equal(conv(x), linear(x))
        assert len(kernel_calls) == 2
        _assert_same_kernel_call(*kernel_calls)


@pytest.mark.parametrize("config", STATIC_CONFIGS, ids=config_id)
def test_static_conv1d_matches_linear(config, kernel_calls):
    conv, linear = _pair()
    data = [torch.randn(8, 64) * torch.linspace(0.1, 4, 64) for _ in range(3)]
    for model in (conv, linear):
        lowbit.prepare(model, config)
        lowbit.calibrate(model, data, progress=False)
        lowbit.convert(model)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.equal(conv(x), linear(x))
    _assert_same_kernel_call(*kernel_calls)


def test_conv1d_gradients_match_linear():
    conv, linear = _pair()
    x = torch.randn(4, 64)
    grads = []
    for model in (conv, linear):
        lowbit.quantize_(model, lowbit.Int8WeightOnly())
        leaf = x.clone().requires_grad_(True)
        model(leaf).square().sum().backward()
        grads.append((leaf.grad, model[0].bias.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("config", [lowbit.Int8WeightOnly(), lowbit.Int4WeightOnly(group_size=32),
                                    lowbit.Int8DynamicActivation(), lowbit.StaticInt8()], ids=config_id)
def test_conv1d_survives_copies_and_save_load(config, tmp_path, kernel_calls):
    model, _ = _pair()
    if isinstance(config, lowbit.StaticInt8):
        lowbit.prepare(model, config)
        lowbit.calibrate(model, [torch.randn(8, 64)], progress=False)
        lowbit.convert(model)
    else:
        lowbit.quantize_(model, config)
    x = torch.randn(3, 64)
    assert_survives_copies(model, x)
    lowbit.save(model, tmp_path / "conv1d.safetensors")
    with torch.device("meta"):
        empty = nn.Sequential(Conv1D(96, 64))
    lowbit.load(empty, tmp_path / "conv1d.safetensors")
    kernel_calls.clear()
    with torch.no_grad():
        assert torch.equal(empty(x), model(x))
    _assert_same_kernel_call(*kernel_calls)  # loaded weights are packed for the fast kernel as quantized ones are


def test_conv1d_compiles_and_exports():
    model, _ = _pair()
    lowbit.quantize_(model.eval(), lowbit.Int8WeightOnly())
    assert_compiles_and_exports(model, torch.randn(4, 64), "int8_weight_linear")


def test_module_swap_refuses_conv1d():
    model, _ = _pair()
    with pytest.raises(ValueError, match="module_swap replaces nn.Linear only.*selected '0' of type Conv1D"):
        lowbit.quantize_(model, lowbit.Int8WeightOnly(), module_swap=True)
    assert type(model[0].weight) is nn.Parameter


def test_gpt2_conv1d_layers_quantize_by_default_and_through_the_cli(tmp_path, capsys):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    convs = [name for name, m in model.named_modules() if isinstance(m, Conv1D)]
    assert len(convs) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every weight the default filter covers is quantized: nothing to warn about
        lowbit.quantize_(model, lowbit.Int8WeightOnly())
    assert all(isinstance(model.get_submodule(name).weight, lowbit.Int8Tensor) for name in convs)

    out = tmp_path / "quantized"
    assert main(["quantize", str(tmp_path / "gpt2"), "--config", "int8-weight-only", "-o", str(out)]) == 0
    assert "9 weights quantized" in capsys.readouterr().out  # 8 Conv1D + the head tied to the embedding
    loaded = lowbit.load_pretrained(out)
    assert all(isinstance(loaded.get_submodule(name).weight, lowbit.Int8Tensor) for name in convs)
    ids = torch.randint(0, 1000, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert torch.equal(copy.deepcopy(loaded)(ids).logits, loaded(ids).logits)
