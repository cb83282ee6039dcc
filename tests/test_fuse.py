"""fuse: BatchNorm folded into Conv/ConvTranspose/Linear gives the same outputs."""

import pytest
import torch
import torch.nn as nn

import lowbit


def _randomise_norm(norm):
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        if norm.affine:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return norm


CASES = [
    (lambda: nn.Conv1d(4, 6, 3), lambda: nn.BatchNorm1d(6), (2, 4, 10)),
    (lambda: nn.Conv2d(4, 6, 3, bias=False), lambda: nn.BatchNorm2d(6), (2, 4, 8, 8)),
    (lambda: nn.Conv2d(6, 6, 3, groups=6), lambda: nn.BatchNorm2d(6), (2, 6, 8, 8)),  # depthwise
    (lambda: nn.Conv3d(2, 4, 3), lambda: nn.BatchNorm3d(4), (1, 2, 5, 5, 5)),
    (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2), lambda: nn.BatchNorm2d(6), (2, 4, 5, 5)),
    (lambda: nn.ConvTranspose1d(4, 4, 3, bias=False), lambda: nn.BatchNorm1d(4, affine=False), (2, 4, 7)),
    (lambda: nn.Linear(8, 5), lambda: nn.BatchNorm1d(5), (3, 8)),
]


@pytest.mark.parametrize("make_layer, make_norm, shape", CASES)
def test_fused_model_is_exact(make_layer, make_norm, shape):
    model = nn.Sequential(make_layer(), _randomise_norm(make_norm()), nn.ReLU()).eval()
    x = torch.randn(shape)
    expected = model(x)
    lowbit.fuse(model)
    assert isinstance(model[1], nn.Identity) and isinstance(model[2], nn.ReLU)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_named_pairs_in_any_module():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = _randomise_norm(nn.BatchNorm2d(4))

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    model = Net().eval()
    x = torch.randn(1, 3, 6, 6)
    expected = model(x)
    lowbit.fuse(model, [["conv", "bn"]])
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_fuse_refuses_training_mode_and_wrong_pairs():
    with pytest.raises(ValueError, match="eval"):
        lowbit.fuse(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5)).eval()
    before = model[0].weight.clone()
    with pytest.raises(ValueError, match="4 channels"):
        lowbit.fuse(model)
    assert torch.equal(model[0].weight, before) and isinstance(model[1], nn.BatchNorm2d)
    with pytest.raises(ValueError, match="Conv/ConvTranspose/Linear"):
        lowbit.fuse(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)).eval(), [["0", "1"]])


def test_fuse_validates_every_pair_before_folding():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _randomise_norm(nn.BatchNorm2d(4)), nn.ReLU(),
                          nn.Conv2d(4, 4, 3), _randomise_norm(nn.BatchNorm2d(4))).eval()
    lowbit.quantize_(model, lowbit.Int8WeightOnly(), filter_fn=lambda m, fqn: fqn == "3")
    first = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"float weight of '3', which is already quantized \(Int8Tensor\): fold BatchNorm first"):
        lowbit.fuse(model)
    assert torch.equal(model[0].weight, first) and isinstance(model[1], nn.BatchNorm2d) and isinstance(model[4], nn.BatchNorm2d)


def test_fuse_folds_each_module_once():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _randomise_norm(nn.BatchNorm2d(4)), _randomise_norm(nn.BatchNorm2d(4))).eval()
    first = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="folds each layer and BatchNorm once; '0' is in two pairs"):
        lowbit.fuse(model, [["0", "1"], ["0", "2"]])
    assert torch.equal(model[0].weight, first) and isinstance(model[1], nn.BatchNorm2d)
