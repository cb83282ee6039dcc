"""Static int8 on a small Conv-BN-ReLU ResNet-style CNN trained here on scikit-learn's digits."""

import pytest
import torch
import torch.nn as nn

import lowbit

datasets = pytest.importorskip("sklearn.datasets")


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return torch.relu(x + self.body(x))


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), Block(16),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def _accuracy(model, x, y):
    with torch.inference_mode():
        return (model(x).argmax(-1) == y).float().mean().item() * 100


def test_static_int8_cnn_on_digits_loses_at_most_one_point():
    torch.manual_seed(0)
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y))
    train, test = order[:1400], order[1400:]
    model = _cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(12):
        for batch in train.split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    baseline = _accuracy(model, x[test], y[test])
    assert baseline > 90
    lowbit.fuse(model)
    assert _accuracy(model, x[test], y[test]) == pytest.approx(baseline, abs=0.3)  # folding is exact
    convs_and_linears = lambda m, fqn: isinstance(m, (nn.Conv2d, nn.Linear))  # noqa: E731
    lowbit.prepare(model, lowbit.StaticInt8(), filter_fn=convs_and_linears)
    lowbit.calibrate(model, [x[b] for b in train[:512].split(64)], progress=False)
    lowbit.convert(model)
    quantized = _accuracy(model, x[test], y[test])
    print(f"digits CNN top-1: float {baseline:.2f}%, StaticInt8 {quantized:.2f}%")
    assert baseline - quantized <= 1.0
