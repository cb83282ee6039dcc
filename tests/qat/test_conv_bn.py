"""Conv-BN QAT: BatchNorm keeps training, the conv sees its folded weight fake-quantized, convert folds exactly."""

import copy

import pytest
import torch
import torch.nn as nn
from helpers import with_kernel

import lowbit
from lowbit.qat import ConvBn2d, QATConfig, freeze_bn_stats, freeze_ranges

CONVS = lambda m, fqn: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))  # noqa: E731


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)


def test_fused_layer_without_fake_quantization_trains_as_conv_then_batchnorm():
    torch.manual_seed(0)
    plain = cnn().train()
    fused = lowbit.fuse(copy.deepcopy(plain), qat=True)
    assert isinstance(fused[0], ConvBn2d) and isinstance(fused[1], nn.Identity)
    x, _ = _data()
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[0].bn.running_mean, plain[1].running_mean)  # statistics updated alike
    fused.eval(), plain.eval()
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [lowbit.StaticInt8(), lowbit.Int8WeightOnly(), lowbit.Float8WeightOnly()],
                         ids=lambda c: c.label())
def test_conv_bn_qat_trains_freezes_and_converts_exactly(config):
    model = lowbit.fuse(cnn().train(), qat=True)
    lowbit.quantize_(model, QATConfig(config), filter_fn=CONVS)
    x, y = _data()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, means = [], []
    for step in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        means.append(model[0].bn.running_mean.clone())
        if step == 19:
            freeze_bn_stats(model)
            freeze_ranges(model)
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.equal(means[0], means[19])  # statistics trained
    assert all(torch.equal(means[19], m) for m in means[20:])  # then frozen
    model.eval()
    with torch.no_grad():
        fake = model(x)
    lowbit.quantize_(model, QATConfig(with_kernel(config, "reference"), step="convert"))
    assert type(model[0]) is nn.Conv2d and type(model[3]) is nn.Conv2d and model[3].bias is not None
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model[0].weight, lowbit.QuantizedTensor)
    with torch.no_grad():
        assert torch.equal(model(x), fake)


def test_eval_of_a_fused_layer_is_the_folded_conv():
    model = lowbit.fuse(cnn().train(), qat=True)
    x, _ = _data()
    model(x)  # some running statistics
    model.eval()
    folded = model[0].folded()
    assert torch.equal(model[0](x), folded(x))


def test_fuse_qat_refuses_what_it_cannot_fuse():
    with pytest.raises(ValueError, match="model.train"):
        lowbit.fuse(cnn().eval(), qat=True)
    linear_bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    with pytest.raises(ValueError, match="Conv1d/2d/3d"):
        lowbit.fuse(linear_bn, [["0", "1"]], qat=True)
    assert isinstance(linear_bn[1], nn.BatchNorm1d)


def test_compiled_conv_bn_training_step_is_one_graph_and_matches_eager():
    """BatchNorm statistics training under torch.compile (``fullgraph=True``): gradients as eager's."""
    torch._dynamo.reset()
    model = lowbit.fuse(cnn().train(), qat=True)
    lowbit.quantize_(model, QATConfig(lowbit.StaticInt8()), filter_fn=CONVS)
    x, y = _data()
    model(x)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    for net in (compiled, eager):
        nn.functional.cross_entropy(net(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        # Inductor reorders the float32 sums of the conv and BatchNorm backward (large cancelling sums): 0.2% of
        # the largest gradient; a backward reading the updated running_var (PyTorch's partitioner recomputing
        # the factor) is off by as much as the gradients themselves
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=2e-3 * q.grad.abs().max().item() + 1e-7, msg=name)
    torch.testing.assert_close(model[0].bn.running_var, eager[0].bn.running_var)
