"""The data-driven algorithms' flow: prepare -> calibrate (block by block) -> convert."""

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.algorithms.gptq import HessianCollector, gptq_quantize
from lowbit.tensors.from_spec import quantize_weight


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x, scale=1.0):
        return x + scale * self.down(torch.relu(self.up(self.norm(x))))


class Stack(nn.Module):
    def __init__(self, width=64, depth=3):
        super().__init__()
        self.embed = nn.Linear(32, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 8)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, scale=0.5)
        return self.head(h)


def _data(count=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 8, 32, generator=g) * torch.linspace(0.1, 4, 32) for _ in range(count)]


def _model(seed=0):
    torch.manual_seed(seed)
    return Stack().eval()


def _gptq_by_hand(model, data, config):
    """What block-by-block GPTQ must compute: each block's layers fitted to the inputs the quantized earlier
    blocks give it; the layers outside the stack to a last pass of the whole quantized model."""
    spec = config.spec()
    expected = {}

    def quantized(module, inputs):
        h = HessianCollector(module.in_features)
        for x in inputs:
            h.add(x)
        w = module.weight.detach()
        options = lowbit.GPTQ()
        w_hat, scale, zero = gptq_quantize(w, h.hessian, spec.weight, spec.weight.block_size(w.shape),
                                           act_order=options.act_order, clip_steps=options.clip_steps)
        return quantize_weight(w_hat, spec, qparams=(scale, zero))

    def inputs_of(module, run):
        seen = []
        handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        run()
        handle.remove()
        return seen

    work = copy.deepcopy(model)
    with torch.no_grad():
        hidden = [work.embed(x) for x in data]
        for block in work.blocks:
            layers = (block.up, block.down)
            seen = {layer: inputs_of(layer, lambda: [block(h, scale=0.5) for h in hidden]) for layer in layers}
            for layer in layers:
                layer.weight = nn.Parameter(quantized(layer, seen[layer]), requires_grad=False)
            hidden = [block(h, scale=0.5) for h in hidden]
        for layer in (work.embed, work.head):  # outside the stack: float until this pass
            expected[layer] = inputs_of(layer, lambda: [work(x) for x in data])
        for layer in (work.embed, work.head):
            layer.weight = nn.Parameter(quantized(layer, expected[layer]), requires_grad=False)
    return work


def _flow(model, config, data, **kwargs):
    lowbit.prepare(model, config, **kwargs)
    lowbit.calibrate(model, data, progress=False)
    return lowbit.convert(model)


def test_gptq_runs_block_by_block_on_the_quantized_blocks_outputs():
    config, data = lowbit.Int4WeightOnly(group_size=32, algorithm="gptq"), _data()
    model = _model()
    expected = _gptq_by_hand(model, data, config)
    _flow(model, config, data)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert type(module.weight).__name__ == "Int4Tensor" and module.lowbit_spec == config.spec(), name
            got, want = module.weight.dequantize(), expected.get_submodule(name).weight.dequantize()
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def test_gptq_beats_round_to_nearest_on_held_out_data():
    data, held_out = _data(), _data(4, seed=1)
    reference = _model()
    errors = {}
    for algorithm in ("rtn", "gptq"):
        model, config = _model(), lowbit.IntxWeightOnly(bits=3, group_size=32, algorithm=algorithm)
        _flow(model, config, data) if algorithm == "gptq" else lowbit.quantize_(model, config)
        with torch.no_grad():
            errors[algorithm] = sum((model(x) - reference(x)).pow(2).mean() for x in held_out)
    assert errors["gptq"] < 0.7 * errors["rtn"]


def test_the_model_computes_in_float_until_convert():
    model, data = _model(), _data()
    before = [model(x) for x in data]
    lowbit.prepare(model, lowbit.Int4WeightOnly(group_size=32, algorithm="gptq"))
    lowbit.calibrate(model, iter(data), progress=False)  # a one-shot iterator
    with torch.no_grad():
        for x, y in zip(data, before):
            torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    assert all(type(p) is nn.Parameter and p.dtype == torch.float32 for p in model.parameters())


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.used(x)


