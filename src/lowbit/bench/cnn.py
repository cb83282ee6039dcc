"""(d) The digits CNN (Conv-BN-ReLU ResNet-style, trained here in seconds) in fp32, bf16 and static
int8/float8: latency against the fp32 and bf16 models (interleaved), top-1 accuracy beside it."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import lowbit
from lowbit.embedded import digits_data, train_digits_cnn

from .profiles import Echo, Profile
from .timing import Timed, interleaved_ms
from .variants import baseline_row


def _top1(model, x, y) -> float:
    with torch.inference_mode():
        return (model(x).argmax(-1) == y).float().mean().item() * 100


def bench_cnn(profile: Profile, echo: Echo) -> list[dict]:
    x_train, y_train, x_test, y_test = digits_data()
    model = lowbit.fuse(train_digits_cnn(x_train, y_train))
    calibration = [x_train[b] for b in torch.arange(512).split(64)]
    pick = lambda m, fqn: isinstance(m, (nn.Conv2d, nn.Linear))  # noqa: E731
    floats = {"fp32": (model, torch.float32), "bf16": (copy.deepcopy(model).to(torch.bfloat16), torch.bfloat16)}
    quantized = {}
    for config in (lowbit.StaticInt8(), lowbit.StaticFloat8()):
        candidate = lowbit.prepare(copy.deepcopy(model), config, filter_fn=pick)
        lowbit.calibrate(candidate, calibration, progress=False)
        quantized[f"lowbit {config.label()}"] = (lowbit.convert(candidate), torch.float32)
    top1 = {name: _top1(m, x_test.to(dtype), y_test) for name, (m, dtype) in {**floats, **quantized}.items()}
    results = []
    for batch in profile.cnn_batches:
        x = x_test[:batch]
        for subjects in [list(floats), *([name] for name in quantized)]:
            group = {**floats, **{name: quantized[name] for name in subjects if name in quantized}}
            calls = {name: Timed(lambda m=m, x=x.to(dtype): m(x)) for name, (m, dtype) in group.items()}
            timings = interleaved_ms(calls, rounds=profile.rounds, target_s=profile.target_s)
            for name in subjects:
                row = baseline_row(timings, name, batch=batch, top1=top1[name])
                results.append(row)
                echo(f"cnn bs{batch:<4} {name:<34} {row['ms']:8.3f} ms ±{100 * row['spread']:3.0f}% {row['speedup']:6.2f}x fp32 "
                     f"{row['speedup_bf16']:6.2f}x bf16  top-1 {row['top1']:.2f}%")
    return results
