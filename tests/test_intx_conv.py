"""IntxWeightOnly(group_size=None) on convolutions: 2..7-bit weights per output channel, bit-packed along the last
dim (the kernel width), through the reference conv kernel; save/load and QAT prepare/convert."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.primitives.affine import choose_qparams, dequantize, quantize
from lowbit.qat import QATConfig
from lowbit.targets import conv_layout

CONVS = [
    (lambda: nn.Conv2d(4, 8, 3, padding=1), (2, 4, 8, 8)),  # kernel width 3: 3 * bits bits per packed row
    (lambda: nn.Conv2d(8, 8, (3, 5), groups=8), (2, 8, 8, 8)),  # depthwise
    (lambda: nn.Conv1d(4, 6, 3, stride=2), (2, 4, 20)),
    (lambda: nn.Conv3d(2, 4, 3), (1, 2, 6, 6, 6)),
    (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2, stride=2), (2, 4, 5, 5)),  # one scale per output channel on axis 1
]
ANY_CONV = lambda m, fqn: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d))  # noqa: E731


def _expected_weight(conv: nn.Module, qtype: str, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest per output channel with the primitives: what the packed weight must dequantize to."""
    w, block = conv.weight.detach(), conv_layout(conv)["block_size"]
    scale, zero = choose_qparams(w, block, qtype, symmetric=symmetric)
    return dequantize(quantize(w, scale, zero, block, qtype), scale, zero, block)


@pytest.mark.parametrize("make, shape", CONVS)
@pytest.mark.parametrize("bits, symmetric", [(2, False), (3, False), (3, True), (5, False), (7, True)])
def test_conv_weights_pack_per_output_channel_and_run_the_reference_conv(make, shape, bits, symmetric):
    torch.manual_seed(bits)
    conv = make()
    expected = _expected_weight(conv, f"{'' if symmetric else 'u'}int{bits}", symmetric)
    float_conv = copy.deepcopy(conv)
    lowbit.quantize_(conv, lowbit.IntxWeightOnly(bits=bits, group_size=None, symmetric=symmetric), filter_fn=ANY_CONV)
    q = conv.weight
    assert type(q) is lowbit.IntxTensor
    kernel_width = expected.shape[-1]
    assert q.qdata.dtype == torch.uint8 and tuple(q.qdata.shape) == (*expected.shape[:-1], -(-kernel_width * bits // 8))
    assert q.scale.numel() == conv.out_channels
    assert torch.equal(q.dequantize(), expected)
    x = torch.randn(shape)
    with torch.no_grad():
        float_conv.weight.copy_(expected)
        assert torch.equal(conv(x), float_conv(x))


@pytest.mark.parametrize("config", [lowbit.IntxWeightOnly(bits=3), lowbit.IntxWeightOnly(bits=2, group_size=128)],
                         ids=lambda c: c.label())
def test_a_group_size_on_a_conv_is_refused_and_the_model_is_unchanged(config):
    model = nn.Sequential(nn.Linear(128, 64), nn.Unflatten(1, (4, 4, 4)), nn.Conv2d(4, 8, 3))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="does not quantize convolutions with a group size.*pass group_size=None.*'2' of type Conv2d"):
        lowbit.quantize_(model, config, filter_fn=lambda m, n: isinstance(m, (nn.Linear, nn.Conv2d)))
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(4)

    def make():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.ConvTranspose2d(8, 6, 3, groups=2), nn.Flatten(), nn.Linear(6 * 9 * 9, 5))

    config = lowbit.IntxWeightOnly(bits=3, group_size=None)
    model = lowbit.quantize_(make().eval(), config, filter_fn=lambda m, n: not isinstance(m, (nn.Sequential, nn.ReLU, nn.Flatten)))
    path = lowbit.save(model, tmp_path / "intx_conv.safetensors")
    with torch.device("meta"):
        empty = make().eval()
    loaded = lowbit.load(empty, path)
    x = torch.randn(2, 3, 9, 9)
    assert type(loaded[0].weight) is lowbit.IntxTensor and loaded[0].lowbit_spec == config.spec()
    assert torch.equal(loaded(x), model(x))
    row = next(r for r in lowbit.serialization.describe(path)["tensors"] if r["name"] == "0.weight")
    assert row["bytes"] == 8 * 3 * 3 * 2 + 8 * 4 + 8  # qdata (3 codes of 3 bits: 2 bytes per row), scale, zero_point


def _conv_bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(100, 10))


CONV_OR_LINEAR = lambda m, n: isinstance(m, (nn.Conv2d, nn.Linear))  # noqa: E731


@pytest.mark.parametrize("bits", [2, 3])
def test_qat_converts_conv_bn_exactly(bits):
    """Train a fused Conv-BN net prepared for 3-bit weights; the converted model computes what the prepared one did."""
    torch.manual_seed(5)
    config = lowbit.IntxWeightOnly(bits=bits, group_size=None, kernel="reference")
    model = lowbit.fuse(_conv_bn_net().train(), qat=True)
    lowbit.quantize_(model, QATConfig(config), filter_fn=CONV_OR_LINEAR)
    x = torch.randn(8, 3, 9, 9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = model(x)
    lowbit.quantize_(model, QATConfig(config, step="convert"))
    assert type(model[0].weight) is lowbit.IntxTensor and isinstance(model[1], nn.Identity)
    with torch.no_grad():
        assert torch.equal(model(x), trained)


def test_qat_convert_of_an_untrained_conv_equals_post_training_quantization():
    torch.manual_seed(6)
    config = lowbit.IntxWeightOnly(bits=3, group_size=None)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(100, 10)).eval()
    ptq = lowbit.quantize_(copy.deepcopy(model), config, filter_fn=CONV_OR_LINEAR)
    lowbit.quantize_(model, QATConfig(config), filter_fn=CONV_OR_LINEAR)
    lowbit.quantize_(model, QATConfig(config, step="convert"))
    for index in (0, 2, 4):
        a, b = ptq[index].weight, model[index].weight
        assert type(a) is type(b) is lowbit.IntxTensor
        assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(model(x), ptq(x))