def test_convert_refuses_layers_no_data_reached_and_changes_nothing():
    model = Branchy()
    lowbit.prepare(model, lowbit.Int8WeightOnly(algorithm="gptq"))
    lowbit.calibrate(model, [torch.randn(4, 16)], progress=False)
    with pytest.raises(lowbit.NotCalibratedError, match="unused"):
        lowbit.convert(model)
    assert type(model.used.weight) is nn.Parameter and hasattr(model.used, "lowbit_algorithm")


def test_bad_uses_get_clear_errors():
    model = _model()
    config = lowbit.Int4WeightOnly(group_size=32, algorithm="gptq")
    with pytest.raises(ValueError, match="chooses weights from calibration data: lowbit.prepare"):
        lowbit.quantize_(model, config)
    with pytest.raises(TypeError, match="apply it with lowbit.quantize_"):
        lowbit.prepare(model, lowbit.Int4WeightOnly(algorithm="hqq"))
    with pytest.raises(ValueError, match="quantizes linear layers"):
        lowbit.prepare(nn.Sequential(nn.Conv2d(3, 8, 3)), lowbit.Int8WeightOnly(algorithm="gptq"),
                       filter_fn=lambda m, fqn: isinstance(m, nn.Conv2d))
    lowbit.prepare(model, config)
    with pytest.raises(ValueError, match="prepared for a data-driven weight algorithm"):
        lowbit.quantize_(model, lowbit.Int8WeightOnly())
    with pytest.raises(ValueError, match="received no batches"):
        lowbit.calibrate(model, [], progress=False)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        lowbit.Float8WeightOnly(algorithm="hqq")
    with pytest.raises(ValueError, match="needs algorithm='smoothquant'"):
        lowbit.Int8DynamicActivation(smoothing=0.7)


def test_a_transformers_decoder_is_quantized_layer_by_layer():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    reference = copy.deepcopy(model)
    data = [{"input_ids": torch.randint(0, 128, (2, 16))} for _ in range(3)]
    _flow(model, lowbit.Int8WeightOnly(algorithm="gptq"), data)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 7 + 1 and all(type(m.weight).__name__ == "Int8Tensor" for m in linears)
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999


def test_qat_starts_from_gptqs_weights_and_qparams():
    from lowbit.qat import QATConfig

    config = lowbit.Int4WeightOnly(group_size=32, algorithm="gptq", kernel="reference")
    model, x = _model(), _data(1, seed=3)[0]
    lowbit.prepare(model, config)
    lowbit.calibrate(model, _data(), progress=False)
    gptq = lowbit.convert(copy.deepcopy(model))
    with pytest.raises(ValueError, match="needs range_learning=True"):
        lowbit.quantize_(model, QATConfig(config))
    lowbit.quantize_(model, QATConfig(config, range_learning=True))
    with torch.no_grad():
        torch.testing.assert_close(model(x), gptq(x), rtol=1e-5, atol=1e-5)  # step 0 computes what GPTQ gave
    model(x).pow(2).mean().backward()  # and trains from there
    lowbit.quantize_(model, QATConfig(config, step="convert"))
    assert type(model.blocks[0].up.weight).__name__ == "Int4Tensor"


def test_qat_from_an_algorithm_refuses_what_it_cannot_start_from():
    from lowbit.qat import QATConfig

    with pytest.raises(ValueError, match="run lowbit.prepare"):
        lowbit.quantize_(_model(), QATConfig(lowbit.Int4WeightOnly(group_size=32, algorithm="gptq"), range_learning=True))
    with pytest.raises(ValueError, match="awq divides the layers' inputs"):
        lowbit.quantize_(_model(), QATConfig(lowbit.Int4WeightOnly(group_size=32, algorithm="awq"), range_learning=True))


@pytest.mark.parametrize("config", [
    lowbit.Int8DynamicActivation(algorithm="gptq"), lowbit.Float8WeightOnly(algorithm="gptq"),
    lowbit.Float8DynamicActivation(algorithm="gptq"), lowbit.Int4WeightOnly(group_size=32, symmetric=True, algorithm="gptq"),
    lowbit.Int8WeightOnly(group_size=32, algorithm="gptq"),
], ids=lambda c: c.label())
def test_gptq_over_every_scheme_gives_its_tensors_and_beats_round_to_nearest(config):
    data, held_out, reference = _data(), _data(4, seed=1), _model()
    errors, types = {}, {}
    for algorithm in ("rtn", "gptq"):
        model, variant = _model(), dataclasses.replace(config, algorithm=algorithm)
        _flow(model, variant, data) if algorithm == "gptq" else lowbit.quantize_(model, variant)
        types[algorithm] = type(model.blocks[1].down.weight)
        with torch.no_grad():
            errors[algorithm] = sum((model(x) - reference(x)).pow(2).mean() for x in held_out)
    assert types["gptq"] is types["rtn"] and errors["gptq"] < errors["rtn"]


