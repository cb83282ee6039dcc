"""Static int8 on a small Conv-BN-ReLU ResNet-style CNN trained here on scikit-learn's digits."""

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.embedded import digits_data, train_digits_cnn

pytest.importorskip("sklearn.datasets")


def _accuracy(model, x, y):
    with torch.inference_mode():
        return (model(x).argmax(-1) == y).float().mean().item() * 100


def test_static_int8_cnn_on_digits_loses_at_most_one_point():
    x_train, y_train, x_test, y_test = digits_data()
    model = train_digits_cnn(x_train, y_train)
    baseline = _accuracy(model, x_test, y_test)
    assert baseline > 90
    lowbit.fuse(model)
    assert _accuracy(model, x_test, y_test) == pytest.approx(baseline, abs=0.3)  # folding is exact
    convs_and_linears = lambda m, fqn: isinstance(m, (nn.Conv2d, nn.Linear))  # noqa: E731
    lowbit.prepare(model, lowbit.StaticInt8(), filter_fn=convs_and_linears)
    lowbit.calibrate(model, [x_train[b] for b in torch.arange(512).split(64)], progress=False)
    lowbit.convert(model)
    assert model[0].weight.weight.packed_for is not None or lowbit.kernels.onednn_conv._requires("cpu")
    quantized = _accuracy(model, x_test, y_test)
    print(f"digits CNN top-1: float {baseline:.2f}%, StaticInt8 {quantized:.2f}%")
    assert baseline - quantized <= 1.0
