"""PyTorch compatibility: torch.compile, torch.export, autograd, state_dict, deepcopy, dtype moves."""

import copy

import pytest
import torch
import torch.nn as nn
from conftest import ALL_CONFIGS, MLP, WEIGHT_ONLY_CONFIGS, config_id, low_bit_error_bound, relative_error

import lowbit
from lowbit.configs import NAMED_CONFIGS, STATIC_CONFIGS, config_from_name

# one of each weight-only and dynamic config (int4 per group of 32, to fit the 64-wide MLP; intx at 3 bits)
MAIN_CONFIGS = [config_from_name(name, group_size=32 if name == "int4-weight-only" else None)
                for name, config in NAMED_CONFIGS.items()
                if not isinstance(config, STATIC_CONFIGS) and name not in ("int2-weight-only", "int5-weight-only",
                                                                           "int6-weight-only", "int7-weight-only")]


@pytest.mark.parametrize("config", MAIN_CONFIGS, ids=config_id)
def test_compile_fullgraph_matches_eager(config, device):
    torch._dynamo.reset()
    model = lowbit.quantize_(MLP().to(device), config)
    x = torch.randn(8, 64, device=device)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)(x)  # fullgraph: any graph break raises
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", WEIGHT_ONLY_CONFIGS + [lowbit.Int8DynamicActivation()], ids=config_id)
def test_export(config):
    model = lowbit.quantize_(MLP(), config)
    x = torch.randn(4, 64)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x))
    torch.testing.assert_close(program.module()(torch.randn(4, 64)).shape, torch.Size([4, 32]))


class LoRALinear(nn.Module):
    """A frozen base linear plus a trainable low-rank adapter."""

    def __init__(self, base: nn.Linear, rank: int = 4):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


@pytest.mark.parametrize("config", MAIN_CONFIGS, ids=config_id)
def test_autograd_reaches_inputs_and_adapter_not_quantized_weight(config, device):
    model = LoRALinear(nn.Linear(64, 32)).to(device)
    lowbit.quantize_(model, config, filter_fn=lambda m, fqn: fqn == "base")
    x = torch.randn(5, 64, device=device, requires_grad=True)
    model(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert model.down.weight.grad is not None and model.up.weight.grad is not None
    assert model.base.weight.grad is None and not model.base.weight.requires_grad
    assert model.base.bias.grad is not None


def test_input_gradient_follows_the_dequantized_weight():
    model = lowbit.quantize_(MLP((64, 32, 32)), lowbit.Int8WeightOnly(), filter_fn=lambda m, n: n == "fc1")
    x = torch.randn(3, 64, requires_grad=True)
    model.fc1(x).sum().backward()
    torch.testing.assert_close(x.grad, model.fc1.weight.dequantize().sum(0).expand(3, 64))


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
def test_state_dict_loads_into_freshly_quantized_model(config):
    source = lowbit.quantize_(MLP(), config)
    target = lowbit.quantize_(MLP(), config)
    x = torch.randn(4, 64)
    assert not torch.equal(source(x), target(x))
    target.load_state_dict(source.state_dict())
    assert torch.equal(source(x), target(x))
    assert type(target.fc1.weight) is type(source.fc1.weight)


def test_state_dict_from_another_config_is_refused():
    source = lowbit.quantize_(MLP(), lowbit.Int8WeightOnly(group_size=32))
    target = lowbit.quantize_(MLP(), lowbit.Int8WeightOnly())
    before = target.fc1.weight.qdata.clone()
    with pytest.raises(RuntimeError, match=r"expected the same class, qtype, block_size.*received.*'block_size': \(1, 32\)"):
        target.load_state_dict(source.state_dict())
    assert torch.equal(target.fc1.weight.qdata, before)


@pytest.mark.parametrize("config", MAIN_CONFIGS, ids=config_id)
def test_deepcopy_is_independent(config):
    model = lowbit.quantize_(MLP(), config)
    clone = copy.deepcopy(model)
    x = torch.randn(4, 64)
    assert torch.equal(clone(x), model(x))
    assert isinstance(clone.fc1.weight, nn.Parameter)
    with torch.no_grad():
        clone.fc1.weight.copy_(lowbit.quantize_(MLP(), config).fc1.weight)
    assert not torch.equal(clone(x), model(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", MAIN_CONFIGS, ids=config_id)
def test_half_precision_models(config, dtype, device):
    model = MLP().to(device)
    x = torch.randn(4, 64, device=device)
    reference = model(x)
    half = lowbit.quantize_(copy.deepcopy(model).to(dtype), config)
    out = half(x.to(dtype))
    assert out.dtype == dtype and half.fc1.weight.dtype == dtype
    assert relative_error(out, reference) < low_bit_error_bound(config, 0.15, 0.06)
    moved = lowbit.quantize_(copy.deepcopy(model), config).to(dtype)  # quantize first, then .to(dtype)
    assert moved.fc1.weight.dtype == dtype and type(moved.fc1.weight) is type(half.fc1.weight)
    assert moved(x.to(dtype)).dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("config", MAIN_CONFIGS, ids=config_id)
def test_move_between_cpu_and_cuda(config):
    model = lowbit.quantize_(MLP(), config)
    x = torch.randn(4, 64)
    on_gpu = copy.deepcopy(model).to("cuda")
    assert on_gpu.fc1.weight.device.type == "cuda"
    torch.testing.assert_close(on_gpu(x.cuda()).cpu(), model(x), rtol=1e-3, atol=1e-3)
