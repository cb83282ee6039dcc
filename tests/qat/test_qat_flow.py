"""QAT through quantize_: every config prepares, trains (the loss goes down) and converts exactly."""

import copy

import pytest
import torch
import torch.nn as nn
from helpers import QAT_CONFIGS, is_static, mlp, task, train, with_kernel

import lowbit
from lowbit.qat import ActivationFakeQuantizer, QATConfig, WeightFakeQuantizer, freeze_ranges
from lowbit.targets import QAT_ATTR


def _qat(model, config, step="prepare", **kwargs):
    return lowbit.quantize_(model, QATConfig(config, step=step, **kwargs.pop("qat", {})), **kwargs)


@pytest.mark.parametrize("range_learning", [False, True], ids=["minmax", "lsq"])
@pytest.mark.parametrize("config", QAT_CONFIGS, ids=lambda c: c.label())
def test_trained_model_converts_to_what_it_computed(config, range_learning):
    """Converted with the reference kernel the outputs are bit-identical to the fake-quantized model's; with the
    fast kernels they agree within those kernels' rounding."""
    model = _qat(mlp(), config, qat={"range_learning": range_learning})
    losses = train(model, 40, after_step=lambda step: step == 20 and freeze_ranges(model))
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    x = torch.randn(16, 64)
    model.eval()
    with torch.no_grad():
        fake = model(x)
    fast = copy.deepcopy(model)
    _qat(model, with_kernel(config, "reference"), step="convert")
    _qat(fast, config, step="convert")
    assert isinstance(model[0].weight, lowbit.QuantizedTensor) and not hasattr(model[0], QAT_ATTR)
    assert not any(isinstance(m, (WeightFakeQuantizer, ActivationFakeQuantizer)) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), fake)
        # the fast kernels' own rounding: bf16 activations above 8 rows (weight-only), float accumulation order
        torch.testing.assert_close(fast(x), fake, rtol=2e-2, atol=2e-2 * fake.abs().max().item())


@pytest.mark.parametrize("config", [c for c in QAT_CONFIGS if not is_static(c)], ids=lambda c: c.label())
def test_convert_of_an_untrained_model_is_quantize_(config):
    model = mlp()
    expected = lowbit.quantize_(copy.deepcopy(model), config)
    _qat(model, config)
    _qat(model, config, step="convert")
    for got, want in zip(model.modules(), expected.modules()):
        if isinstance(want, nn.Linear):
            g, w = got.weight.kernel_inputs(), want.weight.kernel_inputs()
            assert g[1] == w[1] and g[0].keys() == w[0].keys()
            assert all(torch.equal(g[0][k], w[0][k]) for k in w[0] if g[0][k].layout == torch.strided)
    x = torch.randn(16, 64)
    assert torch.equal(model(x), expected(x))


@pytest.mark.parametrize("config", [c for c in QAT_CONFIGS if is_static(c)], ids=lambda c: c.label())
def test_static_convert_of_an_untrained_model_is_the_calibrated_one(config):
    """Training-mode passes observe as the post-training flow's moving-average observer calibrates (one batch: the
    SmoothQuant factors come from the same batch in both flows). One layer: a later layer in QAT observes the
    fake-quantized output of the layers before it, as it will see it after convert."""
    import dataclasses

    model, batch = nn.Sequential(nn.Linear(64, 128)), torch.randn(32, 64)
    expected = lowbit.prepare(copy.deepcopy(model), dataclasses.replace(config, observer="moving_average"))
    lowbit.calibrate(expected, [batch], progress=False)
    lowbit.convert(expected)
    _qat(model, config)
    model.train()(batch)
    _qat(model, config, step="convert")
    got, want = model[0].weight, expected[0].weight
    assert torch.equal(got.act_scale, want.act_scale)
    assert torch.equal(got.weight.dequantize(), want.weight.dequantize())
    x = torch.randn(16, 64)
    assert torch.equal(model(x), expected(x))


def test_static_ranges_follow_the_moving_average_until_frozen():
    model = _qat(mlp(), lowbit.StaticInt8(smoothing=None))
    observer = lowbit.calibration.MovingAverageMinMaxObserver("int8")
    quantizer = getattr(model[0], "lowbit_input_fake_quant")
    batches = [torch.randn(8, 64) * (i + 1) for i in range(4)]
    for x in batches[:3]:
        model(x)
        observer(x)
    assert torch.equal(quantizer.min_val, observer.min_val) and torch.equal(quantizer.max_val, observer.max_val)
    model.eval()(batches[3])  # eval passes do not observe
    freeze_ranges(model)
    model.train()(batches[3])  # nor frozen ones
    assert torch.equal(quantizer.max_val, observer.max_val)


