"""(d) The digits CNN (Conv-BN-ReLU ResNet-style, trained here in seconds) in fp32 and static int8/float8:
median latency at batch 1, 256 and 1024 as a ratio to fp32, top-1 accuracy beside it."""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn

import lowbit
from lowbit.embedded import digits_data, train_digits_cnn

BATCHES = (1, 256, 1024)


def _top1(model, x, y) -> float:
    with torch.inference_mode():
        return (model(x).argmax(-1) == y).float().mean().item() * 100


def bench_cnn(median_ms: Callable, echo: Callable[[str], None]) -> list[dict]:
    x_train, y_train, x_test, y_test = digits_data()
    model = lowbit.fuse(train_digits_cnn(x_train, y_train))
    calibration = [x_train[b] for b in torch.arange(512).split(64)]
    pick = lambda m, fqn: isinstance(m, (nn.Conv2d, nn.Linear))  # noqa: E731
    variants = {"fp32": model}
    for config in (lowbit.StaticInt8(), lowbit.StaticFloat8()):
        quantized = lowbit.prepare(copy.deepcopy(model), config, filter_fn=pick)
        lowbit.calibrate(quantized, calibration, progress=False)
        variants[f"lowbit {config.label()}"] = lowbit.convert(quantized)
    results = []
    for batch in BATCHES:
        x = x_test[:batch]
        base = median_ms(lambda: model(x), warmup=3)
        for name, variant in variants.items():
            ms = base if variant is model else median_ms(lambda v=variant: v(x), warmup=3)
            row = {"method": name, "batch": batch, "ms": ms, "speedup": base / ms, "top1": _top1(variant, x_test, y_test)}
            results.append(row)
            echo(f"cnn bs{batch:<4} {name:<34} {ms:8.3f} ms  x{row['speedup']:.2f}  top-1 {row['top1']:.2f}%")
    return results