def test_gptq_on_gpt2_conv1d_layers():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    reference = copy.deepcopy(model)
    data = [{"input_ids": torch.randint(0, 128, (2, 16))} for _ in range(3)]
    with pytest.warns(UserWarning, match="tied weight"):
        _flow(model, lowbit.Int8WeightOnly(algorithm="gptq"), data)
    attn = model.transformer.h[0].attn.c_attn
    assert type(attn.weight).__name__ == "Int8Tensor" and attn.weight.shape == reference.transformer.h[0].attn.c_attn.weight.shape
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999


def _outlier_data(count=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    channel = torch.ones(32)
    channel[::8] = 25.0  # salient input channels, as language models have
    return [torch.randn(4, 8, 32, generator=g) * channel for _ in range(count)]


@pytest.mark.parametrize("config", [
    lowbit.IntxWeightOnly(bits=3, group_size=32, algorithm="awq"), lowbit.Int4WeightOnly(group_size=32, algorithm="awq"),
    lowbit.Int8DynamicActivation(algorithm="smoothquant"), lowbit.Float8DynamicActivation(algorithm="smoothquant"),
], ids=lambda c: c.label())
def test_smoothing_algorithms_divide_inputs_and_beat_round_to_nearest(config, tmp_path):
    data, held_out, reference = _outlier_data(), _outlier_data(4, seed=1), _model()
    errors, models = {}, {}
    for algorithm in ("rtn", config.algorithm):
        model, variant = _model(), dataclasses.replace(config, algorithm=algorithm)
        _flow(model, variant, data) if algorithm != "rtn" else lowbit.quantize_(model, variant)
        with torch.no_grad():
            errors[algorithm] = sum((model(x) - reference(x)).pow(2).mean() for x in held_out)
        models[algorithm] = model
    smoothed = models[config.algorithm].embed.weight
    assert type(smoothed).__name__ == "SmoothedTensor" and smoothed.act_smooth.shape == (32,)
    assert smoothed.act_smooth[::8].min() > smoothed.act_smooth.median()  # the salient channels are scaled the most
    assert errors[config.algorithm] < errors["rtn"]
    path = tmp_path / "model.safetensors"  # ordinary files: saved and loaded like any quantized model
    lowbit.save(models[config.algorithm], path)
    loaded = lowbit.load(_model(), path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(held_out[0]), models[config.algorithm](held_out[0]), rtol=0, atol=0)


def test_smoothquant_factors_come_from_the_inputs_of_the_quantized_blocks():
    from lowbit.algorithms.smoothquant import smoothing_factors

    data, config = _outlier_data(), lowbit.Int8DynamicActivation(algorithm="smoothquant", smoothing=0.6)
    model = _model()
    _flow(model, config, data)
    expected_inputs = []
    work = _model()
    lowbit.prepare(work, config)
    lowbit.calibrate(work, data, progress=False)
    block0 = work.blocks[0]
    for name in ("up", "down"):  # block 0's layers quantized as calibrate quantized them
        layer = getattr(block0, name)
        layer.weight = torch.nn.Parameter(layer.lowbit_algorithm.result, requires_grad=False)
    hook = work.blocks[1].up.register_forward_pre_hook(lambda m, args: expected_inputs.append(args[0]))
    with torch.no_grad():
        for x in data:
            work(x)
    hook.remove()
    act_max = torch.cat([x.reshape(-1, 64) for x in expected_inputs]).abs().amax(0)
    weight_max = _model().blocks[1].up.weight.detach().abs().amax(0)
    torch.testing.assert_close(model.blocks[1].up.weight.act_smooth, smoothing_factors(act_max, weight_max, 0.6))