def test_range_learning_learns_and_carries_its_qparams_into_convert():
    config = lowbit.Int4WeightOnly(group_size=32)
    model = _qat(mlp(), config, qat={"range_learning": True})
    quantizer = model[0].parametrizations.weight[0]
    start = quantizer.scale.detach().clone()
    train(model, 20)
    assert not torch.equal(quantizer.scale.detach(), start)
    learned = quantizer.scale.detach().clone()
    _qat(model, with_kernel(config, "reference"), step="convert")
    assert torch.equal(model[0].weight.scale, learned.clamp(min=torch.finfo(torch.float32).tiny))


def test_filter_fn_prepares_and_converts_the_selected_layers_only():
    config = lowbit.Int8DynamicActivation()
    model = _qat(mlp(), config, filter_fn=lambda m, fqn: fqn == "2")
    assert not hasattr(model[0], QAT_ATTR) and hasattr(model[2], QAT_ATTR)
    model = _qat(mlp(), config)
    _qat(model, config, step="convert", filter_fn=lambda m, fqn: fqn == "0")
    assert isinstance(model[0].weight, lowbit.QuantizedTensor) and hasattr(model[2], QAT_ATTR)


def test_module_swap_at_convert_gives_quantized_linears_with_the_same_outputs():
    config = lowbit.Int4WeightOnly(group_size=32)
    model = _qat(mlp(), config)
    train(model, 5)
    swapped = copy.deepcopy(model)
    _qat(model, config, step="convert")
    _qat(swapped, config, step="convert", module_swap=True)
    assert isinstance(swapped[0], lowbit.QuantizedLinear)
    x = torch.randn(4, 64)
    assert torch.equal(swapped(x), model(x))


def test_tied_weights_get_one_fake_quantizer_and_stay_tied():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(50, 64), nn.Linear(64, 50, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.embed(ids))

    config = lowbit.Int8WeightOnly()
    model = _qat(TiedLM(), config, filter_fn=lambda m, fqn: isinstance(m, (nn.Linear, nn.Embedding)))
    assert model.embed.parametrizations.weight[0] is model.head.parametrizations.weight[0]
    ids = torch.randint(0, 50, (4, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    optimizer.step()
    assert model.embed.parametrizations.weight.original is model.head.parametrizations.weight.original
    _qat(model, config, step="convert")
    assert model.embed.weight is model.head.weight and isinstance(model.head.weight, lowbit.Int8Tensor)


def test_bf16_training_converts_exactly():
    config = lowbit.Int8DynamicActivation()
    model = _qat(mlp(), config).to(torch.bfloat16)
    x, y = task()
    train(model, 10, x=x.bfloat16(), y=y.bfloat16())
    model.eval()
    probe = torch.randn(8, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        fake = model(probe)
    _qat(model, with_kernel(config, "reference"), step="convert")
    assert model[0].weight.dtype == torch.bfloat16 and torch.equal(model(probe), fake)


def test_transformers_conv1d_trains_and_converts_exactly():
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    config = lowbit.StaticInt8()
    model = nn.Sequential(conv1d(128, 64), nn.GELU(), conv1d(32, 128))
    _qat(model, config)
    train(model, 10, after_step=lambda step: step == 5 and freeze_ranges(model))
    model.eval()
    x = torch.randn(8, 64)
    with torch.no_grad():
        fake = model(x)
    _qat(model, with_kernel(config, "reference"), step="convert")
    assert model[0].weight.shape == (64, 128) and torch.equal(model(x), fake)


def test_converted_model_saves_and_loads_with_its_learned_qparams(tmp_path):
    config = lowbit.StaticInt8()
    model = _qat(mlp(), config, qat={"range_learning": True})
    train(model, 10, after_step=lambda step: step == 4 and freeze_ranges(model))
    _qat(model, config, step="convert")
    lowbit.save(model, tmp_path / "qat.safetensors")
    fresh = mlp()
    lowbit.load(fresh, tmp_path / "qat.safetensors")
    x = torch.randn(8, 64)
    assert torch.equal(fresh(x), model(x))
    assert torch.equal(fresh[0].weight.act_scale, model[0].weight.act_scale)
